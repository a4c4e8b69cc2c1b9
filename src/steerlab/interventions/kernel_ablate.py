"""``KernelAblate``: a weighted ablation whose strength varies smoothly over layers.

This is the intervention ``steerlab abliterate`` searches over, kept as an
ordinary spec so its result works wherever a spec does (``--steer``, serve,
sweep, orthogonalize, the exports). It differs from :class:`Ablate` in three ways:

- the direction comes from a *fractional* layer index ``source``: the unit
  vectors of the two neighbouring layers are interpolated linearly, so the
  search can move between layers smoothly;
- ``rank > 1`` removes a subspace instead: the interpolated vector plus the
  unit vectors of the ``rank - 1`` layers nearest ``source`` other than the two
  it interpolates, orthonormalised
  by QR;
- each layer's attention output and MLP output get their own weight ``w``,
  ``x ← x − w·QQᵀx``, read off a tent kernel
  ``w(ℓ) = floor + (peak − floor)·max(0, 1 − |ℓ − center| / width)``
  (``width = 0``: only the nearest layer to ``center`` gets ``peak``).

Because every write is linear, the same weights edited into ``o_proj`` and
``down_proj`` (``W ← W − w·QQᵀW``) give the same model with no hooks.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from steerlab.directions.artifact import Direction
from steerlab.errors import InterventionError
from steerlab.interventions.compilers import Sites, SubspaceOp, register_compiler
from steerlab.interventions.spec_types import spec_op

if TYPE_CHECKING:
    from steerlab.model.loading import LoadedModel

KERNEL_SITES = ("attn", "mlp")
"""The residual writers a kernel weighs: attention output and MLP output."""


@dataclass(frozen=True)
class Kernel:
    """Ablation weight over layers: a tent of height ``peak`` at ``center`` (a fractional
    layer), falling to ``floor`` at distance ``width`` and staying at ``floor`` beyond."""

    peak: float
    center: float
    width: float
    floor: float = 0.0

    def __post_init__(self) -> None:
        for name in ("peak", "center", "width", "floor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                    or not math.isfinite(float(value)):
                raise InterventionError(f"Kernel {name} must be a finite number; got {value!r}.")
            object.__setattr__(self, name, float(value))
        if self.width < 0:
            raise InterventionError(f"Kernel width must be ≥ 0; got {self.width}.")
        if self.center < 0:
            raise InterventionError(f"Kernel center is a layer index ≥ 0; got {self.center}.")

    def weight(self, layer: int) -> float:
        """The ablation weight at ``layer``."""
        distance = abs(layer - self.center)
        if self.width == 0:
            shape = 1.0 if distance < 0.5 else 0.0
        else:
            shape = max(0.0, 1.0 - distance / self.width)
        return self.floor + (self.peak - self.floor) * shape

    def weights(self, n_layers: int) -> list[float]:
        """One weight per layer of a model with ``n_layers`` layers."""
        return [self.weight(layer) for layer in range(n_layers)]

    def to_list(self) -> list[float]:
        return [self.peak, self.center, self.width, self.floor]


def _kernel(value: Any, what: str) -> tuple[float, ...]:
    """A kernel given as a Kernel, a mapping or [peak, center, width(, floor)], checked and
    stored as the 4-tuple the JSON form writes."""
    if isinstance(value, Kernel):
        return tuple(value.to_list())
    if isinstance(value, dict):
        try:
            return tuple(Kernel(**value).to_list())
        except TypeError as exc:
            raise InterventionError(f"Malformed {what} kernel {value!r}: {exc}.") from exc
    if isinstance(value, list | tuple) and len(value) in (3, 4):
        return tuple(Kernel(*value).to_list())
    raise InterventionError(
        f"The {what} kernel must be [peak, center, width, floor] or a Kernel; got {value!r}."
    )


@spec_op("kernel_ablate")
@dataclass(frozen=True)
class KernelAblate:
    """Ablate a (sub)space at each layer's attention and MLP outputs with kernel weights.

    ``direction`` is a per-layer direction (a folder, a name, or a Direction
    with a vector at every layer the source touches); ``source`` the
    fractional layer the vector is taken from; ``attn``/``mlp`` the two
    kernels ([peak, center, width, floor] in JSON).

    Example:
        >>> KernelAblate("runs/abl/direction", 14.5, [1.0, 14, 6, 0.1], [0.8, 12, 4, 0])
        ... # doctest: +SKIP
    """

    direction: Any
    source: float
    attn: Any
    mlp: Any
    rank: int = 1
    positions: str = "all"

    def __post_init__(self) -> None:
        ref = self.direction
        if not isinstance(ref, Direction | str) or (isinstance(ref, str) and not ref.strip()):
            raise InterventionError(
                "The kernel_ablate direction must be a Direction, a direction folder path or a "
                f"registered name; got {type(ref).__name__}."
            )
        if isinstance(self.source, bool) or not isinstance(self.source, numbers.Real) \
                or not math.isfinite(float(self.source)) or float(self.source) < 0:
            raise InterventionError(
                f"kernel_ablate source is a (fractional) layer index ≥ 0; got {self.source!r}."
            )
        object.__setattr__(self, "source", float(self.source))
        object.__setattr__(self, "attn", _kernel(self.attn, "attn"))
        object.__setattr__(self, "mlp", _kernel(self.mlp, "mlp"))
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise InterventionError(
                f"kernel_ablate rank must be an integer ≥ 1; got {self.rank!r}.")
        if self.positions not in ("all", "prompt", "generated"):
            raise InterventionError(
                f"Unknown positions {self.positions!r}; choose one of all, prompt, generated."
            )

    @property
    def layers(self) -> Literal["all"]:
        """Every layer may be hooked (the kernels decide the weights)."""
        return "all"

    def kernel(self, site: str) -> Kernel:
        """The ``attn`` or ``mlp`` kernel."""
        return Kernel(*(self.attn if site == "attn" else self.mlp))

    def site_weights(self, n_layers: int) -> dict[str, list[float]]:
        """``{"attn": [w per layer], "mlp": [...]}`` on a model with ``n_layers`` layers."""
        return {site: self.kernel(site).weights(n_layers) for site in KERNEL_SITES}

    def layers_used(self, direction: Direction) -> tuple[int, int, list[int]]:
        """(lower, upper neighbour of ``source``, extra basis layers) among the direction's
        layers; a direction cut down to these layers gives the same basis."""
        layers = sorted(direction.layers)
        if not layers[0] <= self.source <= layers[-1]:
            raise InterventionError(
                f"kernel_ablate source {self.source:g} is outside the direction's layers "
                f"{layers[0]}-{layers[-1]}; give a source within them."
            )
        lo = max(layer for layer in layers if layer <= self.source)
        hi = min(layer for layer in layers if layer >= self.source)
        nearest = sorted(layers, key=lambda layer: (abs(layer - self.source), layer))
        return lo, hi, [layer for layer in nearest if layer not in (lo, hi)][:self.rank - 1]

    def basis(self, direction: Direction) -> torch.Tensor:
        """Orthonormal basis ``[d, k]`` of the ablated (sub)space read from ``direction``."""
        lo, hi, extra = self.layers_used(direction)
        t = 0.0 if hi == lo else (self.source - lo) / (hi - lo)
        rows = [(1 - t) * _unit(direction, lo) + t * _unit(direction, hi)]
        rows.extend(_unit(direction, layer) for layer in extra)
        mat = torch.stack(rows).to(torch.float64).T
        q, r = torch.linalg.qr(mat)
        keep = r.diagonal().abs() > 1e-6 * float(r.diagonal().abs().max().clamp_min(1e-30))
        if not bool(keep.any()):
            raise InterventionError("The kernel_ablate direction is zero; nothing to ablate.")
        return q[:, keep].to(torch.float32)


@register_compiler(KernelAblate)
def _compile(spec: KernelAblate, lm: LoadedModel, sites: Sites, label: str) -> None:
    """``x ← x − w·QQᵀx`` at each attention / MLP output whose kernel weight is not 0."""
    assert isinstance(spec.direction, Direction)
    basis = spec.basis(spec.direction)
    for kind, weights in spec.site_weights(lm.n_layers).items():
        for layer, weight in enumerate(weights):
            if weight != 0.0:
                sites.add_op(lm, kind, layer, SubspaceOp, label, spec.positions,
                             basis=basis, basis_t=weight * basis.T.contiguous())


def _unit(direction: Direction, layer: int) -> torch.Tensor:
    vec = direction.vector(layer).detach().to("cpu", torch.float64)
    norm = float(vec.norm())
    if not math.isfinite(norm) or norm < 1e-12:
        raise InterventionError(
            f"Direction {direction.meta.name!r} has a zero vector at layer {layer}."
        )
    return vec / norm


__all__ = ["KERNEL_SITES", "Kernel", "KernelAblate"]
