"""Layer specs: ``"all"``, ``12``, ``"12-18"``, ``"3,5-7"`` or a list, parsed once and checked
against a model. Every command and spec reads layers through these functions."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Literal, TypeAlias, overload

from steerlab.errors import LayerError

Layers: TypeAlias = Literal["all"] | tuple[int, ...]
"""A parsed layer spec: every layer, or sorted distinct layer numbers."""
LayersLike: TypeAlias = Layers | str | int | Iterable[int] | None
"""What a layer spec may be written as; :func:`parse_layers` turns it into :data:`Layers`."""

MAX_LAYERS = 1024
"""Layer numbers must stay below this when the model's layer count is not known: it keeps a
typo such as ``"0-99999999999"`` from being expanded into billions of layers."""
_RANGE = re.compile(r"^(\d+)\s*-\s*(\d+)$")


@overload
def parse_layers(value: LayersLike) -> Layers: ...


@overload
def parse_layers(value: LayersLike, n_layers: int) -> tuple[int, ...]: ...


def parse_layers(value: LayersLike, n_layers: int | None = None) -> Layers:
    """Normalise a layer spec to ``"all"`` or a sorted tuple (ranges are inclusive).
    With ``n_layers``, ``"all"`` is expanded and every layer checked to exist; a range is
    checked against ``n_layers`` (or :data:`MAX_LAYERS`) before it is expanded.

    Example:
        >>> parse_layers("3,5-7")
        (3, 5, 6, 7)
        >>> parse_layers("all", 4)
        (0, 1, 2, 3)
    """
    parsed = _parse(value, n_layers)
    return parsed if n_layers is None else resolve_layers(parsed, n_layers)


def _range_limit_error(part: str, n_layers: int | None) -> LayerError:
    if n_layers is not None:
        return LayerError(
            f"Layer range {part!r} goes past the last layer: the model has {n_layers} layers "
            f"(0-{n_layers - 1}); give a range within them, e.g. '0-{n_layers - 1}'."
        )
    return LayerError(
        f"Layer range {part!r} is larger than any model: layer numbers must be below "
        f"{MAX_LAYERS} (0-{MAX_LAYERS - 1}); give a range within the model's layers, "
        "e.g. '12-18'."
    )


def _parse(value: LayersLike, n_layers: int | None) -> Layers:
    if value is None or (isinstance(value, str) and value.strip().lower() == "all"):
        return "all"
    if isinstance(value, bool):
        raise LayerError(f"Layer spec {value!r} is a bool; give 'all', 12, '12-18' or '3,5,7'.")
    if isinstance(value, int):
        items: list[int] = [value]
    elif isinstance(value, str):
        items = []
        for part in value.split(","):
            part = part.strip()
            match = _RANGE.match(part)
            if match:
                lo, hi = int(match.group(1)), int(match.group(2))
                if hi < lo:
                    raise LayerError(
                        f"Layer range {part!r} runs backwards; write it low-high, e.g. {hi}-{lo}."
                    )
                if hi >= (n_layers if n_layers is not None else MAX_LAYERS):
                    raise _range_limit_error(part, n_layers)
                items.extend(range(lo, hi + 1))
            elif part.isdigit():
                items.append(int(part))
            else:
                raise LayerError(
                    f"Cannot read layers {value!r}: {part!r} is not a layer number or a range. "
                    "Use 'all', '12', '12-18' (inclusive) or '3,5,7'."
                )
    else:
        try:
            items = [int(x) for x in value]
        except (TypeError, ValueError) as exc:
            raise LayerError(f"Cannot read layers {value!r}: {exc}.") from exc
    if not items:
        raise LayerError("The layer list is empty; give 'all' or at least one layer.")
    if min(items) < 0:
        raise LayerError(f"Layer numbers count from 0; got {min(items)} in {value!r}.")
    return tuple(sorted(set(items)))


def resolve_layers(layers: LayersLike, n_layers: int) -> tuple[int, ...]:
    """The concrete, sorted layer indices of ``layers`` on a model with ``n_layers`` layers:
    ``"all"``/None is every layer; in a list, a negative number counts from the end."""
    if isinstance(layers, str | int):
        layers = _parse(layers, n_layers)
    if layers is None or layers == "all":
        return tuple(range(n_layers))
    items = [int(i) for i in layers]
    bad = [i for i in items if not -n_layers <= i < n_layers]
    if bad:
        raise LayerError(f"Layers {bad} do not exist (out of range): the model has {n_layers} "
                         f"layers (0-{n_layers - 1}).")
    if not items:
        raise LayerError("No layers chosen; give at least one layer, or 'all'.")
    return tuple(sorted({i % n_layers for i in items}))


def format_layers(layers: Layers) -> str:
    """The shortest text form of a parsed layer spec (inverse of :func:`parse_layers`)."""
    if layers == "all":
        return "all"
    parts: list[str] = []
    start = prev = layers[0]
    for i in (*layers[1:], None):
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(parts)
