"""Resolving a spec's direction references: registered names, direction folders and
``random_like(REF, SEED[, orthogonal])`` random controls."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from steerlab.directions.artifact import Direction
from steerlab.errors import DirectionError, InterventionError
from steerlab.interventions.limits import check_seed
from steerlab.interventions.spec_types import DirectionRef, Spec, op_of, spec_refs, with_refs

if TYPE_CHECKING:
    from steerlab.model.loading import LoadedModel

_RANDOM = re.compile(r"^random_like\((.+?),\s*(-?\d+)\s*(?:,\s*(orthogonal|orth)\s*)?\)$")


def random_like(direction: Direction, seed: int, orthogonal: bool = False) -> Direction:
    """A random direction with each layer's norm matched to ``direction``'s.

    Each layer's vector comes from its own generator seeded by ``(seed,
    layer)``, so selecting layers before or after gives the same vectors.
    With ``orthogonal=True`` each vector is also orthogonal to the original
    one at its layer (the usual control: same norm, no shared component).

    Example:
        >>> d = Direction(torch.randn(2, 16), layers=(3, 4))
        >>> r = random_like(d, seed=0, orthogonal=True)
        >>> abs(float(r.vector(3) @ d.vector(3))) < 1e-4
        True
    """
    seed = check_seed(seed)
    vectors = []
    for layer, vec in zip(direction.layers, direction.vectors, strict=True):
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(layer) + 17)
        rand = torch.randn(direction.d_model, generator=gen, dtype=torch.float64)
        ref = vec.detach().to("cpu", torch.float64)
        if orthogonal:
            unit = ref / ref.norm().clamp_min(1e-12)
            rand = rand - (rand @ unit) * unit
        rand = rand / rand.norm().clamp_min(1e-12) * ref.norm()
        vectors.append(rand.to(vec.dtype))
    meta = dataclasses.replace(
        direction.meta,
        name=f"random_like({direction.meta.name},{seed}{',orthogonal' if orthogonal else ''})",
        kind="random",
        extra={**direction.meta.extra, "random_of": direction.meta.name, "seed": int(seed),
               "orthogonal": bool(orthogonal)},
    )
    return Direction(torch.stack(vectors).to(direction.vectors.device), direction.layers, meta)


class DirectionRegistry:
    """Directions known by name, so a spec can say ``add:persona@12:4`` without a path.

    The server builds one from its configuration and resolves request specs
    with ``allow_paths=False``: requests can then only name directions it
    registered, never read files. Entries are Directions or folder paths
    (loaded once, on first use).

    Example:
        >>> reg = DirectionRegistry({"persona": "runs/persona"})   # doctest: +SKIP
        >>> resolve_specs([Add("persona", 4.0, 12)], names=reg, allow_paths=False)  # doctest: +SKIP
    """

    def __init__(self, entries: Mapping[str, Direction | str | Path] | None = None) -> None:
        self._entries: dict[str, Direction | str | Path] = {}
        for name, value in (entries or {}).items():
            self.register(name, value)

    def register(self, name: str, direction: Direction | str | Path) -> None:
        """Add or replace the direction called ``name``."""
        if not name or not isinstance(name, str):
            raise InterventionError("A registered direction needs a non-empty string name.")
        self._entries[name] = direction

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str, lm: LoadedModel | None = None, *,
            allow_mismatch: bool = False) -> Direction:
        """The direction called ``name`` (a registered path is loaded and cached)."""
        if name not in self._entries:
            known = ", ".join(self.names()) or "none"
            raise InterventionError(f"No direction named {name!r} is registered (known: {known}).")
        value = self._entries[name]
        if not isinstance(value, Direction):
            value = Direction.load(value, lm, allow_mismatch=allow_mismatch)
            self._entries[name] = value
        return value


def resolve_direction(
    ref: DirectionRef,
    *,
    names: DirectionRegistry | Mapping[str, Direction] | None = None,
    allow_paths: bool = True,
    lm: LoadedModel | None = None,
    allow_mismatch: bool = False,
) -> Direction:
    """Turn a reference into a Direction: a registered name first, then a folder path.

    ``random_like(REF, SEED)`` and ``random_like(REF, SEED, orthogonal)`` wrap
    any reference in a random control (:func:`random_like`).
    """
    if isinstance(ref, Direction):
        return ref
    text = ref.strip()
    match = _RANDOM.match(text)
    if match:
        base = resolve_direction(match.group(1).strip(), names=names, allow_paths=allow_paths,
                                 lm=lm, allow_mismatch=allow_mismatch)
        return random_like(base, check_seed(match.group(2)), orthogonal=match.group(3) is not None)
    if names is not None and text in names:
        if isinstance(names, DirectionRegistry):
            return names.get(text, lm, allow_mismatch=allow_mismatch)
        return names[text]
    known = ", ".join(sorted(names.names() if isinstance(names, DirectionRegistry)
                             else (names or {})))
    if not allow_paths:
        raise InterventionError(
            f"Unknown direction name {text!r}; here directions can only be named, not read "
            f"from paths. Registered names: {known or 'none'}."
        )
    if not Path(text).expanduser().exists():
        raise InterventionError(
            f"Direction {text!r} is neither a registered name ({known or 'none registered'}) nor "
            "an existing direction folder; check the path (make one with `steerlab extract`)."
        )
    return Direction.load(Path(text).expanduser(), lm, allow_mismatch=allow_mismatch)


def resolve_specs(
    specs: Spec | Iterable[Spec],
    *,
    names: DirectionRegistry | Mapping[str, Direction] | None = None,
    allow_paths: bool = True,
    lm: LoadedModel | None = None,
    allow_mismatch: bool = False,
) -> list[Spec]:
    """The same specs with every direction reference replaced by a loaded Direction.

    Each distinct reference is loaded once. With ``lm``, directions are
    checked against the model (d_model, layer count, fingerprint).
    """
    items = [specs] if dataclasses.is_dataclass(specs) else list(specs)  # type: ignore[arg-type]
    cache: dict[str, Direction] = {}

    def one(ref: DirectionRef) -> Direction:
        if isinstance(ref, Direction):
            if lm is not None:
                _check_shape(ref, lm)
            return ref
        if ref not in cache:
            cache[ref] = resolve_direction(ref, names=names, allow_paths=allow_paths, lm=lm,
                                           allow_mismatch=allow_mismatch)
            if lm is not None:
                _check_shape(cache[ref], lm)
        return cache[ref]

    for spec in items:
        op_of(spec)  # only registered spec types
    return [with_refs(spec, (one(r) for r in spec_refs(spec))) for spec in items]


def _check_shape(direction: Direction, lm: LoadedModel) -> None:
    """Width and layer count only: a fingerprint is checked (and warned about) when loaded."""
    if direction.d_model != lm.d_model or max(direction.layers) >= lm.n_layers:
        try:
            direction.check_compatible(lm, allow_mismatch=True)
        except DirectionError as exc:
            raise InterventionError(str(exc)) from exc
