"""The text forms of intervention specs: JSON/YAML (``{"op": "add", ...}``, any registered
spec type) and the compact ``--steer`` form (documented in docs/steering.md)::

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
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from steerlab.directions.artifact import Direction, DirectionMeta
from steerlab.errors import InterventionError
from steerlab.interventions.layer_spec import format_layers, parse_layers
from steerlab.interventions.spec_types import (
    DEFAULT_ABLATE_SITES,
    POSITIONS,
    SCALES,
    SPEC_TYPES,
    Ablate,
    Add,
    Project,
    Spec,
    SubspaceAblate,
    op_of,
    spec_refs,
)

SPEC_FORMAT_VERSION = 1
COMPACT_OPS = ("add", "ablate", "subspace", "project")


def _ref_to_json(ref: Direction | str) -> Any:
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


def _ref_from_json(value: Any) -> Direction | str:
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
    """A JSON-ready dict: ``{"op": "add", "direction": ..., ...}``, layers as text; any other
    field value with a ``to_json()`` method is written as what it returns."""
    out: dict[str, Any] = {"op": op_of(spec)}
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        if f.name == "direction":
            value = _ref_to_json(value)
        elif f.name == "directions":
            value = [_ref_to_json(r) for r in value]
        elif f.name in ("layers", "source_layers") and value is not None:
            value = format_layers(parse_layers(value))
        elif f.name == "sites":
            value = list(value)
        elif callable(getattr(value, "to_json", None)):  # a field type of a registered spec
            value = value.to_json()
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
    if not sep or op not in COMPACT_OPS:
        raise InterventionError(
            f"Cannot read steering spec {text!r}: it must start with one of "
            f"{', '.join(f'{k}:' for k in COMPACT_OPS)} (e.g. add:runs/persona@12:4.0)."
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
    """The compact form of a built-in spec whose directions are names or paths."""
    refs = spec_refs(spec)
    if not all(isinstance(r, str) for r in refs):
        raise InterventionError(
            "Only specs whose directions are names or paths have a compact form; use "
            "specs_to_json for in-memory directions."
        )
    if not isinstance(spec, Add | Ablate | SubspaceAblate | Project):
        raise InterventionError(f"{op_of(spec)} specs have no compact form; use JSON.")
    opts = "" if spec.positions == "all" else f":{spec.positions}"
    layers = format_layers(parse_layers(spec.layers))
    if isinstance(spec, SubspaceAblate):
        if spec.sites != DEFAULT_ABLATE_SITES:
            raise InterventionError(
                "Subspace specs with custom sites have no compact form; use JSON."
            )
        if spec.source_layers is None:
            raise InterventionError(
                "A subspace spec without source_layers has no compact form; use JSON."
            )
        targets = "" if layers == "all" else f">{layers}"
        basis = format_layers(parse_layers(spec.source_layers))
        return f"subspace:{'+'.join(str(r) for r in refs)}@{basis}{targets}{opts}"
    if isinstance(spec, Ablate) and spec.sites != DEFAULT_ABLATE_SITES:
        raise InterventionError("Ablate specs with custom sites have no compact form; use JSON.")
    src = "" if spec.source_layer is None else f"[{spec.source_layer}]"
    head = f"{op_of(spec)}:{refs[0]}{src}@{layers}"
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


