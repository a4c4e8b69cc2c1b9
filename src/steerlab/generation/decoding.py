"""The KV-cached decode loop that offline generation and the server share.

:func:`steerlab.generation.generate.generate` and the server's
:func:`steerlab.serve.engine.decode` must give the same tokens for the same
prompt, so both run :func:`decode_loop`: a left-padded prefill, then one
token per live row per step from the KV cache, logits for the last position
only, and rows that end leave the batch (and its KV cache) at once. What a
caller does between steps (choose tokens, stream text, stop rows) is its
``step`` callback. Code that steps the model its own way (teacher-forced KL)
uses :func:`forward_step` directly.

Example:
    >>> def greedy(logits, active):                           # doctest: +SKIP
    ...     chosen = logits.argmax(-1)
    ...     return chosen, [j for j, t in enumerate(chosen.tolist()) if t != eos]
    >>> decode_loop(lm, [ids], pad_id=0, step=greedy)         # doctest: +SKIP
    5
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from steerlab.prompts.chat import left_pad

if TYPE_CHECKING:
    from steerlab.model.loading import LoadedModel

StepFn = Callable[[torch.Tensor, list[int]], tuple[torch.Tensor, list[int]]]
"""``step(logits [n_live, V], live row indices) -> (chosen token per live row [n_live],
positions into the live list of the rows that go on)``."""

PrefillFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, Any]]
"""``prefill(ids [B, T], mask [B, T], positions [B, T]) -> (last logits [B, V], cache)``:
a batch's prefill, in place of a plain forward."""

_KEYWORDS: dict[type, tuple[str, str | None]] = {}


def _forward_keywords(model: Any) -> tuple[str, str | None]:
    """Cache and logits-trimming keyword names of this model class's ``forward``."""
    model_type = type(model)
    if model_type in _KEYWORDS:
        return _KEYWORDS[model_type]
    params = inspect.signature(model_type.forward).parameters  # the class's, not a wrapper
    cache_kw = "cache" if "cache" in params else "past_key_values"
    if "logits_to_keep" in params:
        keep_kw: str | None = "logits_to_keep"
    elif "num_logits_to_keep" in params:
        keep_kw = "num_logits_to_keep"
    else:
        keep_kw = None
    _KEYWORDS[model_type] = (cache_kw, keep_kw)
    return cache_kw, keep_kw


def forward_step(lm: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
    """One cached forward pass; return the last position's logits ``[B, V]`` and the cache.

    Why a helper: transformers 4.57 and 5.x name the cache and logit-trimming
    keywords differently, and decoding needs only the last position's logits
    (computing all of them costs a ``[B, T, V]`` tensor at prefill). Pass
    ``cache=None`` for the prefill, then the returned cache on every step.
    """
    cache_kw, keep_kw = _forward_keywords(lm.model)
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask,
                              "position_ids": position_ids, "use_cache": True}
    if cache is not None:
        kwargs[cache_kw] = cache
    if keep_kw == "logits_to_keep":
        # An index tensor, not the int 1: the int form feeds the LM head a non-contiguous
        # [B, 1, d] slice of a longer prefill, which on CPU bfloat16 with tied embeddings
        # copies the whole vocabulary matrix per call (~7x slower prefill here).
        kwargs[keep_kw] = torch.tensor([input_ids.shape[1] - 1], device=input_ids.device)
    elif keep_kw is not None:
        kwargs[keep_kw] = 1
    out = lm.model(**kwargs)
    new_cache = getattr(out, "cache", None)
    if new_cache is None:
        new_cache = getattr(out, "past_key_values", None)
    return out.logits[:, -1, :], new_cache


def prompt_generator(seed: int, index: int, device: torch.device) -> torch.Generator:
    """The sampling RNG of prompt ``index`` in a run seeded with ``seed``.

    Keyed by a hash of ``(seed, index)`` so a prompt's sample does not depend
    on batch size, order or resumption; the server seeds a request as prompt
    0, so it samples what offline ``generate`` does for that prompt alone.
    """
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def sampling_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Temperature, then nucleus (top-p) filtering, over the last dimension.

    One rule for offline and served sampling, so a seeded sample is the same
    text from both.
    """
    probs = torch.softmax(logits.float() / max(temperature, 1e-6), dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        cum = sorted_p.cumsum(dim=-1)
        sorted_p = sorted_p.masked_fill(cum - sorted_p > top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return probs


def decode_loop(lm: LoadedModel, prompt_ids: Sequence[Sequence[int]], pad_id: int,
                step: StepFn, *, prefill: PrefillFn | None = None) -> int:
    """Prefill ``prompt_ids`` as one batch, then decode until ``step`` keeps no row.

    After every forward pass ``step(logits, live)`` gets the last-position logits of the live rows
    and their indices into ``prompt_ids``; it returns the token chosen for each live row and which
    of them (positions into ``live``) go on. Rows that stop leave the batch and the KV cache at
    once, so a batch costs what its live rows cost. Returns the number of forward passes run.
    Steering is the caller's: wrap the call in :func:`steerlab.interventions.steering.steer`.
    ``prefill(ids, mask, positions)``, when given, runs the prefill instead of a plain forward (see
    :mod:`steerlab.activations.shared_prefill`).
    """
    device = lm.device
    ids, mask = left_pad(prompt_ids, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    position = (mask.cumsum(-1) - 1).clamp_min(0)
    live = list(range(len(prompt_ids)))
    with torch.inference_mode():
        if prefill is None:
            logits, cache = forward_step(lm, ids, mask, position, None)
        else:
            logits, cache = prefill(ids, mask, position)
        next_pos = position[:, -1] + 1
        passes = 1
        while True:
            chosen, keep = step(logits, live)
            if not keep:
                return passes
            if len(keep) < len(live):
                index = torch.tensor(keep)  # a CPU index works on every layer's device
                cache.batch_select_indices(index)
                mask, chosen, next_pos = mask[index], chosen[index], next_pos[index]
                live = [live[j] for j in keep]
            mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
            logits, cache = forward_step(lm, chosen[:, None].to(device), mask, next_pos[:, None],
                                         cache)
            next_pos = next_pos + 1
            passes += 1


__all__ = ["PrefillFn", "StepFn", "decode_loop", "forward_step", "left_pad",
           "prompt_generator", "sampling_probs"]
