"""Per-request steering: from the request's ``steer`` items to intervention specs.

Items name directions registered when the server started (or
``random_like(NAME, SEED)`` controls of them); they are resolved with
``allow_paths=False``, so nothing in a request can make the server read a
file. Every check that can fail is done here, at request time, so a bad spec
is a 422 naming its field rather than a failed batch. Each resolved steering
has a canonical key (requests with equal keys are batched together) and a
short hash (written to the access log).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import steerlab.interventions.specs as iv
from steerlab.directions.artifact import Direction
from steerlab.errors import SteerlabError
from steerlab.interventions.specs import (
    KernelAblate,
    parse_layers,
    resolve_direction,
    specs_to_json,
)
from steerlab.serve.schemas import (
    RequestError,
    SteerAblate,
    SteerAdd,
    SteerItem,
    SteerKernelAblate,
    SteerProject,
    SteerSubspace,
)

T = TypeVar("T")


@dataclass(frozen=True)
class ResolvedSteer:
    """Steering for one request: intervention specs plus its grouping key and log hash."""

    specs: tuple[Any, ...]
    key: str
    hash: str


NO_STEER = ResolvedSteer((), "none", "none")


def spec_hash(canonical: str) -> str:
    """Short stable hash of a canonical steering description (for logs and grouping)."""
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def _field(param: str, fn: Callable[[], T]) -> T:
    """Run ``fn``; a SteerlabError becomes a 422 naming ``param``."""
    try:
        return fn()
    except RequestError:
        raise
    except SteerlabError as exc:
        raise RequestError(param, str(exc)) from None


def _has(direction: Direction, name: str, layers: Sequence[int], param: str) -> None:
    missing = [x for x in layers if x not in direction.layers]
    if missing:
        raise RequestError(
            param,
            f"direction {name!r} has no vector for layer(s) {missing}; it has layers "
            f"{list(direction.layers)}.",
        )


def _default_source(direction: Direction, name: str, param: str) -> None:
    if direction.meta.best_layer is None and len(direction.layers) != 1:
        raise RequestError(
            param,
            f"direction {name!r} has {len(direction.layers)} layers and no best layer; set "
            "source_layer(s) to say which layer's vector to use.",
        )


class SteerRegistry:
    """The directions a server may use, by name, and its default steering."""

    def __init__(self, directions: Mapping[str, Direction], n_layers: int,
                 default: Sequence[Any] = ()) -> None:
        self.directions = dict(directions)
        self.n_layers = n_layers
        self.default = self._default(tuple(default))

    @property
    def names(self) -> list[str]:
        return sorted(self.directions)

    def _default(self, specs: tuple[Any, ...]) -> ResolvedSteer:
        if not specs:
            return NO_STEER

        digest = spec_hash(specs_to_json(list(specs), indent=None))
        return ResolvedSteer(specs, f"default:{digest}", f"default-{digest}")

    def resolve(self, items: Sequence[SteerItem] | None) -> ResolvedSteer:
        """``None`` -> the default steering; ``[]`` -> none; else validated specs."""
        if items is None:
            return self.default
        if not items:
            return NO_STEER
        canonical, specs = [], []
        for i, item in enumerate(items):
            spec = self._one(item, f"steer[{i}]")
            layers = spec.layers if isinstance(spec.layers, str) else list(spec.layers)
            canonical.append({**item.model_dump(), "layers": layers})
            specs.append(spec)
        text = json.dumps(canonical, sort_keys=True)
        return ResolvedSteer(tuple(specs), text, spec_hash(text))

    def _direction(self, name: str, param: str) -> Direction:
        return _field(param, lambda: resolve_direction(name, names=self.directions,
                                                       allow_paths=False))

    def _layers(self, value: Any, param: str) -> tuple[int, ...]:
        """Parse and range-check a layer spec against the model (``parse_layers`` refuses a
        range such as ``"0-99999999999"`` before expanding it)."""

        return _field(param, lambda: parse_layers(value, self.n_layers))

    def _kernel(self, item: SteerKernelAblate, param: str) -> Any:
        direction = self._direction(item.direction, f"{param}.direction")
        spec = _field(param, lambda: KernelAblate(direction, item.source, item.attn, item.mlp,
                                                  rank=item.rank, positions=item.positions))
        _field(f"{param}.source", lambda: spec.basis(direction))
        return spec

    def _one(self, item: SteerItem, param: str) -> Any:
        if isinstance(item, SteerKernelAblate):
            return self._kernel(item, param)
        layers = self._layers(item.layers, f"{param}.layers")
        if isinstance(item, SteerSubspace):
            dirs = [self._direction(n, f"{param}.directions[{k}]")
                    for k, n in enumerate(item.directions)]
            sources: tuple[int, ...] | None = None
            if isinstance(item.source_layers, str) and item.source_layers.strip() == "all":
                raise RequestError(f"{param}.source_layers", "list the basis layers (e.g. "
                                   "'7-10'), not 'all'.")
            if item.source_layers is not None:
                sources = self._layers(item.source_layers, f"{param}.source_layers")
            for d, name in zip(dirs, item.directions, strict=True):
                if sources is None:
                    _default_source(d, name, f"{param}.source_layers")
                else:
                    _has(d, name, sources, f"{param}.source_layers")
            extra = {"sites": tuple(item.sites)} if item.sites else {}
            return _field(param, lambda: iv.SubspaceAblate(
                tuple(dirs), layers=layers, source_layers=sources, positions=item.positions,
                **extra))
        direction = self._direction(item.direction, f"{param}.direction")
        name, source = item.direction, item.source_layer
        if source is not None:
            _field(f"{param}.source_layer", lambda: iv.resolve_layers((source,), self.n_layers))
            _has(direction, name, (source,), f"{param}.source_layer")
        if isinstance(item, SteerAblate):
            if source is None:
                _default_source(direction, name, f"{param}.source_layer")
            extra = {"sites": tuple(item.sites)} if item.sites else {}
            return _field(param, lambda: iv.Ablate(direction, layers=layers, source_layer=source,
                                                   positions=item.positions, **extra))
        if source is None:
            _has(direction, name, layers, f"{param}.layers")
        if isinstance(item, SteerProject):
            return _field(param, lambda: iv.Project(direction, layers=layers, source_layer=source,
                                                    positions=item.positions))
        assert isinstance(item, SteerAdd)
        if item.scale == "mean_norm":
            norms = direction.meta.extra.get("mean_norms") or {}
            missing = [x for x in layers if str(x) not in norms and x not in norms]
            if missing:
                raise RequestError(f"{param}.scale", f"direction {name!r} has no recorded mean "
                                   f"activation norm for layer(s) {missing}; use scale 'raw' or "
                                   "'unit'.")
        return _field(param, lambda: iv.Add(direction, item.alpha, layers=layers,
                                            positions=item.positions, source_layer=source,
                                            scale=item.scale))
