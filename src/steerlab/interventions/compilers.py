"""What each spec type does at each hooked site: small ops (``x ← x + m·delta(x)``) with
their tensors placed once per device and dtype, and one registered compiler per spec type
that turns a resolved spec into ops. A new spec type adds a function decorated with
:func:`register_compiler`; nothing else is edited."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch

from steerlab.directions.artifact import Direction
from steerlab.errors import DirectionError, InterventionError
from steerlab.interventions.layer_spec import parse_layers, resolve_layers
from steerlab.interventions.spec_types import Ablate, Add, Project, Spec, SubspaceAblate, op_of

if TYPE_CHECKING:
    from steerlab.model.loading import LoadedModel

MEAN_NORMS_KEY = "mean_norms"


class _Placed:
    """A float32 tensor, copied to each (device, dtype) it meets exactly once.

    Prepared at entry for the site's own device and dtype; a hook that sees
    another place (e.g. accelerate moves inputs after our pre-hook) gets a
    cached copy instead of a per-call transfer.
    """

    __slots__ = ("base", "copies")

    def __init__(self, base: torch.Tensor, device: torch.device, dtype: torch.dtype) -> None:
        self.base = base
        self.copies: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {
            (device, dtype): base.to(device=device, dtype=dtype)
        }

    def on(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.device, x.dtype)
        found = self.copies.get(key)
        if found is None:
            found = self.copies[key] = self.base.to(device=x.device, dtype=x.dtype)
        return found

    @property
    def places(self) -> list[tuple[torch.device, torch.dtype]]:
        return list(self.copies)


class Op:
    """One spec's action at one site: ``x ← x + m·delta(x)`` gated by phase and rows."""

    def __init__(self, positions: str, rows: _Placed | None, label: str,
                 *placed: _Placed) -> None:
        self.positions, self.rows, self.label, self.placed = positions, rows, label, placed

    def tensors(self) -> list[_Placed]:
        return list(self.placed)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, phase: str) -> torch.Tensor:
        if self.positions != "all" and self.positions != phase:
            return x
        change = self.delta(x)
        if self.rows is not None:
            mask = self.rows.on(x)
            if mask.shape[0] != x.shape[0]:
                raise InterventionError(
                    f"row_mask has {mask.shape[0]} rows but the batch has {x.shape[0]}; give one "
                    "flag per batch row (and call select_rows when a loop drops finished rows)."
                )
            change = change * mask
        return x + change


class AddOp(Op):
    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.placed[0].on(x).expand_as(x)


class ProjectOp(Op):
    def delta(self, x: torch.Tensor) -> torch.Tensor:
        v = self.placed[0].on(x)
        return -(x @ v).unsqueeze(-1) * v

    def __call__(self, x: torch.Tensor, phase: str) -> torch.Tensor:
        if self.rows is None and (self.positions == "all" or self.positions == phase):
            v = self.placed[0].on(x)
            return x - (x @ v).unsqueeze(-1) * v  # the hot path: two small kernels
        return super().__call__(x, phase)


class SubspaceOp(Op):
    def delta(self, x: torch.Tensor) -> torch.Tensor:
        basis, basis_t = self.placed
        return -((x @ basis.on(x)) @ basis_t.on(x))


# -- compilers ---------------------------------------------------------------------------------
class Sites(Protocol):
    """Where a compiler puts its ops (the steering plan)."""

    def add_op(self, lm: LoadedModel, kind: str, layer: int, make: Callable[..., Op],
               label: str, positions: str, **tensors: torch.Tensor) -> None: ...


S = TypeVar("S")
Compiler = Callable[[S, "LoadedModel", Sites, str], None]
COMPILERS: dict[type, Compiler[Any]] = {}
"""The compile function of each spec type."""


def register_compiler(spec_type: type[S]) -> Callable[[Compiler[S]], Compiler[S]]:
    """Decorator: ``fn(spec, lm, sites, label)`` adds the ops of a resolved ``spec_type``."""

    def add(fn: Compiler[S]) -> Compiler[S]:
        COMPILERS[spec_type] = fn
        return fn

    return add


def compile_specs(lm: LoadedModel, specs: list[Spec], sites: Sites) -> None:
    """Turn resolved specs into per-site ops, every tensor already on its site's place."""
    for index, spec in enumerate(specs):
        compiler = COMPILERS.get(type(spec))
        if compiler is None:
            raise InterventionError(f"No compiler is registered for {type(spec).__name__}; "
                                    "add one with @register_compiler.")
        compiler(spec, lm, sites, f"{index}:{op_of(spec)}")


def _vector(direction: Direction, layer: int | None, why: str) -> torch.Tensor:
    try:
        return direction.vector(layer).detach().to("cpu", torch.float32)
    except DirectionError as exc:
        raise InterventionError(f"{why}: {exc}") from exc


def _unit(vec: torch.Tensor, name: str) -> torch.Tensor:
    norm = vec.norm()
    if not torch.isfinite(norm) or float(norm) < 1e-12:
        raise InterventionError(
            f"Direction {name!r} has a zero or non-finite vector; cannot use its unit vector."
        )
    return vec / norm


def orthonormal_basis(vectors: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """Orthonormal basis ``[d, k]`` of the rows of ``vectors`` by QR; dependent rows dropped."""
    mat = vectors.to(torch.float64).T
    q, r = torch.linalg.qr(mat)
    diag = r.diagonal().abs()
    keep = diag > tol * float(diag.max().clamp_min(1e-30))
    if not bool(keep.any()):
        raise InterventionError("The subspace directions are all zero; nothing to ablate.")
    return q[:, keep].to(torch.float32)


def _per_layer(spec: Add | Project, lm: LoadedModel) -> Iterator[tuple[int, torch.Tensor]]:
    """Each target layer with the vector it gets: its own, or the ``source_layer``'s."""
    assert isinstance(spec.direction, Direction)
    op = op_of(spec)
    for layer in resolve_layers(spec.layers, lm.n_layers):
        src = layer if spec.source_layer is None else spec.source_layer
        yield layer, _vector(spec.direction, src, f"{op} at layer {layer} uses layer {src}'s "
                             "vector (give source_layer, DIR[L] in the compact form, to use "
                             "one layer's)")


@register_compiler(Add)
def _add(spec: Add, lm: LoadedModel, sites: Sites, label: str) -> None:
    d = spec.direction
    assert isinstance(d, Direction)
    for layer, vec in _per_layer(spec, lm):
        if spec.scale == "unit":
            vec = _unit(vec, d.meta.name)
        elif spec.scale == "mean_norm":
            vec = _unit(vec, d.meta.name) * _mean_norm(d, layer)
        sites.add_op(lm, "output", layer, AddOp, label, spec.positions, vector=spec.alpha * vec)


@register_compiler(Ablate)
def _ablate(spec: Ablate, lm: LoadedModel, sites: Sites, label: str) -> None:
    d = spec.direction
    assert isinstance(d, Direction)
    targets = resolve_layers(spec.layers, lm.n_layers)
    unit = _unit(_vector(d, spec.source_layer, "ablate needs one vector"), d.meta.name)
    for layer in targets:
        for kind in spec.sites:
            sites.add_op(lm, kind, layer, ProjectOp, label, spec.positions, unit=unit)


@register_compiler(SubspaceAblate)
def _subspace(spec: SubspaceAblate, lm: LoadedModel, sites: Sites, label: str) -> None:
    targets = resolve_layers(spec.layers, lm.n_layers)
    basis_layers = "all" if spec.source_layers is None else parse_layers(spec.source_layers)
    src_layers: tuple[int | None, ...] = (None,) if basis_layers == "all" else basis_layers
    rows: list[torch.Tensor] = []
    for d in spec.directions:
        assert isinstance(d, Direction)
        rows.extend(_vector(d, s, "subspace basis") for s in src_layers)
    basis = orthonormal_basis(torch.stack(rows))
    for layer in targets:
        for kind in spec.sites:
            sites.add_op(lm, kind, layer, SubspaceOp, label, spec.positions,
                         basis=basis, basis_t=basis.T.contiguous())


@register_compiler(Project)
def _project(spec: Project, lm: LoadedModel, sites: Sites, label: str) -> None:
    d = spec.direction
    assert isinstance(d, Direction)
    for layer, vec in _per_layer(spec, lm):
        sites.add_op(lm, "output", layer, ProjectOp, label, spec.positions,
                     unit=_unit(vec, d.meta.name))


def _mean_norm(direction: Direction, layer: int) -> float:
    norms = direction.meta.extra.get(MEAN_NORMS_KEY) or {}
    value = norms.get(str(layer), norms.get(layer)) if isinstance(norms, dict) else None
    if value is None:
        raise InterventionError(
            f"scale='mean_norm' needs the mean activation norm at layer {layer}, which direction "
            f"{direction.meta.name!r} does not carry; make it with "
            "steerlab.interventions.steering.with_mean_norms(direction, lm, prompts) "
            "(or use scale='unit')."
        )
    return float(value)


