"""Intervention specs: *what* to do to the residual stream, *where* and *when*, as frozen values
that can be saved, swept, sent to a server and compared;
:func:`steerlab.interventions.steering.steer` applies them. A direction is a
:class:`~steerlab.directions.artifact.Direction` or a string resolved later
(:mod:`steerlab.interventions.spec_resolution`). A new kind is a frozen dataclass decorated with
:func:`spec_op` plus a compiler registered in :mod:`steerlab.interventions.compilers`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeAlias, TypeVar

from steerlab.directions.artifact import Direction
from steerlab.errors import InterventionError
from steerlab.interventions.layer_spec import LayersLike, parse_layers
from steerlab.interventions.limits import check_alpha

DirectionRef: TypeAlias = "Direction | str"

POSITIONS = ("all", "prompt", "generated")
SCALES = ("raw", "unit", "mean_norm")
SITES = ("input", "attn", "mlp", "output")
DEFAULT_ABLATE_SITES = ("input", "attn", "mlp")


class Spec(Protocol):
    """Any intervention spec: a frozen dataclass registered with :func:`spec_op`."""

    __dataclass_fields__: ClassVar[dict[str, Any]]

    @property
    def positions(self) -> str: ...


SPEC_TYPES: dict[str, type] = {}
"""Registered spec types by their ``op`` name (JSON ``"op"`` and the compact form's prefix)."""
_OP_OF: dict[type, str] = {}
T = TypeVar("T", bound=type)


def spec_op(op: str) -> Callable[[T], T]:
    """Class decorator registering a spec type under ``op`` for the JSON/YAML syntax."""

    def add(cls: T) -> T:
        SPEC_TYPES[op] = cls
        _OP_OF[cls] = op
        return cls

    return add


def op_of(spec: object) -> str:
    """The registered ``op`` name of a spec, or an error for anything else."""
    op = _OP_OF.get(type(spec))
    if op is None:
        raise InterventionError(
            f"Not an intervention spec: {type(spec).__name__}; use one of "
            f"{', '.join(cls.__name__ for cls in SPEC_TYPES.values())} (or parse_steer for text)."
        )
    return op


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise InterventionError(f"Unknown {what} {value!r}; choose one of {', '.join(choices)}.")


def _check_ref(ref: object) -> None:
    if not isinstance(ref, Direction | str) or (isinstance(ref, str) and not ref.strip()):
        raise InterventionError(
            "The direction must be a Direction, a direction folder path or a registered name; "
            f"got {type(ref).__name__}."
        )


def _check_common(spec: Any, *, source: bool = True) -> None:
    """Parse ``layers`` in place and check ``positions`` (and ``source_layer``)."""
    object.__setattr__(spec, "layers", parse_layers(spec.layers))
    _check_choice(spec.positions, POSITIONS, "positions")
    value = getattr(spec, "source_layer", None) if source else None
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise InterventionError(f"source_layer must be a layer number ≥ 0 or None; got {value!r}.")


def _parse_sites(sites: str | Iterable[str]) -> tuple[str, ...]:
    items = (sites,) if isinstance(sites, str) else tuple(sites)
    if not items:
        raise InterventionError(
            f"Ablation needs at least one site; choose from {', '.join(SITES)}."
        )
    for site in items:
        _check_choice(site, SITES, "ablation site")
    return tuple(dict.fromkeys(items))


@spec_op("add")
@dataclass(frozen=True)
class Add:
    """Activation addition ``x ← x + α·v`` at the output of each layer in ``layers``.

    ``source_layer=None`` adds each target layer's own vector; an int adds that layer's
    vector everywhere. ``scale``: ``raw`` (as extracted), ``unit`` (α is a norm),
    ``mean_norm`` (α is a fraction of the layer's mean activation norm, from
    ``meta.extra["mean_norms"]``; see :func:`steerlab.interventions.steering.with_mean_norms`).

    Example:
        >>> Add("runs/persona", 4.0, layers=12)   # doctest: +SKIP
    """

    direction: DirectionRef
    alpha: float
    layers: LayersLike = "all"
    positions: str = "all"
    source_layer: int | None = None
    scale: str = "raw"

    def __post_init__(self) -> None:
        _check_ref(self.direction)
        object.__setattr__(self, "alpha", check_alpha(self.alpha))
        _check_common(self)
        _check_choice(self.scale, SCALES, "scale")


@spec_op("ablate")
@dataclass(frozen=True)
class Ablate:
    """Directional ablation ``x ← x − (x·v̂)v̂`` at every hooked site of ``layers``.

    Sites (default ``input``, ``attn``, ``mlp``): each layer's input and the outputs of the
    modules that write attention and MLP results into the residual. ``source_layer=None``
    uses the direction's best (or only) layer, following Arditi et al.
    """

    direction: DirectionRef
    layers: LayersLike = "all"
    source_layer: int | None = None
    positions: str = "all"
    sites: str | Iterable[str] = DEFAULT_ABLATE_SITES

    def __post_init__(self) -> None:
        _check_ref(self.direction)
        _check_common(self)
        object.__setattr__(self, "sites", _parse_sites(self.sites))


@spec_op("subspace")
@dataclass(frozen=True)
class SubspaceAblate:
    """Remove a whole subspace: orthonormal basis by QR of the stacked vectors.

    The basis holds each direction's vectors at ``source_layers`` (``None``: its best or
    only layer), applied at the same sites as :class:`Ablate`, at ``layers``.
    """

    directions: tuple[DirectionRef, ...]
    layers: LayersLike = "all"
    source_layers: LayersLike = None
    positions: str = "all"
    sites: str | Iterable[str] = DEFAULT_ABLATE_SITES

    def __post_init__(self) -> None:
        refs = self.directions
        dirs = (refs,) if isinstance(refs, Direction | str) else tuple(refs)
        if not dirs:
            raise InterventionError("SubspaceAblate needs at least one direction.")
        for ref in dirs:
            _check_ref(ref)
        object.__setattr__(self, "directions", dirs)
        _check_common(self, source=False)
        if self.source_layers is not None:
            src = parse_layers(self.source_layers)
            if src == "all":
                raise InterventionError(
                    "SubspaceAblate source_layers must list layers (e.g. '7-10'), not 'all'."
                )
            object.__setattr__(self, "source_layers", src)
        object.__setattr__(self, "sites", _parse_sites(self.sites))


@spec_op("project")
@dataclass(frozen=True)
class Project:
    """Project v̂ out of the outputs of the layers in a window, and nowhere else.
    ``source_layer=None`` uses each window layer's own vector."""

    direction: DirectionRef
    layers: LayersLike = "all"
    source_layer: int | None = None
    positions: str = "all"

    def __post_init__(self) -> None:
        _check_ref(self.direction)
        _check_common(self)


def spec_refs(spec: Spec) -> tuple[DirectionRef, ...]:
    """The direction references a spec uses (its ``directions``, or its one ``direction``)."""
    found = getattr(spec, "directions", None)
    return tuple(found) if found is not None else (spec.direction,)  # type: ignore[attr-defined]


def with_refs(spec: Spec, refs: Iterable[DirectionRef]) -> Spec:
    """The same spec with its direction references replaced, in :func:`spec_refs` order."""
    new = tuple(refs)
    if hasattr(spec, "directions"):
        return dataclasses.replace(spec, directions=new)
    return dataclasses.replace(spec, direction=new[0])
