"""An orthogonalization as a PEFT LoRA adapter, and any LoRA adapter's update directions
read back. ``W − α·QQᵀW`` differs from W by a rank-k matrix, so each edited Linear gets
``B = −α·Q`` and ``A = QᵀW``, and the embedding PEFT's embedding LoRA with
``lora_embedding_A = (E Q)ᵀ`` and ``lora_embedding_B = −α·Q``; merged, it equals the ``hf``
export."""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from steerlab.directions.artifact import Direction, DirectionMeta
from steerlab.errors import DirectionError
from steerlab.model.embedded import DEFAULT_MODEL_NAME
from steerlab.model.loading import LoadedModel, load_model
from steerlab.store.atomic import write_json
from steerlab.weights.export.common import (
    EDIT_FILE,
    ExportError,
    edit_provenance,
    edit_record,
    staged_dir,
)
from steerlab.weights.orthogonalize import (
    COMPONENTS,
    DirectionLike,
    EditTarget,
    OrthogonalizeResult,
    embeddings_tied,
    module_weight,
    plan_orthogonalization,
)

LORA_WEIGHTS = "adapter_model.safetensors"
LORA_CONFIG = "adapter_config.json"


@torch.no_grad()
def lora_tensors(lm: LoadedModel, targets: Sequence[EditTarget], edit: OrthogonalizeResult
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """PEFT-named LoRA tensors for the orthogonalization of the UNEDITED ``lm`` that
    :func:`~steerlab.weights.orthogonalize.plan_orthogonalization` planned.

    Returns (state dict keyed like PEFT's ``adapter_model.safetensors``,
    a description with rank, target modules and the edit).
    """
    if "embed" in edit.components and embeddings_tied(lm):
        raise ExportError(
            "This model ties lm_head to the input embedding, and a LoRA on the embedding would "
            "also change lm_head when merged. Export with --format hf (which unties), or leave "
            "'embed' out of --components."
        )
    tensors: dict[str, torch.Tensor] = {}
    for t in targets:
        tensors.update(lora_pair(t, edit.alpha))
    return tensors, lora_info(edit)


def lora_info(edit: OrthogonalizeResult) -> dict[str, Any]:
    """The edit as an adapter's ``steerlab_edit.json`` describes it."""
    info: dict[str, Any] = {
        "rank": edit.rank,
        "alpha": edit.alpha,
        "direction": edit.direction,
        "source_layer": edit.source_layer,
        "components": list(edit.components),
        "layers": list(edit.layers),
        "target_modules": list(edit.modules),
    }
    if edit.weights is not None:
        info["weights"] = edit.weights
    info["approximate"] = edit.approximate
    return info


def lora_pair(target: EditTarget, scale: float) -> dict[str, torch.Tensor]:
    """PEFT's A and B of one residual writer, ``B = −scale·Q``: ``lora_A = QᵀW`` for a Linear
    (refused when its bias has a component along ``Q``: LoRA cannot edit biases), and
    ``lora_embedding_A = (E Q)ᵀ`` for the embedding."""
    weight = module_weight(target.module)
    q = target.basis.to(weight.device)
    prefix = f"base_model.model.{target.name}"
    b = (-scale * q).contiguous().cpu()
    if target.component == "embed":
        return {f"{prefix}.lora_embedding_A": _embed_coeffs(weight, q).T.contiguous().cpu(),
                f"{prefix}.lora_embedding_B": b}
    bias = getattr(target.module, "bias", None)
    if isinstance(bias, torch.Tensor) and float((q.T @ bias.float()).norm()) > 1e-6 * max(
            float(bias.float().norm()), 1e-12):
        raise ExportError(f"{target.name} has a bias with a component along the direction; LoRA "
                          "cannot edit biases. Export with --format hf instead.")
    return {f"{prefix}.lora_A.weight": _linear_coeffs(weight, q).contiguous().cpu(),
            f"{prefix}.lora_B.weight": b}


def _hub_name(lm: LoadedModel) -> str:
    """What PEFT records as the base model: the hub id for the embedded model, else the spec."""
    if lm.spec == "default":
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
    gives the same weights as :func:`~steerlab.weights.orthogonalize.orthogonalize` +
    :func:`export_hf` (tested). The adapter is rank k (1 for one direction).

    Example:
        >>> export_lora(lm, Direction.load("refusal"), "refusal-lora")   # doctest: +SKIP
    """
    tensors, info = lora_tensors(lm, *plan_orthogonalization(
        lm, direction_or_subspace, alpha, layers, components, source_layer=source_layer,
        allow_approximate=allow_approximate))
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
    with staged_dir(target, overwrite) as tmp:
        config_dict = config.to_dict()
        config_dict["target_modules"] = sorted(info["target_modules"])
        write_json(tmp / LORA_CONFIG, config_dict)
        save_file(tensors, str(tmp / LORA_WEIGHTS), metadata={"format": "pt"})
        write_json(tmp / EDIT_FILE, {"format": "lora", **edit_provenance(lm),
                                     "base_fingerprint": lm.fingerprint, "edit": info})
    return target


def load_edited(spec: str, *, dtype: str = "auto", base: str | None = None) -> LoadedModel:
    """Load a model spec, or a LoRA adapter folder merged into its base model.

    The base of an adapter is ``base`` if given, else the ``model_spec`` that
    steerlab recorded when exporting it, else the adapter config's
    ``base_model_name_or_path``.
    """
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

