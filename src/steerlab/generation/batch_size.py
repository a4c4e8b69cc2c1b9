"""How many prompts go in one generation batch, and when a failure means "too many"."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from steerlab.model.loading import LoadedModel

CPU_AUTO_BATCH = 64
GPU_MAX_AUTO_BATCH = 256


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


def auto_batch_size(lm: LoadedModel, n_prompts: int, max_tokens: int) -> int:
    """A starting batch size: 64 on CPU (a decode step has a fixed cost, mostly reading
    the weights, that a larger batch shares: 48 prompts of the embedded model generate
    17% faster in one batch than in three of 16), on a GPU what the free memory holds
    for the KV cache of ``max_tokens`` per row, with headroom; ``generate`` halves
    it on out-of-memory."""
    device = lm.device
    if device.type != "cuda":
        return max(1, min(n_prompts, CPU_AUTO_BATCH))
    free, _ = torch.cuda.mem_get_info(device)
    config = lm.model.config
    elem = torch.finfo(lm.dtype).bits // 8
    per_row = lm.n_layers * lm.kv_bytes_per_token * max_tokens
    per_row += 4 * config.vocab_size * 3 + 16 * config.hidden_size * max_tokens * elem
    fits = int(0.6 * free // max(per_row, 1))
    return max(1, min(n_prompts, GPU_MAX_AUTO_BATCH, fits))


__all__ = ["CPU_AUTO_BATCH", "GPU_MAX_AUTO_BATCH", "auto_batch_size", "is_oom"]
