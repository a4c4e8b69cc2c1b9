"""Export an edit so other tools can use it without steerlab.

- ``hf``: a merged Hugging Face checkpoint (safetensors, config, tokenizer with
  its chat template, generation config) of an orthogonalized model; plain
  ``AutoModelForCausalLM.from_pretrained`` (and vLLM) load it.
- ``lora``: the same edit as a PEFT LoRA adapter. ``W − α·QQᵀW`` differs from
  W by a rank-k matrix, so each edited Linear gets ``B = −α·Q`` (out×k) and
  ``A = QᵀW`` (k×in), and the embedding gets PEFT's embedding LoRA with
  ``lora_embedding_A = (E Q)ᵀ`` and ``lora_embedding_B = −α·Q`` (PEFT adds
  ``(B A)ᵀ`` to the embedding matrix). Merged, it equals the ``hf`` export.
  :func:`read_lora_directions` reads any LoRA adapter's update directions
  back as steerlab directions.
- ``gguf-cvec``: an activation-addition direction as a llama.cpp control
  vector (see :func:`export_gguf_cvec` for the layer numbering).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from safetensors.torch import load_file, save_file

from steerlab._atomic import disk_full, free_space_shortfall, write_json
from steerlab.directions import Direction, DirectionMeta
from steerlab.errors import DirectionError, SteerlabError
from steerlab.orthogonalize import (
    COMPONENTS,
    DirectionLike,
    OrthogonalizeResult,
    direction_basis,
    embeddings_tied,
    module_weight,
    plan_edits,
)

if TYPE_CHECKING:
    from steerlab.model import LoadedModel

FORMATS = ("hf", "lora", "gguf-cvec")
EDIT_FILE = "steerlab_edit.json"
LORA_WEIGHTS = "adapter_model.safetensors"
LORA_CONFIG = "adapter_config.json"
CVEC_ARCH = "controlvector"
# HF model_type -> llama.cpp architecture name (controlvector.model_hint is informational).
LLAMA_CPP_ARCH = {"mistral": "llama", "gemma3_text": "gemma3"}


class ExportError(SteerlabError):
    """An export target exists, or the edit cannot be written in the requested format."""


# -- shared ------------------------------------------------------------------------------------
def _provenance(lm: LoadedModel | None) -> dict[str, Any]:
    from steerlab import __version__

    info: dict[str, Any] = {
        "created_by": f"steerlab {__version__}",
        "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
    }
    if lm is not None:
        info.update(model_name=lm.name, model_spec=lm.spec, model_type=lm.model.config.model_type)
    return info


def _fresh_dir(out: Path, overwrite: bool) -> Path:
    """A temp folder beside ``out`` to fill before renaming it into place."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ExportError(
            f"{out} already exists and is not empty; choose another --out or pass overwrite=True "
            "(--overwrite)."
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))


def _commit_dir(tmp: Path, out: Path) -> None:
    """Rename the filled temp folder to ``out`` (replacing an old export only now)."""
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


# -- hf ----------------------------------------------------------------------------------------
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
    tmp = _fresh_dir(target, overwrite)
    try:
        model = lm.model
        if dtype is not None and dtype != lm.dtype:
            model = model.to(dtype)  # in place for nn.Module; the caller's lm now has this dtype
            lm.dtype = dtype
        model.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
        record = {"format": "hf", **_provenance(lm),
                  "fingerprint": lm.fingerprint, "edit": edit.to_json() if edit else None,
                  **(extra or {})}
        write_json(tmp / EDIT_FILE, record)
        _commit_dir(tmp, target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
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


# -- lora --------------------------------------------------------------------------------------
@torch.no_grad()
def lora_tensors(
    lm: LoadedModel,
    direction_or_subspace: DirectionLike,
    alpha: float = 1.0,
    layers: Iterable[int] | None = None,
    components: Sequence[str] = COMPONENTS,
    *,
    source_layer: int | None = None,
    allow_approximate: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """PEFT-named LoRA tensors for the orthogonalization of the UNEDITED ``lm``.

    Returns (state dict keyed like PEFT's ``adapter_model.safetensors``,
    a description with rank, target modules and the edit).
    """
    basis, name, used_layer = direction_basis(direction_or_subspace, source_layer=source_layer,
                                              d_model=lm.d_model)
    targets = plan_edits(lm, basis, layers=layers, components=components,
                         allow_approximate=allow_approximate)
    if "embed" in components and embeddings_tied(lm):
        raise ExportError(
            "This model ties lm_head to the input embedding, and a LoRA on the embedding would "
            "also change lm_head when merged. Export with --format hf (which unties), or leave "
            "'embed' out of --components."
        )
    tensors: dict[str, torch.Tensor] = {}
    for t in targets:
        weight = module_weight(t.module)
        q = t.basis.to(weight.device)
        prefix = f"base_model.model.{t.name}"
        if t.component == "embed":
            tensors[f"{prefix}.lora_embedding_A"] = _embed_coeffs(weight, q).T.contiguous().cpu()
            tensors[f"{prefix}.lora_embedding_B"] = (-alpha * q).contiguous().cpu()
            continue
        bias = getattr(t.module, "bias", None)
        if isinstance(bias, torch.Tensor):
            leak = float((q.T @ bias.float()).norm())
            if leak > 1e-6 * max(float(bias.float().norm()), 1e-12):
                raise ExportError(
                    f"{t.name} has a bias with a component along the direction; LoRA cannot edit "
                    "biases. Export with --format hf instead."
                )
        tensors[f"{prefix}.lora_A.weight"] = _linear_coeffs(weight, q).contiguous().cpu()
        tensors[f"{prefix}.lora_B.weight"] = (-alpha * q).contiguous().cpu()
    info = {
        "rank": int(basis.shape[1]),
        "alpha": float(alpha),
        "direction": name,
        "source_layer": used_layer,
        "components": [c for c in COMPONENTS if c in components],
        "layers": sorted({t.layer for t in targets if t.layer is not None}),
        "target_modules": [t.name for t in targets],
        "approximate": lm.arch.post_norm and any(t.component != "embed" for t in targets),
    }
    return tensors, info


def _hub_name(lm: LoadedModel) -> str:
    """What PEFT records as the base model: the hub id for the embedded model, else the spec."""
    if lm.spec == "default":
        from steerlab.embedded import DEFAULT_MODEL_NAME

        return f"Qwen/{DEFAULT_MODEL_NAME}"
    return lm.spec


def _linear_coeffs(weight: torch.Tensor, q: torch.Tensor, chunk: int = 1 << 22) -> torch.Tensor:
    """``QᵀW`` (k×in) in float32, a few columns at a time."""
    step = max(1, chunk // weight.shape[0])
    parts = [q.T @ weight[:, s : s + step].float() for s in range(0, weight.shape[1], step)]
    return torch.cat(parts, dim=1)


def _embed_coeffs(weight: torch.Tensor, q: torch.Tensor, chunk: int = 1 << 22) -> torch.Tensor:
    """``E Q`` (vocab×k) in float32, a few rows at a time."""
    step = max(1, chunk // weight.shape[1])
    parts = [weight[s : s + step].float() @ q for s in range(0, weight.shape[0], step)]
    return torch.cat(parts, dim=0)


def export_lora(
    lm: LoadedModel,
    direction_or_subspace: DirectionLike,
    out: str | Path,
    alpha: float = 1.0,
    layers: Iterable[int] | None = None,
    components: Sequence[str] = COMPONENTS,
    *,
    source_layer: int | None = None,
    allow_approximate: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write the orthogonalization of the UNEDITED ``lm`` as a PEFT LoRA adapter folder.

    Loadable with ``PeftModel.from_pretrained(base, out)``; ``merge_and_unload()``
    gives the same weights as :func:`~steerlab.orthogonalize.orthogonalize` +
    :func:`export_hf` (tested). The adapter is rank k (1 for one direction).

    Example:
        >>> export_lora(lm, Direction.load("refusal"), "refusal-lora")   # doctest: +SKIP
    """
    tensors, info = lora_tensors(lm, direction_or_subspace, alpha, layers, components,
                                 source_layer=source_layer, allow_approximate=allow_approximate)
    return write_lora(lm, tensors, info, out, overwrite=overwrite)


def write_lora(lm: LoadedModel, tensors: dict[str, torch.Tensor], info: dict[str, Any],
               out: str | Path, *, overwrite: bool = False) -> Path:
    """Write PEFT-named LoRA tensors (B carrying the whole update) as an adapter folder."""
    from peft import LoraConfig

    rank = info["rank"]
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,  # scaling = lora_alpha / r = 1: B and A carry the whole update
        target_modules=info["target_modules"],
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=_hub_name(lm),
        inference_mode=True,
    )
    target = Path(out)
    tmp = _fresh_dir(target, overwrite)
    try:
        config_dict = config.to_dict()
        config_dict["target_modules"] = sorted(info["target_modules"])
        write_json(tmp / LORA_CONFIG, config_dict)
        save_file(tensors, str(tmp / LORA_WEIGHTS), metadata={"format": "pt"})
        write_json(tmp / EDIT_FILE, {"format": "lora", **_provenance(lm),
                                     "base_fingerprint": lm.fingerprint, "edit": info})
        _commit_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_edited(spec: str, *, dtype: str = "auto", base: str | None = None) -> LoadedModel:
    """Load a model spec, or a LoRA adapter folder merged into its base model.

    The base of an adapter is ``base`` if given, else the ``model_spec`` that
    steerlab recorded when exporting it, else the adapter config's
    ``base_model_name_or_path``.
    """
    from steerlab.model import LoadedModel, load_model

    folder = Path(spec)
    if not (folder / LORA_CONFIG).is_file():
        return load_model(spec, dtype=dtype)
    from peft import PeftModel

    record = edit_record(folder) or {}
    base_spec = base or record.get("model_spec") or json.loads(
        (folder / LORA_CONFIG).read_text()).get("base_model_name_or_path")
    if not base_spec:
        raise ExportError(f"{folder} is a LoRA adapter with no recorded base model; pass base=...")
    lm = load_model(base_spec, dtype=dtype)
    with warnings.catch_warnings():
        # peft reads transformers' deprecated ``is_gradient_checkpointing``; not ours to act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                                category=FutureWarning)
        merged = PeftModel.from_pretrained(lm.model, str(folder)).merge_and_unload()
    merged.eval()
    return LoadedModel(model=merged, tokenizer=lm.tokenizer, arch=lm.arch,
                       spec=f"{base_spec}+{folder}", dtype=lm.dtype, dtype_reason=lm.dtype_reason)


_LAYER_NAME = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(.+)$")


def read_lora_directions(
    adapter: str | Path,
    *,
    attn_out: str = "self_attn.o_proj",
    mlp_out: str = "mlp.down_proj",
) -> dict[str, Direction]:
    """Read a LoRA adapter's update directions back as steerlab directions.

    Each LoRA module's update ``ΔW = s·B A`` writes along the column space of
    B. Its main direction is the top left singular vector of ``B A``
    (``−B`` normalised for rank 1, so a steerlab export at α > 0 reads back
    as ``+v̂``). Returns one :class:`Direction` per module kind: ``"embed"``
    (stored as layer 0, the residual stream the embedding writes),
    ``"attn_out"``/``"mlp_out"`` for modules named ``attn_out``/``mlp_out``
    inside layers, otherwise the module's path inside its layer. Each
    layer's vector is unit norm; ``meta.extra["strength"]`` has the update's
    spectral norm per layer.

    Example:
        >>> dirs = read_lora_directions("refusal-lora")                  # doctest: +SKIP
        >>> dirs["mlp_out"].cosine(refusal)                               # doctest: +SKIP
    """
    folder = Path(adapter)
    cfg_path, weights_path = folder / LORA_CONFIG, folder / LORA_WEIGHTS
    if not cfg_path.is_file() or not weights_path.is_file():
        raise DirectionError(
            f"{folder} is not a LoRA adapter folder: expected {LORA_CONFIG} and {LORA_WEIGHTS}."
        )
    try:
        cfg = json.loads(cfg_path.read_text())
        rank = int(cfg["r"])
        scaling = float(cfg.get("lora_alpha", rank)) / (
            rank ** 0.5 if cfg.get("use_rslora") else rank
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise DirectionError(f"{cfg_path} is malformed ({exc}).") from exc
    tensors = load_file(str(weights_path))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        for suffix, part in ((".lora_A.weight", "A"), (".lora_B.weight", "B"),
                             (".lora_embedding_A", "A"), (".lora_embedding_B", "B")):
            if key.endswith(suffix):
                module = key[: -len(suffix)].removeprefix("base_model.model.")
                pairs.setdefault(module, {})[part] = value.float()
                if "embedding" in suffix:
                    pairs[module]["embed"] = torch.ones(())
    grouped: dict[str, dict[int, tuple[torch.Tensor, float]]] = {}
    for module, parts in sorted(pairs.items()):
        if "A" not in parts or "B" not in parts:
            raise DirectionError(f"LoRA module {module} in {weights_path} lacks its A or B matrix.")
        vec, strength = _main_direction(parts["B"], parts["A"], scaling)
        if "embed" in parts:
            key, layer = "embed", 0
        else:
            match = _LAYER_NAME.match(module)
            if not match:
                continue  # not inside a decoder layer (e.g. lm_head): no residual position
            layer, inner = int(match.group(1)), match.group(2)
            key = {attn_out: "attn_out", mlp_out: "mlp_out"}.get(inner, inner)
        grouped.setdefault(key, {})[layer] = (vec, strength)
    if not grouped:
        raise DirectionError(f"{weights_path} has no LoRA A/B pairs steerlab can read.")
    result = {}
    for key, per_layer in grouped.items():
        layers = tuple(sorted(per_layer))
        meta = DirectionMeta(
            name=f"{folder.name}:{key}", kind="lora", method="lora_update",
            d_model=int(per_layer[layers[0]][0].numel()),
            extra={"component": key, "adapter": str(folder), "rank": rank,
                   "strength": {str(i): per_layer[i][1] for i in layers}},
        )
        result[key] = Direction(torch.stack([per_layer[i][0] for i in layers]), layers, meta)
    return result


def _main_direction(b: torch.Tensor, a: torch.Tensor, scaling: float) -> tuple[torch.Tensor, float]:
    """Top left singular vector (and value) of ``scaling·B A`` without forming it."""
    qb, rb = torch.linalg.qr(b.double())
    gram = rb @ (a.double() @ a.double().T) @ rb.T
    evals, evecs = torch.linalg.eigh(gram)
    vec = qb @ evecs[:, -1]
    if float(vec @ (-b.double().sum(dim=1))) < 0:
        vec = -vec
    strength = abs(scaling) * float(evals[-1].clamp_min(0).sqrt())
    return vec.float(), strength


def adapter_cosines(
    adapter: str | Path | dict[str, Direction],
    reference: Direction,
    *,
    source_layer: int | None = None,
) -> dict[str, dict[int, float]]:
    """Cosine of each adapter update direction with ``reference``, per component and layer.

    With ``source_layer`` every layer is compared with that one reference
    vector (how orthogonalization uses a direction); otherwise layer by layer.
    """
    dirs = read_lora_directions(adapter) if not isinstance(adapter, dict) else adapter
    out: dict[str, dict[int, float]] = {}
    for key, direction in dirs.items():
        if source_layer is not None:
            ref = reference.vector(source_layer).float()
            out[key] = {
                layer: float(torch.nn.functional.cosine_similarity(
                    direction.vector(layer).float(), ref.to(direction.vectors.device), dim=0))
                for layer in direction.layers
            }
        else:
            out[key] = direction.cosine(reference)
    return out


# -- gguf control vector -----------------------------------------------------------------------
def cvec_tensor_index(layer: int) -> int:
    """llama.cpp ``direction.{k}`` index for a steerlab ``Add`` at layer ``layer``.

    steerlab's ``Add`` at layer L adds to the output of decoder layer L
    (steerlab.steering, site ``output``). llama.cpp adds ``direction.k`` to
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


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ExportError(f"Unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}.")
    return fmt


def edit_record(path: str | Path) -> dict[str, Any] | None:
    """The ``steerlab_edit.json`` of an exported folder, if any."""
    file = Path(path) / EDIT_FILE
    return json.loads(file.read_text()) if file.is_file() else None


__all__ = [
    "FORMATS",
    "ExportError",
    "adapter_cosines",
    "check_format",
    "cvec_tensor_index",
    "edit_record",
    "export_gguf_cvec",
    "export_hf",
    "export_lora",
    "load_edited",
    "lora_tensors",
    "read_gguf_cvec",
    "read_lora_directions",
    "write_lora",
]
