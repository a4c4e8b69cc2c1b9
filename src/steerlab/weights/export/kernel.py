"""Exports of a :class:`~steerlab.interventions.kernel_ablate.KernelAblate` spec (``steerlab
abliterate``'s result): a Hugging Face folder with the weights edited, or a PEFT LoRA adapter whose
merge gives the same weights. A llama.cpp control vector adds a vector; it cannot express an
ablation, so that format is refused with a pointer to the two that work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from steerlab.interventions.kernel_ablate import KernelAblate
from steerlab.model.loading import LoadedModel
from steerlab.weights.export.common import ExportError
from steerlab.weights.export.hf import export_hf
from steerlab.weights.export.lora import lora_info, lora_pair, write_lora
from steerlab.weights.orthogonalize import kernel_edits, kernel_record, orthogonalize_spec


@torch.no_grad()
def kernel_lora_tensors(lm: LoadedModel, spec: KernelAblate, *,
                        allow_approximate: bool = False
                        ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """PEFT-named tensors for the UNEDITED ``lm``: per module ``B = −w·Q``, ``A = QᵀW``."""
    tensors: dict[str, torch.Tensor] = {}
    edits = kernel_edits(lm, spec, allow_approximate=allow_approximate)
    for target, weight in edits:
        tensors.update(lora_pair(target, weight))
    if not edits:
        raise ExportError("The spec's kernels are zero at every layer; there is nothing to export.")
    return tensors, lora_info(kernel_record(lm, spec, edits))


def export_kernel(lm: LoadedModel, spec: KernelAblate, out: str | Path, fmt: str = "hf", *,
                  allow_approximate: bool = False, overwrite: bool = False,
                  extra: dict[str, Any] | None = None) -> Path:
    """Write ``spec`` as ``hf`` (``lm`` is edited in place) or ``lora`` (``lm`` untouched)."""
    if fmt == "lora":
        tensors, info = kernel_lora_tensors(lm, spec, allow_approximate=allow_approximate)
        return write_lora(lm, tensors, info, out, overwrite=overwrite)
    if fmt != "hf":
        raise ExportError(
            f"A kernel_ablate spec cannot be written as {fmt}: a control vector adds a vector "
            "and cannot remove one. Use --format hf or --format lora."
        )
    result = orthogonalize_spec(lm, spec, allow_approximate=allow_approximate)
    return export_hf(lm, out, edit=result, overwrite=overwrite, extra=extra)


__all__ = ["export_kernel", "kernel_lora_tensors"]
