"""A merged Hugging Face checkpoint of an edited model (safetensors, config, tokenizer with
its chat template, generation config) that ``from_pretrained`` and vLLM load as is."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from steerlab.store.atomic import disk_full, free_space_shortfall, write_json
from steerlab.weights.export.common import (
    EDIT_FILE,
    ExportError,
    edit_provenance,
    staged_dir,
)
from steerlab.weights.orthogonalize import OrthogonalizeResult

if TYPE_CHECKING:
    from steerlab.model.loading import LoadedModel


def export_hf(
    lm: LoadedModel,
    out: str | Path,
    *,
    edit: OrthogonalizeResult | None = None,
    extra: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Save ``lm`` (already edited) as a self-contained Hugging Face model folder.

    Writes safetensors weights, config, generation config, tokenizer and chat
    template, plus ``steerlab_edit.json`` describing the edit. ``dtype``
    casts the saved weights (default: as loaded). Written to a temp folder
    and renamed, so ``out`` is never half-written.

    Example:
        >>> result = orthogonalize(lm, direction)           # doctest: +SKIP
        >>> export_hf(lm, "qwen-ablated", edit=result)      # doctest: +SKIP
    """
    target = Path(out)
    need = checkpoint_bytes(lm.model, dtype)
    if (short := free_space_shortfall(target.parent, need)) is not None:
        raise ExportError(
            f"Cannot export to {target}: {short}. Free some space, choose an --out on a larger "
            "disk, or load the model with --dtype bfloat16 to halve the checkpoint."
        )
    try:
        with staged_dir(target, overwrite) as tmp:
            model = lm.model
            if dtype is not None and dtype != lm.dtype:
                model = model.to(dtype)  # in place for nn.Module; the caller's lm now has it
                lm.dtype = dtype
            model.save_pretrained(tmp)
            lm.tokenizer.save_pretrained(tmp)
            record = {"format": "hf", **edit_provenance(lm),
                      "fingerprint": lm.fingerprint, "edit": edit.to_json() if edit else None,
                      **(extra or {})}
            write_json(tmp / EDIT_FILE, record)
    except BaseException as exc:
        if disk_full(exc):  # something else filled the disk after the check above
            raise ExportError(
                f"The disk filled up while writing {target}; the partial export was removed. "
                "Free some space or choose an --out on a larger disk, and export again."
            ) from exc
        raise
    return target


def checkpoint_bytes(model: torch.nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of the weights ``save_pretrained`` writes (tied tensors once), cast to ``dtype``."""
    # Keyed by storage address; tensors with none (meta) are counted each on their own.
    unique = {t.data_ptr() or id(t): t for t in model.state_dict().values()}
    return sum(t.numel() * (dtype.itemsize if dtype is not None and t.is_floating_point()
                            else t.element_size())
               for t in unique.values())

