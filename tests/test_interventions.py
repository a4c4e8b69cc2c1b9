"""Intervention specs: layer parsing, the compact and JSON/YAML forms, references,
the registry, random controls."""

from __future__ import annotations

import json

import pytest
import torch

from steerlab.directions.artifact import Direction, DirectionMeta
from steerlab.errors import DirectionError, InterventionError
from steerlab.interventions.specs import (
    MAX_LAYERS,
    Ablate,
    Add,
    DirectionRegistry,
    Project,
    SubspaceAblate,
    format_layers,
    load_specs,
    parse_compact,
    parse_layers,
    parse_steer,
    parse_steer_args,
    random_like,
    resolve_direction,
    resolve_specs,
    spec_from_dict,
    spec_to_dict,
    specs_from_json,
    specs_to_json,
    to_compact,
)
from tests.tiny import tiny_model


def _direction(n_layers: int = 4, d: int = 16, seed: int = 0, best: int | None = None) -> Direction:
    gen = torch.Generator().manual_seed(seed)
    return Direction(torch.randn(n_layers, d, generator=gen), tuple(range(n_layers)),
                     DirectionMeta(name=f"d{seed}", best_layer=best))


# -- layers ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "expected"), [
    ("all", "all"), ("ALL", "all"), (None, "all"), (12, (12,)), ("12", (12,)),
    ("12-14", (12, 13, 14)), ("3,5,7", (3, 5, 7)), ("7, 3,5-6", (3, 5, 6, 7)),
    ([4, 2, 2], (2, 4)), ((0,), (0,)),
])
def test_parse_layers_forms(text, expected):
    assert parse_layers(text) == expected


@pytest.mark.parametrize("bad", ["", "x", "5-3", "1,,2", "-1", [-1], [], True, "1.5"])
def test_parse_layers_rejects_with_a_fix(bad):
    with pytest.raises(InterventionError, match=r"\S"):
        parse_layers(bad)


def test_parse_layers_with_model_size_expands_and_checks():
    assert parse_layers("all", 3) == (0, 1, 2)
    assert parse_layers("1-2", 3) == (1, 2)
    with pytest.raises(InterventionError, match="model has 3 layers"):
        parse_layers("2-3", 3)


def test_parse_layers_refuses_a_huge_range_before_expanding_it(monkeypatch):
    import steerlab.interventions.layer_spec as layer_spec

    def no_expansion(*args):
        raise AssertionError(f"range{args} was expanded")

    # a range past the model (or past MAX_LAYERS) must fail before range() builds it
    monkeypatch.setattr(layer_spec, "range", no_expansion, raising=False)
    with pytest.raises(InterventionError, match=r"'0-99999999999'.*model has 24 layers \(0-23\)"):
        parse_layers("0-99999999999", 24)
    with pytest.raises(InterventionError, match=r"'3-99999999999'.*below 1024 \(0-1023\)"):
        parse_layers("1,3-99999999999")
    with pytest.raises(InterventionError, match=r"'0-99999999999'.*below 1024"):
        Add("runs/x", 1.0, layers="0-99999999999")  # specs parse without a model: the cap
    with pytest.raises(InterventionError, match=r"'5-24'.*model has 24 layers"):
        parse_layers("5-24", 24)
    monkeypatch.undo()
    assert parse_layers("0-1023") == tuple(range(MAX_LAYERS))  # the cap itself is allowed
    assert parse_layers("5-23", 24) == tuple(range(5, 24))


@pytest.mark.parametrize("layers", ["all", (3,), (1, 2, 3, 7), (0, 2, 4), (5, 6, 9, 10, 11)])
def test_format_layers_inverts_parse(layers):
    assert parse_layers(format_layers(layers)) == layers


# -- spec validation ---------------------------------------------------------------------------
def test_specs_are_frozen_and_normalised():
    spec = Add("runs/x", 4, layers="12-13")
    assert spec.layers == (12, 13) and spec.alpha == 4.0 and isinstance(spec.alpha, float)
    with pytest.raises(AttributeError):
        spec.alpha = 2.0  # type: ignore[misc]
    assert SubspaceAblate("runs/x", source_layers="7-8").directions == ("runs/x",)


@pytest.mark.parametrize("make", [
    lambda: Add("d", float("nan")),
    lambda: Add("d", "4"),
    lambda: Add("d", 1.0, positions="middle"),
    lambda: Add("d", 1.0, scale="big"),
    lambda: Add("", 1.0),
    lambda: Add(3, 1.0),
    lambda: Ablate("d", source_layer=-1),
    lambda: Ablate("d", sites=("input", "nowhere")),
    lambda: Ablate("d", sites=()),
    lambda: SubspaceAblate(()),
    lambda: SubspaceAblate("d", source_layers="all"),
    lambda: Project("d", layers="9-2"),
])
def test_invalid_specs_raise_intervention_error(make):
    with pytest.raises(InterventionError):
        make()


# -- compact form ------------------------------------------------------------------------------
def test_compact_examples_from_the_docs():
    add = parse_compact("add:runs/persona@12:4.0")
    assert add == Add("runs/persona", 4.0, layers=(12,))
    ablate = parse_compact("ablate:runs/refusal[14]@all")
    assert ablate == Ablate("runs/refusal", layers="all", source_layer=14)
    proj = parse_compact("project:runs/persona@16-23")
    assert proj == Project("runs/persona", layers=tuple(range(16, 24)))
    sub = parse_compact("subspace:runs/refusal@7-10")
    assert sub == SubspaceAblate(("runs/refusal",), layers="all", source_layers=(7, 8, 9, 10))
    sub2 = parse_compact("subspace:runs/refusal+runs/persona@7,9>12-13:generated")
    assert sub2.directions == ("runs/refusal", "runs/persona")
    assert sub2.source_layers == (7, 9) and sub2.layers == (12, 13)
    assert sub2.positions == "generated"


def test_compact_options_any_order():
    spec = parse_compact("add:d@3:generated:unit:-2.5")
    assert spec == Add("d", -2.5, layers=(3,), positions="generated", scale="unit")
    spec = parse_compact("add:random_like(runs/p,7,orthogonal)[5]@1-2:1e-1")
    assert spec.direction == "random_like(runs/p,7,orthogonal)" and spec.source_layer == 5
    assert spec.alpha == pytest.approx(0.1)


@pytest.mark.parametrize(("text", "message"), [
    ("add:d@3", "needs an alpha"),
    ("ablate:d@3:2.0", "no alpha"),
    ("mul:d@3:2", "must start with"),
    ("add d@3:2", "must start with"),
    ("add:d:2", "OP:DIRECTION@LAYERS"),
    ("add:d@3:fast", "Unknown option"),
    ("subspace:d[3]@all", "basis layers after @"),
    ("ablate:d[x]@all", "one layer number"),
    ("project:d@3-1", "backwards"),
])
def test_compact_errors_name_the_fix(text, message):
    with pytest.raises(InterventionError, match=message):
        parse_compact(text)


@pytest.mark.parametrize("spec", [
    Add("runs/persona", 4.0, layers=12),
    Add("runs/p", -0.5, layers="1,3,5-7", positions="prompt", source_layer=4, scale="mean_norm"),
    Ablate("runs/refusal", source_layer=14),
    Ablate("refusal", layers="10-12", positions="generated"),
    Project("runs/persona", layers="16-23"),
    SubspaceAblate(("a", "b"), layers="2-4", source_layers="7-10"),
    SubspaceAblate("a", source_layers=3, positions="prompt"),
])
def test_compact_round_trip(spec):
    assert parse_compact(to_compact(spec)) == spec


def test_compact_form_refuses_what_it_cannot_say():
    with pytest.raises(InterventionError, match="specs_to_json"):
        to_compact(Add(_direction(), 1.0))
    with pytest.raises(InterventionError, match="JSON"):
        to_compact(Ablate("d", sites=("output",)))


# -- JSON / YAML -------------------------------------------------------------------------------
def test_json_round_trip_with_inline_direction_keeps_every_bit():
    direction = _direction(best=2)
    specs = [
        Add(direction, 2.5, layers="1-2", positions="generated", scale="unit"),
        Ablate("runs/refusal", layers="all", source_layer=3, sites=("input", "output")),
        SubspaceAblate(("runs/a", direction), layers=(1,), source_layers=(0, 2)),
        Project("random_like(runs/p,3)", layers="2-3"),
    ]
    text = specs_to_json(specs)
    back = specs_from_json(text)
    assert json.loads(text)["format_version"] == 1
    assert back[1:] != [] and back[1] == specs[1] and back[3] == specs[3]
    assert isinstance(back[0].direction, Direction)
    assert torch.equal(back[0].direction.vectors, direction.vectors)
    assert back[0].direction.meta == direction.meta
    assert back[2].directions[0] == "runs/a"
    assert torch.equal(back[2].directions[1].vectors, direction.vectors)
    assert specs_to_json(back) == text


def test_json_accepts_bare_lists_single_dicts_and_compact_strings():
    assert specs_from_json('{"op": "ablate", "direction": "d"}') == [Ablate("d")]
    mixed = specs_from_json('["add:d@1:2", {"op": "project", "direction": "d", "layers": "1-2"}]')
    assert mixed == [Add("d", 2.0, layers=1), Project("d", layers=(1, 2))]


@pytest.mark.parametrize(("text", "message"), [
    ('{"op": "add", "direction": "d", "alpha": 1, "layer": 3}', "Unknown field"),
    ('{"op": "scale", "direction": "d"}', "Unknown intervention op"),
    ('{"op": "add", "direction": "d"}', "Incomplete add"),
    ('{"format_version": 9, "steer": []}', "newer"),
    ('{"op": "add", "direction": {"inline": {"layers": [0]}}, "alpha": 1}', "Malformed inline"),
    ("[1, 2]", "mapping"),
    ("{not json", "not valid JSON"),
])
def test_json_errors_are_intervention_errors(text, message):
    with pytest.raises(InterventionError, match=message):
        specs_from_json(text)


def test_yaml_and_json_files_and_parse_steer(tmp_path):
    yaml_file = tmp_path / "steer.yaml"
    yaml_file.write_text(
        "steer:\n"
        "  - op: add\n    direction: runs/persona\n    alpha: 4\n    layers: 12\n"
        "  - ablate:runs/refusal[14]@all\n"
        "  - op: subspace\n    directions: [runs/a, runs/b]\n    source_layers: 7-10\n"
    )
    specs = parse_steer(str(yaml_file))
    assert specs == [Add("runs/persona", 4.0, layers=12),
                     Ablate("runs/refusal", source_layer=14),
                     SubspaceAblate(("runs/a", "runs/b"), source_layers=(7, 8, 9, 10))]
    json_file = tmp_path / "steer.json"
    json_file.write_text(specs_to_json(specs))
    assert load_specs(json_file) == specs
    assert parse_steer(specs_to_json(specs)) == specs
    assert parse_steer_args(["add:d@1:2", str(json_file)]) == [Add("d", 2.0, layers=1), *specs]
    with pytest.raises(InterventionError, match="does not exist"):
        parse_steer(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yml"
    bad.write_text("steer: [\n")
    with pytest.raises(InterventionError, match="YAML"):
        parse_steer(str(bad))


def test_spec_dict_is_plain_json():
    data = spec_to_dict(Add("d", 1.0, layers="3-5"))
    assert data == {"op": "add", "direction": "d", "alpha": 1.0, "layers": "3-5",
                    "positions": "all", "source_layer": None, "scale": "raw"}
    assert spec_from_dict(data) == Add("d", 1.0, layers=(3, 4, 5))


# -- random controls ---------------------------------------------------------------------------
def test_random_like_matches_norms_is_deterministic_and_selection_invariant():
    d = _direction(n_layers=5, d=32) * 3.0
    r = random_like(d, seed=11)
    for layer in d.layers:
        assert r.vector(layer).norm() == pytest.approx(float(d.vector(layer).norm()), rel=1e-5)
    assert torch.equal(r.vectors, random_like(d, seed=11).vectors)
    assert not torch.allclose(r.vectors, random_like(d, seed=12).vectors)
    assert torch.equal(random_like(d.select([2, 4]), 11).vectors, r.select([2, 4]).vectors)
    assert r.meta.kind == "random" and r.meta.extra["seed"] == 11
    cos = [abs(c) for c in r.cosine(d).values()]
    assert max(cos) < 0.8  # random in 32 dims: far from the original


def test_random_like_orthogonal_is_orthogonal_with_the_same_norm():
    d = _direction(n_layers=3, d=64)
    r = random_like(d, seed=1, orthogonal=True)
    for layer in d.layers:
        assert float(r.vector(layer) @ d.vector(layer)) == pytest.approx(0.0, abs=1e-4)
        assert r.vector(layer).norm() == pytest.approx(float(d.vector(layer).norm()), rel=1e-5)
    assert r.meta.extra["orthogonal"] is True


# -- references and the registry ---------------------------------------------------------------
def test_resolve_by_path_name_and_random_reference(tmp_path):
    d = _direction(d=64, best=1)
    path = d.save(tmp_path / "dir")
    loaded = resolve_direction(str(path))
    assert torch.equal(loaded.vectors, d.vectors)
    reg = DirectionRegistry({"refusal": str(path), "inline": d})
    assert torch.equal(resolve_direction("refusal", names=reg).vectors, d.vectors)
    assert resolve_direction("inline", names=reg) is d
    rand = resolve_direction("random_like(refusal, 5, orthogonal)", names=reg)
    assert torch.equal(rand.vectors, random_like(d, 5, orthogonal=True).vectors)
    assert resolve_direction("x", names={"x": d}) is d
    assert reg.names() == ["inline", "refusal"] and "refusal" in reg


def test_registry_without_paths_never_reads_files(tmp_path):
    path = _direction(d=64).save(tmp_path / "dir")
    reg = DirectionRegistry({"known": _direction(d=64)})
    with pytest.raises(InterventionError, match=r"only be named.*known"):
        resolve_direction(str(path), names=reg, allow_paths=False)
    with pytest.raises(InterventionError, match="only be named"):
        resolve_specs([Ablate(f"random_like({path},1)")], names=reg, allow_paths=False)
    with pytest.raises(InterventionError, match="No direction named"):
        reg.get("other")


def test_resolve_specs_loads_each_reference_once_and_checks_the_model(tmp_path):
    lm = tiny_model("qwen2")
    d = Direction(torch.randn(3, 64), (0, 1, 2), DirectionMeta(best_layer=1))
    path = str(d.save(tmp_path / "d"))
    specs = resolve_specs([Add(path, 1.0, layers=1), Ablate(path), Project(d, layers=2)], lm=lm)
    assert specs[0].direction is specs[1].direction and specs[2].direction is d
    with pytest.raises(InterventionError, match="d_model 16"):
        resolve_specs([Ablate(_direction(d=16))], lm=lm)
    wide = Direction(torch.randn(5, 64), tuple(range(5)))
    with pytest.raises(InterventionError, match="3 layers"):
        resolve_specs([Ablate(wide)], lm=lm)
    with pytest.raises(InterventionError, match="neither a registered name"):
        resolve_specs([Ablate(str(tmp_path / "nope"))], lm=lm)
    with pytest.raises(InterventionError, match="Not an intervention spec"):
        resolve_specs(["add:d@1:2"])  # type: ignore[list-item]


def test_resolve_specs_refuses_a_direction_from_another_model(tmp_path):
    lm = tiny_model("qwen2")
    meta = DirectionMeta(model_fingerprint="0123456789abcdef", model_name="other")
    path = str(Direction(torch.randn(3, 64), (0, 1, 2), meta).save(tmp_path / "d"))
    with pytest.raises(DirectionError, match="fingerprint"):
        resolve_specs([Add(path, 1.0, layers=0)], lm=lm)
    assert resolve_specs([Add(path, 1.0, layers=0)], lm=lm, allow_mismatch=True)
