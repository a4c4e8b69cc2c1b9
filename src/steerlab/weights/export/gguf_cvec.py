"""An activation addition as a llama.cpp control vector, and such a file read back."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from steerlab.directions.artifact import Direction, DirectionMeta
from steerlab.errors import DirectionError
from steerlab.store.atomic import umask
from steerlab.weights.export.common import ExportError

if TYPE_CHECKING:
    from steerlab.model.loading import LoadedModel

CVEC_ARCH = "controlvector"
# HF model_type -> llama.cpp architecture name (controlvector.model_hint is informational).
LLAMA_CPP_ARCH = {"mistral": "llama", "gemma3_text": "gemma3"}


def cvec_tensor_index(layer: int) -> int:
    """llama.cpp ``direction.{k}`` index for a steerlab ``Add`` at layer ``layer``.

    steerlab's ``Add`` at layer L adds to the output of decoder layer L
    (steerlab.interventions.steering, site ``output``). llama.cpp adds ``direction.k`` to
    the output of block k (0-based; ``build_cvec(cur, il)`` right after the
    FFN residual add in src/models/*.cpp; ``common_control_vector_load_one``
    puts direction.k at data offset ``n_embd·(k−1)`` and
    ``llama_adapter_cvec::apply`` hands that slice to block k). So k = L, and
    layer 0 cannot be steered: llama.cpp rejects ``direction.0``.
    """
    if layer < 1:
        raise ExportError(
            "llama.cpp control vectors cannot add to the output of layer 0 (direction.0 is "
            "rejected by llama.cpp). Use layers 1 and above."
        )
    return layer


def export_gguf_cvec(
    direction: Direction,
    out: str | Path,
    *,
    alpha: float = 1.0,
    layers: Iterable[int] | None = None,
    source_layer: int | None = None,
    scale: Literal["raw", "unit"] = "raw",
    lm: LoadedModel | None = None,
    model_hint: str | None = None,
) -> Path:
    """Write the activation addition ``Add(direction, alpha, layers, source_layer)`` as a
    llama.cpp control vector (``--control-vector FILE`` with strength 1 reproduces it).

    Tensors ``direction.{k}`` (float32, d_model) with k from
    :func:`cvec_tensor_index`; metadata ``general.architecture =
    "controlvector"``, ``controlvector.model_hint``, ``controlvector.layer_count``
    (as llama.cpp's cvector-generator writes them) plus ``steerlab.*`` keys
    that record alpha, source layer and the layer convention. With
    ``source_layer`` the one vector is added at every layer in ``layers``
    (default: all model layers ≥ 1, which needs ``lm``); otherwise each layer
    gets its own vector (default: the direction's layers ≥ 1).
    """
    import gguf
    import numpy as np

    if lm is not None:
        direction.check_compatible(lm, allow_mismatch=True)
    if layers is None:
        if source_layer is not None:
            if lm is None:
                raise ExportError("Give layers=... (or lm=...) to know where to add the vector.")
            layers = range(1, lm.n_layers)
        else:
            layers = [i for i in direction.layers if i >= 1]
    chosen = sorted(set(layers))
    if not chosen:
        raise ExportError("No layers to write: the control vector would be empty.")
    if lm is not None and chosen[-1] >= lm.n_layers:
        raise ExportError(f"Layer {chosen[-1]} is out of range for a {lm.n_layers}-layer model.")
    hint = model_hint or (lm.model.config.model_type if lm is not None else "") or "unknown"
    hint = LLAMA_CPP_ARCH.get(hint, hint)
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.fchmod(fd, 0o666 & ~umask())  # an ordinary file's mode, not mkstemp's 0600
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp_name, CVEC_ARCH)
        writer.add_string(f"{CVEC_ARCH}.model_hint", hint)
        writer.add_uint32(f"{CVEC_ARCH}.layer_count", len(chosen))
        writer.add_string("steerlab.direction", direction.meta.name)
        writer.add_float32("steerlab.alpha", float(alpha))
        writer.add_int32("steerlab.source_layer", -1 if source_layer is None else source_layer)
        writer.add_string("steerlab.layer_convention",
                          "direction.k is added to the output of block k (0-based) = steerlab "
                          "Add at layer k")
        for layer in chosen:
            vec = direction.vector(source_layer if source_layer is not None else layer,
                                   unit=scale == "unit")
            data = (float(alpha) * vec.detach().float().cpu()).numpy().astype(np.float32)
            writer.add_tensor(f"direction.{cvec_tensor_index(layer)}", data)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp_name, target)
    finally:
        Path(tmp_name).unlink(missing_ok=True)
    return target


def read_gguf_cvec(path: str | Path) -> Direction:
    """Read a llama.cpp control vector back as a steerlab Direction (layers in steerlab numbering).

    The vectors are exactly what llama.cpp adds (alpha already applied).
    """
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    vectors: dict[int, torch.Tensor] = {}
    for tensor in reader.tensors:
        match = re.fullmatch(r"direction\.(\d+)", tensor.name)
        if not match or int(match.group(1)) == 0:
            raise DirectionError(
                f"{path} has tensor {tensor.name!r}; a control vector has only direction.k, k ≥ 1."
            )
        vectors[int(match.group(1))] = torch.tensor(tensor.data.copy()).float().reshape(-1)
    if not vectors:
        raise DirectionError(f"{path} has no direction tensors.")
    fields = {}
    for key in ("general.architecture", f"{CVEC_ARCH}.model_hint", "steerlab.direction"):
        field = reader.get_field(key)
        if field is not None:
            fields[key] = bytes(field.parts[field.data[0]]).decode()
    layers = tuple(sorted(vectors))
    meta = DirectionMeta(name=fields.get("steerlab.direction", Path(path).stem), kind="cvec",
                         method="gguf-cvec", d_model=int(vectors[layers[0]].numel()),
                         extra=fields)
    return Direction(torch.stack([vectors[i] for i in layers]), layers, meta)
