"""Weight orthogonalization: edit a direction (or subspace) out of every matrix
that writes into the residual stream, so the model behaves as if the
direction were ablated at run time, with no hooks.

For a unit direction v̂ and strength α, each residual writer becomes
``W ← W − α·v̂v̂ᵀW`` (and its bias ``b ← b − α·v̂v̂ᵀb``); the embedding's rows
become ``E ← E − α·(E v̂) v̂ᵀ``. A subspace uses its orthonormal QR basis Q:
``W ← W − α·QQᵀW``. α = 1 removes the component, α < 1 shrinks it, α > 1
flips it.

Exactness (pre-norm layouts: Llama, Qwen2/3, Mistral, Phi-3): with α = 1 the
edited model's logits equal the original model's logits under runtime
``Ablate`` at every layer, to float32 rounding — the residual stream simply
never receives a v̂ component. Post-norm layouts (Gemma 2/3, OLMo 2) add
``norm(o_proj(...))`` to the residual, and a norm is not linear, so no edit of
``o_proj`` reproduces runtime ablation of the norm's output. With
``allow_approximate=True`` steerlab edits those projections against
``g ⊙ v̂`` (``g`` the norm's elementwise gain), which makes the norm's output
exactly orthogonal to v̂ — the residual stream still carries no v̂ component
at α = 1 — but the writes' magnitudes differ from runtime ablation, so the
logits differ (tests/test_orthogonalize.py shows both facts).

Tied embeddings: editing ``embed_tokens`` in place would also edit a tied
``lm_head``, which runtime ablation never touches; steerlab unties first
(``lm_head`` gets its own copy of the original matrix, config
``tie_word_embeddings=False``), costing one extra vocab×d matrix, or raises
with ``tied="error"``.

Memory: each matrix is edited in column (or row) chunks of at most
``chunk_elements`` float32 values, so the peak overhead is one chunk, not a
copy of the model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from steerlab.directions.artifact import Direction
from steerlab.errors import DirectionError, InterventionError
from steerlab.interventions.kernel_ablate import KernelAblate
from steerlab.interventions.spec_resolution import resolve_specs
from steerlab.model.loading import LoadedModel, model_fingerprint

COMPONENTS = ("embed", "attn_out", "mlp_out")
DEFAULT_CHUNK_ELEMENTS = 1 << 22  # 4M float32 values = 16 MiB of scratch per chunk

DirectionLike = Direction | str | Path | torch.Tensor | Sequence[Direction | torch.Tensor]


@dataclass(frozen=True)
class EditTarget:
    """One parameter set to edit: a residual writer and the basis to remove from it."""

    name: str  # module name inside lm.model, e.g. "model.layers.3.mlp.down_proj"
    component: str  # "embed", "attn_out" or "mlp_out"
    layer: int | None  # decoder layer index (None for the embedding)
    module: nn.Module
    basis: torch.Tensor  # [d_model, k] orthonormal, float32, on CPU


@dataclass(frozen=True)
class OrthogonalizeResult:
    """What an orthogonalization did: enough to describe or reproduce the edit."""

    alpha: float
    rank: int
    components: tuple[str, ...]
    layers: tuple[int, ...]
    modules: tuple[str, ...]
    untied: bool
    approximate: bool
    direction: str
    source_layer: int | None
    weights: dict[str, list[float]] | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def direction_basis(
    direction_or_subspace: DirectionLike,
    *,
    source_layer: int | None = None,
    d_model: int | None = None,
) -> tuple[torch.Tensor, str, int | None]:
    """Orthonormal basis ``[d_model, k]`` (float32, CPU) of what to remove.

    A :class:`Direction` (or its folder path) contributes the vector of
    ``source_layer`` (default: its best layer, or its only layer); a tensor
    ``[d]`` is one direction, ``[k, d]`` a subspace; a sequence of directions
    or vectors is a subspace, orthonormalised by QR. Returns the basis, a
    name for records, and the source layer used.
    """
    name = "tensor"
    used_layer = source_layer
    if isinstance(direction_or_subspace, (str, Path)):
        direction_or_subspace = Direction.load(direction_or_subspace)
    if isinstance(direction_or_subspace, Direction):
        vec = direction_or_subspace.vector(source_layer)
        if used_layer is None:
            used_layer = _resolved_layer(direction_or_subspace)
        name = direction_or_subspace.meta.name
        vectors = vec.reshape(1, -1)
    elif isinstance(direction_or_subspace, torch.Tensor):
        vectors = direction_or_subspace.reshape(-1, direction_or_subspace.shape[-1])
    else:
        items = list(direction_or_subspace)
        if not items:
            raise DirectionError(
                "The subspace to orthogonalize is empty; give at least one direction."
            )
        rows = []
        names = []
        for item in items:
            if isinstance(item, Direction):
                rows.append(item.vector(source_layer).reshape(-1))
                names.append(item.meta.name)
            else:
                rows.append(item.reshape(-1))
                names.append("tensor")
        vectors = torch.stack([r.detach().float().cpu() for r in rows])
        name = "+".join(names)
    vectors = vectors.detach().to("cpu", torch.float64)
    if d_model is not None and vectors.shape[1] != d_model:
        raise DirectionError(
            f"The direction has d_model {vectors.shape[1]} but the model has {d_model}: it was "
            "made for another model."
        )
    if not torch.isfinite(vectors).all():
        raise DirectionError("The direction contains NaN or infinite values; re-extract it.")
    q, r = torch.linalg.qr(vectors.T)
    diag = r.diagonal().abs()
    if diag.numel() == 0 or float(diag.min()) <= 1e-8 * max(float(diag.max()), 1e-30):
        raise DirectionError(
            f"The {vectors.shape[0]} vector(s) to orthogonalize are zero or linearly dependent; "
            "drop the redundant ones (or check the direction is not all zeros)."
        )
    return q.to(torch.float32), name, used_layer


def _resolved_layer(direction: Direction) -> int | None:
    if direction.meta.best_layer is not None:
        return direction.meta.best_layer
    return direction.layers[0] if len(direction.layers) == 1 else None


def plan_edits(
    lm: LoadedModel,
    basis: torch.Tensor,
    *,
    layers: Iterable[int] | None = None,
    components: Sequence[str] = COMPONENTS,
    allow_approximate: bool = False,
) -> list[EditTarget]:
    """The parameters an orthogonalization touches and the basis each one loses.

    Raises on a post-norm layout unless ``allow_approximate`` (see module
    docstring), on unknown components, and on layers out of range.
    """
    unknown = set(components) - set(COMPONENTS)
    if unknown or not components:
        raise InterventionError(
            f"Unknown components {sorted(unknown) or '(none given)'}; choose from "
            f"{', '.join(COMPONENTS)}."
        )
    chosen = sorted(set(range(lm.n_layers) if layers is None else layers))
    bad = [i for i in chosen if not 0 <= i < lm.n_layers]
    if bad:
        raise InterventionError(
            f"Layers {bad} are out of range: the model has layers 0-{lm.n_layers - 1}."
        )
    writes_through_norm = lm.arch.post_norm and bool({"attn_out", "mlp_out"} & set(components))
    if writes_through_norm and not allow_approximate:
        raise InterventionError(
            f"{lm.arch.name} is a post-norm layout: attention and MLP outputs pass through a norm "
            "before the residual stream, so orthogonalizing o_proj/down_proj is NOT equivalent to "
            "runtime ablation. Use runtime Ablate, or pass allow_approximate=True "
            "(--allow-approximate) to edit against the norm's gain: the residual stream then "
            "carries no component along the direction, but logits differ from runtime ablation."
        )
    names = {id(m): n for n, m in lm.model.named_modules()}
    layout = lm.layout
    targets: list[EditTarget] = []
    if "embed" in components:
        targets.append(EditTarget(names[id(layout.embed)], "embed", None, layout.embed, basis))
    for i in chosen:
        for comp, projs, writers in (
            ("attn_out", layout.attn_out, layout.attn_residual),
            ("mlp_out", layout.mlp_out, layout.mlp_residual),
        ):
            if comp not in components:
                continue
            proj = projs[i]
            target_basis = basis
            if writers[i] is not proj:
                target_basis = _through_norm_basis(writers[i], basis, f"layer {i} {comp}")
            targets.append(EditTarget(names[id(proj)], comp, i, proj, target_basis))
    for t in targets:
        _check_shape(t, lm.d_model)
    return targets


def _through_norm_basis(norm: nn.Module, basis: torch.Tensor, where: str) -> torch.Tensor:
    """Basis U such that ``norm(y) ⟂ basis`` exactly whenever ``y ⟂ U``.

    An RMS-style norm is ``y ↦ s(y)·(g ⊙ y)`` with a positive scalar ``s``, so
    ``norm(y)·q = s·y·(g ⊙ q)``: removing ``g ⊙ q`` from y removes q from the
    output. ``g`` is read off the norm itself (its output on a ones vector)
    and checked on a random input.
    """
    param = next(norm.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    d = basis.shape[0]
    with torch.no_grad():
        gain = norm(torch.ones(1, d, device=device, dtype=dtype)).float().reshape(-1).cpu()
        probe = torch.randn(1, d, generator=torch.Generator().manual_seed(0))
        out = norm(probe.to(device, dtype)).float().reshape(-1).cpu()
    expected = gain * probe.reshape(-1)
    ratio = float(out @ expected) / max(float(expected @ expected), 1e-30)
    if ratio <= 0 or float((out - ratio * expected).norm()) > 1e-2 * float(out.norm()):
        raise InterventionError(
            f"The norm after {where} ({type(norm).__name__}) is not an elementwise-gain RMS norm, "
            "so steerlab cannot edit the projection before it; use runtime Ablate instead."
        )
    scaled = basis * gain.unsqueeze(1)
    q, _ = torch.linalg.qr(scaled.double())
    return q.float()


def plan_orthogonalization(lm: LoadedModel, direction_or_subspace: DirectionLike, alpha: float,
                           layers: Iterable[int] | None, components: Sequence[str], *,
                           source_layer: int | None, allow_approximate: bool
                           ) -> tuple[list[EditTarget], OrthogonalizeResult]:
    """The modules an orthogonalization edits (see :func:`plan_edits`) and the record of the
    edit, made before any weight changes: the in-place edit and the LoRA export share both."""
    basis, name, used_layer = direction_basis(direction_or_subspace, source_layer=source_layer,
                                              d_model=lm.d_model)
    targets = plan_edits(lm, basis, layers=layers, components=components,
                         allow_approximate=allow_approximate)
    return targets, OrthogonalizeResult(
        alpha=float(alpha),
        rank=int(basis.shape[1]),
        components=tuple(c for c in COMPONENTS if c in components),
        layers=tuple(sorted({t.layer for t in targets if t.layer is not None})),
        modules=tuple(t.name for t in targets),
        untied=False,
        approximate=lm.arch.post_norm and any(t.component != "embed" for t in targets),
        direction=name,
        source_layer=used_layer,
    )


def module_weight(module: nn.Module) -> torch.Tensor:
    """The ``weight`` tensor of a Linear/Embedding-like module (typed for mypy)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise InterventionError(f"{type(module).__name__} has no weight tensor to edit.")
    return weight


def _check_shape(target: EditTarget, d_model: int) -> None:
    weight = getattr(target.module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise InterventionError(
            f"{target.name} has no 2-D weight; steerlab can only orthogonalize Linear and "
            "Embedding residual writers."
        )
    dim = 1 if target.component == "embed" else 0
    if weight.shape[dim] != d_model:
        raise InterventionError(
            f"{target.name} has weight shape {tuple(weight.shape)}; expected dimension {dim} to be "
            f"d_model={d_model}. Its layout is not a residual writer steerlab understands."
        )


def embeddings_tied(lm: LoadedModel) -> bool:
    """True when ``lm_head`` shares its weight tensor with the input embedding."""
    head = lm.model.get_output_embeddings()
    if head is None:
        return False
    return bool(head.weight.data_ptr() == module_weight(lm.layout.embed).data_ptr())


def untie_embeddings(lm: LoadedModel) -> None:
    """Give ``lm_head`` its own copy of the embedding matrix and record it in the config."""
    head = lm.model.get_output_embeddings()
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    config = lm.model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for each in {id(config): config, id(text): text}.values():  # a composite model has two
        each.tie_word_embeddings = False


@torch.no_grad()
def orthogonalize(
    lm: LoadedModel,
    direction_or_subspace: DirectionLike,
    alpha: float = 1.0,
    layers: Iterable[int] | None = None,
    components: Sequence[str] = COMPONENTS,
    *,
    source_layer: int | None = None,
    allow_approximate: bool = False,
    tied: Literal["untie", "error"] = "untie",
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> OrthogonalizeResult:
    """Edit ``direction_or_subspace`` out of the residual writers of ``lm``, in place.

    ``layers`` limits which decoder layers' attention/MLP outputs are edited
    (the embedding is edited when ``"embed"`` is in ``components``). The
    model's fingerprint is refreshed afterwards. Works with layers spread
    over several devices; each matrix is computed in float32 and cast back.

    Example:
        >>> lm = load_model("default", dtype="float32")          # doctest: +SKIP
        >>> orthogonalize(lm, Direction.load("refusal"), alpha=1.0)  # doctest: +SKIP
    """
    if not torch.isfinite(torch.tensor(float(alpha))):
        raise InterventionError(f"alpha must be a finite number, got {alpha}.")
    targets, result = plan_orthogonalization(lm, direction_or_subspace, alpha, layers, components,
                                             source_layer=source_layer,
                                             allow_approximate=allow_approximate)
    if "embed" in result.components and embeddings_tied(lm):
        if tied == "error":
            raise InterventionError(
                "This model ties lm_head to the input embedding; editing the embedding would also "
                "edit lm_head, which runtime ablation never touches. Pass tied='untie' (default) "
                "to give lm_head its own copy, or leave 'embed' out of components."
            )
        untie_embeddings(lm)
        result = dataclasses.replace(result, untied=True)
    for target in targets:
        apply_edit(target, float(alpha), chunk_elements=chunk_elements)
    lm.fingerprint = model_fingerprint(lm.model)
    return result


def kernel_edits(lm: LoadedModel, spec: KernelAblate, *,
                 allow_approximate: bool = False) -> list[tuple[EditTarget, float]]:
    """Each attention / MLP output projection a :class:`KernelAblate` spec changes, with its
    weight: ``W ← W − w·QQᵀW`` there equals the spec's runtime hooks (pre-norm layouts)."""
    resolved = resolve_specs([spec], lm=lm)[0]
    assert isinstance(resolved, KernelAblate) and isinstance(resolved.direction, Direction)
    basis = resolved.basis(resolved.direction)
    edits: list[tuple[EditTarget, float]] = []
    for site, weights in resolved.site_weights(lm.n_layers).items():
        component = {"attn": "attn_out", "mlp": "mlp_out"}[site]
        for layer, weight in enumerate(weights):
            if weight != 0.0:
                target, = plan_edits(lm, basis, layers=[layer], components=[component],
                                     allow_approximate=allow_approximate)
                edits.append((target, weight))
    return edits


@torch.no_grad()
def orthogonalize_spec(lm: LoadedModel, spec: KernelAblate, *, allow_approximate: bool = False,
                       chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> OrthogonalizeResult:
    """Edit a :class:`KernelAblate` spec (``steerlab abliterate``'s result) into the weights of
    ``lm``, in place: each layer's attention and MLP output lose their own weight of the
    basis. The model's fingerprint is refreshed afterwards."""
    edits = kernel_edits(lm, spec, allow_approximate=allow_approximate)
    for target, weight in edits:
        apply_edit(target, weight, chunk_elements=chunk_elements)
    lm.fingerprint = model_fingerprint(lm.model)
    return kernel_record(lm, spec, edits)


def kernel_record(lm: LoadedModel, spec: KernelAblate,
                  edits: Sequence[tuple[EditTarget, float]]) -> OrthogonalizeResult:
    """What the edits :func:`kernel_edits` planned for ``spec`` do, whether they are applied
    to the weights or written as a LoRA adapter."""
    basis = edits[0][0].basis if edits else torch.zeros(lm.d_model, 0)
    return OrthogonalizeResult(
        alpha=1.0, rank=int(basis.shape[1]), components=("attn_out", "mlp_out"),
        layers=tuple(sorted({t.layer for t, _w in edits if t.layer is not None})),
        modules=tuple(t.name for t, _w in edits), untied=False,
        approximate=lm.arch.post_norm and bool(edits),
        direction=f"kernel_ablate(source={spec.source:g}, rank={spec.rank})",
        source_layer=round(spec.source),
        weights=spec.site_weights(lm.n_layers),
    )


def apply_edit(
    target: EditTarget, alpha: float, *, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
) -> None:
    """Remove ``alpha`` times the basis component from one module's weight (and bias)."""
    weight = module_weight(target.module)
    q = target.basis.to(weight.device)
    if target.component == "embed":
        _edit_rows(weight.data, q, alpha, chunk_elements)
    else:
        _edit_columns(weight.data, q, alpha, chunk_elements)
        bias = getattr(target.module, "bias", None)
        if isinstance(bias, torch.Tensor):
            _edit_columns(bias.data.unsqueeze(1), q, alpha, chunk_elements)


def _edit_columns(w: torch.Tensor, q: torch.Tensor, alpha: float, chunk_elements: int) -> None:
    """``W ← W − α Q QᵀW`` for ``W [d_model, n]``, a few columns at a time."""
    step = max(1, chunk_elements // max(1, w.shape[0]))
    for start in range(0, w.shape[1], step):
        block = w[:, start : start + step]
        work = block.to(torch.float32, copy=True)
        work.sub_(q @ (q.T @ work), alpha=alpha)
        block.copy_(work)


def _edit_rows(w: torch.Tensor, q: torch.Tensor, alpha: float, chunk_elements: int) -> None:
    """``E ← E − α (E Q) Qᵀ`` for ``E [vocab, d_model]``, a few rows at a time."""
    step = max(1, chunk_elements // max(1, w.shape[1]))
    for start in range(0, w.shape[0], step):
        block = w[start : start + step]
        work = block.to(torch.float32, copy=True)
        work.sub_((work @ q) @ q.T, alpha=alpha)
        block.copy_(work)


__all__ = [
    "COMPONENTS",
    "EditTarget",
    "OrthogonalizeResult",
    "apply_edit",
    "direction_basis",
    "embeddings_tied",
    "kernel_edits",
    "kernel_record",
    "orthogonalize",
    "orthogonalize_spec",
    "plan_edits",
    "untie_embeddings",
]
