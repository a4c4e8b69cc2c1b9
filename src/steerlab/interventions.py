"""Intervention specs: *what* to do to the residual stream, *where* and *when*,
as frozen values that can be saved, swept, sent to a server and compared.

Applying a spec is :func:`steerlab.steering.steer`'s job; this module only
describes, validates, resolves and (de)serializes.

Four kinds, composed in order:

- :class:`Add`: ``x ← x + α·v`` at the output of the given layers;
- :class:`Ablate`: ``x ← x − (x·v̂)v̂`` at every hooked site (by default each
  layer's input and its attention and MLP writes into the residual: the
  Arditi et al. recipe, equal to weight orthogonalization);
- :class:`SubspaceAblate`: the same for an orthonormal basis (QR of the
  stacked vectors), removing the whole subspace;
- :class:`Project`: ``x ← x − (x·v̂)v̂`` at the outputs of the layers of a
  window only (e.g. the late-layer persona-gating restoration test).

A direction is a :class:`~steerlab.directions.Direction`, or a string
resolved lazily: a name in a :class:`DirectionRegistry`, a direction folder
(when paths are allowed), or ``random_like(REF, SEED[, orthogonal])``.

Compact form (``--steer`` on the command line), documented in docs/steering.md::

    OP:DIR[SRC]@LAYERS[:OPTION]...
    add:runs/persona@12:4.0            add 4.0·v₁₂ at layer 12's output
    ablate:runs/refusal[14]@all        ablate layer 14's vector everywhere
    project:runs/persona@16-23         project each layer's own v̂ out of 16..23
    subspace:runs/refusal@7-10         basis = layers 7..10's vectors, at all layers
    subspace:runs/refusal@7-10>12-20   the same basis, only at layers 12..20
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import numbers
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, overload

import torch

from steerlab.directions import Direction, DirectionMeta
from steerlab.errors import InterventionError
from steerlab.kernel_ablate import Kernel, KernelAblate

if TYPE_CHECKING:
    from steerlab.model import LoadedModel

DirectionRef: TypeAlias = "Direction | str"
Layers: TypeAlias = "Literal['all'] | tuple[int, ...]"

POSITIONS = ("all", "prompt", "generated")
SCALES = ("raw", "unit", "mean_norm")
SITES = ("input", "attn", "mlp", "output")
DEFAULT_ABLATE_SITES = ("input", "attn", "mlp")
SPEC_FORMAT_VERSION = 1

_RANGE = re.compile(r"^(\d+)\s*-\s*(\d+)$")
MAX_LAYERS = 1024
"""Layer numbers must stay below this when the model's layer count is not known (the
deepest open models have a few hundred layers); it keeps a typo such as ``"0-99999999999"``
from being expanded into a list of billions of layers."""
_RANDOM = re.compile(r"^random_like\((.+?),\s*(-?\d+)\s*(?:,\s*(orthogonal|orth)\s*)?\)$")


# -- layers ------------------------------------------------------------------------------------
@overload
def parse_layers(value: str | int | Iterable[int] | None) -> Literal["all"] | tuple[int, ...]: ...


@overload
def parse_layers(value: str | int | Iterable[int] | None, n_layers: int) -> tuple[int, ...]: ...


def parse_layers(
    value: str | int | Iterable[int] | None, n_layers: int | None = None
) -> Literal["all"] | tuple[int, ...]:
    """Normalise a layer spec: ``"all"``, ``12``, ``"12"``, ``"12-18"`` (inclusive),
    ``"3,5,7"``, ``"3,5-7"`` or a list of ints → ``"all"`` or a sorted tuple.
    With ``n_layers``, ``"all"`` is expanded and every layer checked to exist.
    A range is checked against ``n_layers`` (or :data:`MAX_LAYERS` when it is
    not known) before it is expanded.

    Example:
        >>> parse_layers("3,5-7")
        (3, 5, 6, 7)
        >>> parse_layers("all", 4)
        (0, 1, 2, 3)
    """
    parsed = _parse_layers(value, n_layers)
    return parsed if n_layers is None else resolve_layers(parsed, n_layers)


def _range_limit_error(part: str, n_layers: int | None) -> InterventionError:
    """The error for a range past the last layer, naming the range and the valid one."""
    if n_layers is not None:
        return InterventionError(
            f"Layer range {part!r} goes past the last layer: the model has {n_layers} layers "
            f"(0-{n_layers - 1}); give a range within them, e.g. '0-{n_layers - 1}'."
        )
    return InterventionError(
        f"Layer range {part!r} is larger than any model: layer numbers must be below "
        f"{MAX_LAYERS} (0-{MAX_LAYERS - 1}); give a range within the model's layers, "
        "e.g. '12-18'."
    )


def _parse_layers(
    value: str | int | Iterable[int] | None, n_layers: int | None = None
) -> Literal["all"] | tuple[int, ...]:
    if value is None or (isinstance(value, str) and value.strip().lower() == "all"):
        return "all"
    if isinstance(value, bool):
        raise InterventionError(
            f"Layer spec {value!r} is a bool; give 'all', 12, '12-18' or '3,5,7'."
        )
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
                    raise InterventionError(
                        f"Layer range {part!r} runs backwards; write it low-high, e.g. {hi}-{lo}."
                    )
                if hi >= (n_layers if n_layers is not None else MAX_LAYERS):
                    raise _range_limit_error(part, n_layers)
                items.extend(range(lo, hi + 1))
            elif part.isdigit():
                items.append(int(part))
            else:
                raise InterventionError(
                    f"Cannot read layers {value!r}: {part!r} is not a layer number or a range. "
                    "Use 'all', '12', '12-18' (inclusive) or '3,5,7'."
                )
    else:
        try:
            items = [int(x) for x in value]
        except (TypeError, ValueError) as exc:
            raise InterventionError(f"Cannot read layers {value!r}: {exc}.") from exc
    if not items:
        raise InterventionError("The layer list is empty; give 'all' or at least one layer.")
    if min(items) < 0:
        raise InterventionError(f"Layer numbers count from 0; got {min(items)} in {value!r}.")
    return tuple(sorted(set(items)))


def resolve_layers(layers: Literal["all"] | tuple[int, ...], n_layers: int) -> tuple[int, ...]:
    """The concrete layer indices of a parsed spec on a model with ``n_layers`` layers."""
    if layers == "all":
        return tuple(range(n_layers))
    bad = [i for i in layers if i >= n_layers]
    if bad:
        raise InterventionError(
            f"Layers {bad} do not exist: the model has {n_layers} layers (0-{n_layers - 1})."
        )
    return layers


def format_layers(layers: Literal["all"] | tuple[int, ...]) -> str:
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


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise InterventionError(f"Unknown {what} {value!r}; choose one of {', '.join(choices)}.")


def _check_ref(ref: object, what: str = "direction") -> None:
    if not isinstance(ref, Direction | str) or (isinstance(ref, str) and not ref.strip()):
        raise InterventionError(
            f"The {what} must be a Direction, a direction folder path or a registered name; "
            f"got {type(ref).__name__}."
        )


def _check_source(source: int | None) -> None:
    bad = isinstance(source, bool) or not isinstance(source, int) or source < 0
    if source is not None and bad:
        raise InterventionError(f"source_layer must be a layer number ≥ 0 or None; got {source!r}.")


# -- specs -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Add:
    """Activation addition ``x ← x + α·v`` at the output of each layer in ``layers``.

    ``source_layer=None`` adds each target layer's own vector; an int adds
    that layer's vector everywhere. ``scale``: ``raw`` (the vector as
    extracted), ``unit`` (α is a norm), ``mean_norm`` (α is a fraction of the
    layer's mean activation norm, read from ``meta.extra["mean_norms"]``; see
    :func:`steerlab.steering.with_mean_norms`).

    Example:
        >>> Add("runs/persona", 4.0, layers=12)   # doctest: +SKIP
    """

    direction: DirectionRef
    alpha: float
    layers: Any = "all"
    positions: str = "all"
    source_layer: int | None = None
    scale: str = "raw"

    def __post_init__(self) -> None:
        _check_ref(self.direction)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, numbers.Real):
            raise InterventionError(f"Add alpha must be a number; got {self.alpha!r}.")
        if not math.isfinite(float(self.alpha)):
            raise InterventionError(f"Add alpha must be finite; got {self.alpha!r}.")
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "layers", parse_layers(self.layers))
        _check_choice(self.positions, POSITIONS, "positions")
        _check_choice(self.scale, SCALES, "scale")
        _check_source(self.source_layer)


@dataclass(frozen=True)
class Ablate:
    """Directional ablation ``x ← x − (x·v̂)v̂`` at every hooked site of ``layers``.

    Sites (default: ``input``, ``attn``, ``mlp``) are each layer's input and
    the outputs of the modules that write attention and MLP results into the
    residual; at all layers this equals orthogonalizing the weights.
    ``source_layer=None`` uses the direction's best layer (``meta.best_layer``,
    or its only layer), following Arditi et al.
    """

    direction: DirectionRef
    layers: Any = "all"
    source_layer: int | None = None
    positions: str = "all"
    sites: tuple[str, ...] = DEFAULT_ABLATE_SITES

    def __post_init__(self) -> None:
        _check_ref(self.direction)
        object.__setattr__(self, "layers", parse_layers(self.layers))
        _check_choice(self.positions, POSITIONS, "positions")
        _check_source(self.source_layer)
        object.__setattr__(self, "sites", _parse_sites(self.sites))


@dataclass(frozen=True)
class SubspaceAblate:
    """Remove a whole subspace: orthonormal basis by QR of the stacked vectors.

    The basis holds, for each direction, its vectors at ``source_layers``
    (``None``: each direction's best or only layer). Applied at the same
    sites as :class:`Ablate`, at ``layers``.
    """

    directions: tuple[DirectionRef, ...]
    layers: Any = "all"
    source_layers: Any = None
    positions: str = "all"
    sites: tuple[str, ...] = DEFAULT_ABLATE_SITES

    def __post_init__(self) -> None:
        dirs = (self.directions,) if isinstance(self.directions, Direction | str) else tuple(
            self.directions
        )
        if not dirs:
            raise InterventionError("SubspaceAblate needs at least one direction.")
        for ref in dirs:
            _check_ref(ref)
        object.__setattr__(self, "directions", dirs)
        object.__setattr__(self, "layers", parse_layers(self.layers))
        if self.source_layers is not None:
            src = parse_layers(self.source_layers)
            if src == "all":
                raise InterventionError(
                    "SubspaceAblate source_layers must list layers (e.g. '7-10'), not 'all'."
                )
            object.__setattr__(self, "source_layers", src)
        _check_choice(self.positions, POSITIONS, "positions")
        object.__setattr__(self, "sites", _parse_sites(self.sites))


@dataclass(frozen=True)
class Project:
    """Project v̂ out of the outputs of the layers in a window, and nowhere else.

    ``source_layer=None`` uses each window layer's own vector.
    """

    direction: DirectionRef
    layers: Any = "all"
    source_layer: int | None = None
    positions: str = "all"

    def __post_init__(self) -> None:
        _check_ref(self.direction)
        object.__setattr__(self, "layers", parse_layers(self.layers))
        _check_choice(self.positions, POSITIONS, "positions")
        _check_source(self.source_layer)


Spec: TypeAlias = "Add | Ablate | SubspaceAblate | Project | KernelAblate"
SPEC_TYPES: dict[str, type] = {
    "add": Add,
    "ablate": Ablate,
    "subspace": SubspaceAblate,
    "project": Project,
    "kernel_ablate": KernelAblate,
}
_OP_OF = {cls: op for op, cls in SPEC_TYPES.items()}


def _parse_sites(sites: Any) -> tuple[str, ...]:
    items = (sites,) if isinstance(sites, str) else tuple(sites)
    if not items:
        raise InterventionError(
            f"Ablation needs at least one site; choose from {', '.join(SITES)}."
        )
    for site in items:
        _check_choice(site, SITES, "ablation site")
    return tuple(dict.fromkeys(items))


def spec_refs(spec: Spec) -> tuple[DirectionRef, ...]:
    """The direction references a spec uses."""
    return spec.directions if isinstance(spec, SubspaceAblate) else (spec.direction,)


# -- random controls ---------------------------------------------------------------------------
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


# -- resolving references ----------------------------------------------------------------------
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
        return random_like(base, int(match.group(2)), orthogonal=match.group(3) is not None)
    if names is not None and text in names:
        if isinstance(names, DirectionRegistry):
            return names.get(text, lm, allow_mismatch=allow_mismatch)
        return names[text]
    if not allow_paths:
        known = ", ".join(sorted(names.names() if isinstance(names, DirectionRegistry)
                                 else (names or {})))
        raise InterventionError(
            f"Unknown direction name {text!r}; here directions can only be named, not read "
            f"from paths. Registered names: {known or 'none'}."
        )
    if not Path(text).expanduser().exists():
        known = ", ".join(sorted(names.names() if isinstance(names, DirectionRegistry)
                                 else (names or {})))
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
    items: list[Any] = (
        [specs] if isinstance(specs, Add | Ablate | SubspaceAblate | Project | KernelAblate)
        else list(specs)
    )
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

    out: list[Spec] = []
    for spec in items:
        if not isinstance(spec, Add | Ablate | SubspaceAblate | Project | KernelAblate):
            raise InterventionError(
                f"Not an intervention spec: {type(spec).__name__}; use Add, Ablate, "
                "SubspaceAblate or Project (or parse_steer for text)."
            )
        if isinstance(spec, SubspaceAblate):
            out.append(dataclasses.replace(spec, directions=tuple(one(r) for r in spec.directions)))
        else:
            resolved: Spec = dataclasses.replace(spec, direction=one(spec.direction))
            out.append(resolved)
    return out


def _check_shape(direction: Direction, lm: LoadedModel) -> None:
    if direction.d_model != lm.d_model:
        raise InterventionError(
            f"Direction {direction.meta.name!r} has d_model {direction.d_model} but the model has "
            f"{lm.d_model}: it was made for another model."
        )
    if max(direction.layers) >= lm.n_layers:
        raise InterventionError(
            f"Direction {direction.meta.name!r} has layers up to {max(direction.layers)} but the "
            f"model has {lm.n_layers} layers."
        )


# -- dict / JSON form --------------------------------------------------------------------------
def _ref_to_json(ref: DirectionRef) -> Any:
    if isinstance(ref, str):
        return ref
    vectors = ref.vectors.detach().to("cpu", torch.float32).contiguous()
    return {
        "inline": {
            "layers": list(ref.layers),
            "d_model": ref.d_model,
            "float32_base64": base64.b64encode(vectors.numpy().tobytes()).decode("ascii"),
            "meta": dataclasses.asdict(ref.meta),
        }
    }


def _ref_from_json(value: Any) -> DirectionRef:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("inline"), Mapping):
        inline = value["inline"]
        try:
            layers = tuple(int(x) for x in inline["layers"])
            raw = base64.b64decode(inline["float32_base64"])
            vectors = torch.frombuffer(bytearray(raw), dtype=torch.float32).reshape(
                len(layers), int(inline["d_model"])
            )
            known = {f.name for f in dataclasses.fields(DirectionMeta)}
            meta = DirectionMeta(**{k: v for k, v in inline.get("meta", {}).items() if k in known})
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise InterventionError(f"Malformed inline direction in a spec: {exc}.") from exc
        return Direction(vectors.clone(), layers, meta)
    raise InterventionError(
        f"A spec's direction must be a name/path string or {{'inline': {{...}}}}; got {value!r}."
    )


def spec_to_dict(spec: Spec) -> dict[str, Any]:
    """A JSON-ready dict: ``{"op": "add", "direction": ..., ...}``, layers as text."""
    op = _OP_OF.get(type(spec))
    if op is None:
        raise InterventionError(f"Not an intervention spec: {type(spec).__name__}.")
    out: dict[str, Any] = {"op": op}
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        if f.name == "direction":
            value = _ref_to_json(value)
        elif f.name == "directions":
            value = [_ref_to_json(r) for r in value]
        elif f.name in ("layers", "source_layers") and value is not None:
            value = format_layers(value)
        elif f.name == "sites":
            value = list(value)
        elif isinstance(value, Kernel):
            value = value.to_list()
        out[f.name] = value
    return out


def spec_from_dict(data: Mapping[str, Any]) -> Spec:
    """Inverse of :func:`spec_to_dict`; unknown keys are an error (typos must not pass)."""
    if not isinstance(data, Mapping):
        raise InterventionError(f"A spec must be a mapping with an 'op' key; got {data!r}.")
    body = dict(data)
    op = str(body.pop("op", "")).lower()
    if op not in SPEC_TYPES:
        raise InterventionError(
            f"Unknown intervention op {op!r}; choose one of {', '.join(SPEC_TYPES)}."
        )
    cls = SPEC_TYPES[op]
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InterventionError(
            f"Unknown field(s) {unknown} for {op}; allowed: {', '.join(sorted(allowed))}."
        )
    if "direction" in body:
        body["direction"] = _ref_from_json(body["direction"])
    if "directions" in body:
        raw = body["directions"]
        body["directions"] = tuple(_ref_from_json(r) for r in (raw if isinstance(raw, list)
                                                                 else [raw]))
    if "sites" in body and isinstance(body["sites"], list):
        body["sites"] = tuple(body["sites"])
    try:
        spec: Spec = cls(**body)
    except TypeError as exc:
        raise InterventionError(f"Incomplete {op} spec {dict(data)!r}: {exc}.") from exc
    return spec


def specs_to_json(specs: Iterable[Spec], *, indent: int | None = 2) -> str:
    """Serialize specs as ``{"format_version": 1, "steer": [...]}``."""
    return json.dumps({"format_version": SPEC_FORMAT_VERSION,
                       "steer": [spec_to_dict(s) for s in specs]}, indent=indent)


def specs_from_json(text: str) -> list[Spec]:
    """Parse :func:`specs_to_json` output, a bare list of spec dicts, or one spec dict."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InterventionError(f"Steering spec is not valid JSON: {exc}.") from exc
    return _specs_from_data(data)


def _specs_from_data(data: Any) -> list[Spec]:
    if isinstance(data, Mapping) and "steer" in data:
        version = int(data.get("format_version", SPEC_FORMAT_VERSION))
        if version > SPEC_FORMAT_VERSION:
            raise InterventionError(
                f"Steering spec format {version} is newer than this steerlab reads "
                f"({SPEC_FORMAT_VERSION}); upgrade steerlab."
            )
        data = data["steer"]
    if isinstance(data, Mapping):
        data = [data]
    if not isinstance(data, list):
        raise InterventionError(
            "A steering file holds a list of specs (or {'steer': [...]}); "
            f"got {type(data).__name__}."
        )
    return [parse_compact(item) if isinstance(item, str) else spec_from_dict(item)
            for item in data]


# -- compact form ------------------------------------------------------------------------------
def parse_compact(text: str) -> Spec:
    """Parse ``OP:DIR[SRC]@LAYERS[:OPTION]...`` (see the module docstring).

    Options after the layers, in any order: a number (α, ``add`` only),
    ``prompt``/``generated``/``all`` (positions), ``raw``/``unit``/``mean_norm``
    (scale, ``add`` only). For ``subspace`` the part after ``@`` is
    ``BASIS_LAYERS[>TARGET_LAYERS]``; several directions join with ``+``.

    Example:
        >>> parse_compact("add:runs/persona@12:4.0").alpha
        4.0
    """
    raw = text.strip()
    op, sep, rest = raw.partition(":")
    op = op.strip().lower()
    if not sep or op not in SPEC_TYPES:
        raise InterventionError(
            f"Cannot read steering spec {text!r}: it must start with one of "
            f"{', '.join(f'{k}:' for k in SPEC_TYPES)} (e.g. add:runs/persona@12:4.0)."
        )
    ref_part, at, tail = rest.rpartition("@")
    if not at or not ref_part.strip():
        raise InterventionError(
            f"Cannot read steering spec {text!r}: expected OP:DIRECTION@LAYERS, e.g. "
            "ablate:runs/refusal@all."
        )
    ref_part = ref_part.strip()
    source: str | None = None
    if ref_part.endswith("]") and "[" in ref_part:
        ref_part, _, source = ref_part[:-1].rpartition("[")
        ref_part = ref_part.strip()
    layer_text, *options = (p.strip() for p in tail.split(":"))
    alpha: float | None = None
    positions, scale = "all", "raw"
    for opt in options:
        if opt in POSITIONS:
            positions = opt
        elif opt in SCALES:
            scale = opt
        else:
            try:
                alpha = float(opt)
            except ValueError:
                raise InterventionError(
                    f"Unknown option {opt!r} in steering spec {text!r}; options are a number "
                    f"(alpha), {'/'.join(POSITIONS)} (positions) or {'/'.join(SCALES)} (scale)."
                ) from None
    if op != "add" and (alpha is not None or scale != "raw"):
        raise InterventionError(f"{op} takes no alpha or scale; only add does (in {text!r}).")
    if op == "subspace":
        if source is not None:
            raise InterventionError(
                f"subspace takes its basis layers after @, not in [..]: write "
                f"subspace:DIR@BASIS>TARGETS, e.g. subspace:runs/refusal@7-10>12-20 (got {text!r})."
            )
        basis, gt, targets = layer_text.partition(">")
        refs = tuple(r.strip() for r in ref_part.split("+"))
        return SubspaceAblate(refs, layers=targets if gt else "all", source_layers=basis,
                              positions=positions)
    src_layer = _parse_source(source, text)
    if op == "add":
        if alpha is None:
            raise InterventionError(f"add needs an alpha: add:DIR@LAYERS:ALPHA (got {text!r}).")
        return Add(ref_part, alpha, layers=layer_text, positions=positions,
                   source_layer=src_layer, scale=scale)
    if op == "ablate":
        return Ablate(ref_part, layers=layer_text, source_layer=src_layer, positions=positions)
    return Project(ref_part, layers=layer_text, source_layer=src_layer, positions=positions)


def _parse_source(source: str | None, text: str) -> int | None:
    if source is None:
        return None
    if not source.strip().isdigit():
        raise InterventionError(
            f"The source layer in [..] must be one layer number, e.g. DIR[14]; got [{source}] "
            f"in {text!r}."
        )
    return int(source)


def to_compact(spec: Spec) -> str:
    """The compact form of a spec whose directions are names or paths."""
    refs = spec_refs(spec)
    if isinstance(spec, KernelAblate):
        raise InterventionError("kernel_ablate specs have no compact form; use JSON.")
    if not all(isinstance(r, str) for r in refs):
        raise InterventionError(
            "Only specs whose directions are names or paths have a compact form; use "
            "specs_to_json for in-memory directions."
        )
    opts = "" if spec.positions == "all" else f":{spec.positions}"
    if isinstance(spec, SubspaceAblate):
        if spec.sites != DEFAULT_ABLATE_SITES:
            raise InterventionError(
                "Subspace specs with custom sites have no compact form; use JSON."
            )
        if spec.source_layers is None:
            raise InterventionError(
                "A subspace spec without source_layers has no compact form; use JSON."
            )
        targets = "" if spec.layers == "all" else f">{format_layers(spec.layers)}"
        return (f"subspace:{'+'.join(str(r) for r in refs)}@{format_layers(spec.source_layers)}"
                f"{targets}{opts}")
    if isinstance(spec, Ablate) and spec.sites != DEFAULT_ABLATE_SITES:
        raise InterventionError("Ablate specs with custom sites have no compact form; use JSON.")
    src = "" if spec.source_layer is None else f"[{spec.source_layer}]"
    head = f"{_OP_OF[type(spec)]}:{refs[0]}{src}@{format_layers(spec.layers)}"
    if isinstance(spec, Add):
        opts = f":{spec.alpha!r}" + ("" if spec.scale == "raw" else f":{spec.scale}") + opts
    return head + opts


# -- any text form -----------------------------------------------------------------------------
def load_specs(path: str | Path) -> list[Spec]:
    """Read a JSON or YAML steering file (a list of spec dicts or compact strings)."""
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise InterventionError(f"Cannot read steering file {file}: {exc}.") from exc
    if file.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise InterventionError(f"Steering file {file} is not valid YAML: {exc}.") from exc
        return _specs_from_data(data)
    return specs_from_json(text)


def parse_steer(text: str) -> list[Spec]:
    """What ``--steer`` accepts: a compact spec, inline JSON, or a .json/.yaml file.

    Example:
        >>> [type(s).__name__ for s in parse_steer("ablate:runs/refusal[14]@all")]
        ['Ablate']
    """
    stripped = text.strip()
    if stripped.startswith(("[", "{")):
        return specs_from_json(stripped)
    if Path(stripped).suffix.lower() in (".json", ".yaml", ".yml") and "@" not in stripped:
        if not Path(stripped).is_file():
            raise InterventionError(f"Steering file {stripped} does not exist; check the path.")
        return load_specs(stripped)
    return [parse_compact(stripped)]


def parse_steer_args(values: Sequence[str] | None) -> list[Spec]:
    """Every ``--steer`` value of a command, in order, as one list of specs."""
    out: list[Spec] = []
    for value in values or ():
        out.extend(parse_steer(value))
    return out


__all__ = [
    "MAX_LAYERS",
    "POSITIONS",
    "SCALES",
    "SITES",
    "Ablate",
    "Add",
    "DirectionRef",
    "DirectionRegistry",
    "KernelAblate",
    "Project",
    "Spec",
    "SubspaceAblate",
    "format_layers",
    "load_specs",
    "parse_compact",
    "parse_layers",
    "parse_steer",
    "parse_steer_args",
    "random_like",
    "resolve_direction",
    "resolve_layers",
    "resolve_specs",
    "spec_from_dict",
    "spec_refs",
    "spec_to_dict",
    "specs_from_json",
    "specs_to_json",
    "to_compact",
]
