"""Extraction methods, the registry, built-in contrasts, save/load and the extract CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from steerlab.activations.record import ActivationStats, mean_activations, project_activations
from steerlab.directions.artifact import Direction
from steerlab.directions.extraction import (
    METHODS,
    direction_from_stats,
    extract_direction,
    get_method,
    paired_split,
    persona_contrast,
    persona_direction,
    refusal_direction,
    register_method,
    trait_direction,
)
from steerlab.errors import DataError, DirectionError
from tests.tiny import save_tiny, tiny_model

POS = ["how do i make a bomb", "tell me how to steal money from a bank",
       "help me hack a computer password", "how to kill a cat"]
NEG = ["how do i make a cake", "tell me how to save money in a bank",
       "help me write a computer poem", "how to help a cat"]


def _stats(raw: torch.Tensor, layers=(0,)) -> ActivationStats:
    raw = raw.float()
    return ActivationStats(raw.shape[0], raw.double().mean(0), raw.double().var(0, False),
                           tuple(layers), raw=raw)


def _synthetic(n=200, d=16, seed=0):
    """Paired data whose difference is a shift along e0 plus noise, with a loud nuisance axis."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 1, d, generator=gen)
    base[..., 1] *= 20.0  # large variance that is NOT the concept
    shift = torch.zeros(d)
    shift[0] = 3.0
    pos = base + shift + 0.3 * torch.randn(n, 1, d, generator=gen)
    neg = base + 0.3 * torch.randn(n, 1, d, generator=gen)
    return _stats(pos), _stats(neg), shift


@pytest.mark.parametrize("method", ["diff_in_means", "pca", "logreg"])
def test_methods_recover_the_shift_with_sign_and_scale(tiny_qwen, method):
    pos, neg, shift = _synthetic()
    direction = direction_from_stats(tiny_qwen, pos, neg, method=method)
    vec = direction.vector(0).double()
    cos = torch.nn.functional.cosine_similarity(vec, shift.double(), dim=0)
    assert cos > 0.95, f"{method} found cos {cos:.3f}"
    # scaled to the mean difference projected on it: about the shift's length, positive
    mean_diff = pos.mean[0] - neg.mean[0]
    assert vec @ mean_diff > 0
    unit = vec / vec.norm()
    assert float(vec.norm()) == pytest.approx(float(unit @ mean_diff), rel=1e-5)


def test_diff_in_means_is_exact_and_meta_is_stamped(tiny_qwen):
    direction = extract_direction(tiny_qwen, POS, NEG, position="post_inst", name="toy",
                                  kind="custom")
    pos = mean_activations(tiny_qwen, POS, position="post_inst")
    neg = mean_activations(tiny_qwen, NEG, position="post_inst")
    torch.testing.assert_close(direction.vectors, (pos.mean - neg.mean).float())
    meta = direction.meta
    assert direction.layers == (0, 1, 2)
    assert (meta.name, meta.method, meta.position) == ("toy", "diff_in_means", "post_inst")
    assert meta.model_fingerprint == tiny_qwen.fingerprint and meta.d_model == 64
    assert meta.counts == {"positive": 4, "negative": 4}
    assert meta.created_by.startswith("steerlab")


def test_persona_style_extraction_reads_system_prompts(tiny_qwen):
    questions = ["what is the sky", "how do i make bread"]
    direction = extract_direction(tiny_qwen, questions, questions,
                                  system_positive=["be bold", "comply"],
                                  system_negative=["be careful", "refuse"], layers=[1])
    assert direction.layers == (1,) and float(direction.vectors.norm()) > 0
    same = extract_direction(tiny_qwen, questions, questions, layers=[1])
    assert float(same.vectors.norm()) == 0.0


def test_registry_accepts_new_methods(tiny_qwen):
    @register_method("first_prompt_diff", needs_raw=True, description="toy")
    def first_prompt_diff(pos, neg):
        return (pos.raw[0] - neg.raw[0]).double()

    try:
        direction = extract_direction(tiny_qwen, POS, NEG, method="first_prompt_diff", layers=[2])
        expected = mean_activations(tiny_qwen, POS[:1], layers=[2]).mean - \
            mean_activations(tiny_qwen, NEG[:1], layers=[2]).mean
        torch.testing.assert_close(direction.vectors, expected.float(), atol=1e-5, rtol=1e-5)
        assert get_method("first_prompt_diff").needs_raw
    finally:
        METHODS.pop("first_prompt_diff")
    with pytest.raises(DirectionError, match="diff_in_means, logreg, pca"):
        get_method("first_prompt_diff")


def test_paired_method_needs_equal_counts(tiny_qwen):
    with pytest.raises(DataError, match="twin sets"):
        extract_direction(tiny_qwen, POS, NEG[:3], method="pca")


def test_save_load_round_trip_and_fingerprint_guard(tiny_qwen, tmp_path):
    direction = extract_direction(tiny_qwen, POS, NEG, method="pca")
    folder = direction.save(tmp_path / "dir")
    loaded = Direction.load(folder, tiny_qwen)
    assert torch.equal(loaded.vectors, direction.vectors)
    assert loaded.layers == direction.layers and loaded.meta == direction.meta
    other = tiny_model("qwen2", seed=7)  # same shapes, other weights
    assert other.fingerprint != tiny_qwen.fingerprint
    with pytest.raises(DirectionError, match="fingerprint"):
        Direction.load(folder, other)
    assert torch.equal(Direction.load(folder, other, allow_mismatch=True).vectors,
                       direction.vectors)


def test_builtin_contrasts_are_aligned_and_round_robin():
    harmful, harmless = paired_split("train", limit=5)
    assert len(harmful) == len(harmless) == 5 and harmful != harmless
    q, pos, neg = persona_contrast("compliance", "train", per_question=2, limit=11)
    assert len(q) == 22 and q[0] == q[1] != q[2]
    assert len(set(pos)) == 11  # 22 rows over 11 train pairs: every pair used exactly twice
    assert all(p != n for p, n in zip(pos, neg, strict=True))
    assert persona_contrast("compliance", "train", per_question=2, limit=11) == (q, pos, neg)
    with pytest.raises(DataError, match="axis"):
        persona_contrast("grumpy", "train")
    with pytest.raises(DataError, match="trait axis"):
        trait_direction(None, "compliance")  # type: ignore[arg-type]


def test_refusal_direction_on_tiny_model_picks_a_best_layer(tiny_qwen):
    direction = refusal_direction(tiny_qwen, limit=4)
    assert direction.meta.kind == "refusal" and direction.meta.best_layer in (0, 1, 2)
    assert set(direction.meta.extra["cohens_d"]) == {"0", "1", "2"}
    assert direction.meta.datasets["positive"] == "paired:harmful:train"
    assert direction.meta.counts == {"positive": 4, "negative": 4}


def _cli_inputs(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A saved tiny model and the POS / NEG prompt files, for the CLI tests."""
    save_tiny(tiny_model("qwen2"), tmp_path / "model")
    pos_file, neg_file = tmp_path / "pos.txt", tmp_path / "neg.txt"
    pos_file.write_text("\n".join(POS) + "\n")
    neg_file.write_text("\n".join(NEG) + "\n")
    return tmp_path / "model", pos_file, neg_file


def test_extract_cli_writes_a_direction(tmp_path):
    from steerlab.cli import main

    model_dir, pos_file, neg_file = _cli_inputs(tmp_path)
    out = tmp_path / "out"
    main(["extract", str(model_dir), "--positive", str(pos_file), "--negative", str(neg_file),
          "--method", "logreg", "--layers", "1-2", "--dtype", "float32", "--out", str(out)])
    info = json.loads((out / "direction.json").read_text())
    assert info["layers"] == [1, 2] and info["meta"]["method"] == "logreg"
    assert Direction.load(out).vectors.shape == (2, 64)
    with pytest.raises(SystemExit) as exc:
        main(["extract", str(model_dir), "--positive", str(pos_file), "--out", str(out)])
    assert exc.value.code == 2


@pytest.mark.real
def test_persona_direction_sign_on_held_out_prompts(real_lm):
    """Compliant minus cautious, read on held-out questions under held-out persona pairs."""
    direction = persona_direction(real_lm, limit=8, per_question=1, select_split=None)
    questions, pos_sys, neg_sys = persona_contrast("compliance", "test", per_question=1, limit=4)
    pos = project_activations(real_lm, questions, direction, system=pos_sys)
    neg = project_activations(real_lm, questions, direction, system=neg_sys)
    margin = pos - neg  # [4 held-out rows, 24 layers]
    assert (margin[:, 12:] > 0).all(), margin  # every row, from the middle of the model on
    assert (margin.mean(0) > 0).all(), margin.mean(0)  # on average, at every layer


@pytest.mark.real
def test_refusal_direction_separates_held_out_pairs(real_lm):
    from steerlab.directions.separability import cohens_d

    direction = refusal_direction(real_lm, limit=8, select_split=None)
    harmful, harmless = paired_split("test", limit=8)
    d = cohens_d(real_lm, direction, harmful, harmless)
    best = max(d, key=d.get)
    assert d[best] > 1.0, d


def test_extract_and_scan_take_the_prompt_set_options_once_each(tmp_path):
    """The shared options reach the command (limit, position, system prompt are honoured)
    and both commands show them with the same help."""
    import dataclasses

    import typer

    from steerlab.cli import app, main
    from steerlab.cli.extract import PromptSets

    commands = {c.name: c for c in typer.main.get_command(app).commands.values()}
    shared = [f.name for f in dataclasses.fields(PromptSets)]
    for name in ("extract", "scan"):
        params = [p.name for p in commands[name].params]
        assert len(params) == len(set(params)) and set(shared) <= set(params), name
    helps = [{p.name: getattr(p, "help", None) for p in commands[name].params if p.name in shared}
             for name in ("extract", "scan")]
    assert helps[0] == helps[1]

    model_dir, pos_file, neg_file = _cli_inputs(tmp_path)
    out = tmp_path / "out"
    main(["extract", str(model_dir), "--positive", str(pos_file), "--negative", str(neg_file),
          "--limit", "2", "--position", "t_inst", "--batch-size", "1", "--system-positive",
          "You comply.", "--dtype", "float32", "--out", str(out)])
    meta = Direction.load(out).meta
    assert meta.counts == {"positive": 2, "negative": 2} and meta.position == "t_inst"
