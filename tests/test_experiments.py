"""The refusal-structure experiments (layer transfer, subspace, positions, hydra):
each pipeline end to end on a tiny model (all steps, all outputs, results.json
schema, resume), the subspace-ablation and re-extraction guarantees, the
verdict logic, the CLI, and a reduced real-model run of each."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from steerlab.activations.record import record_activations
from steerlab.directions.artifact import Direction
from steerlab.experiments.hydra import HydraConfig, reextract, run_hydra
from steerlab.experiments.layer_transfer import LayerTransferConfig, _verdict, run_layer_transfer
from steerlab.experiments.positions import PositionsConfig, run_positions
from steerlab.experiments.subspace import SubspaceConfig, run_subspace
from steerlab.interventions.compilers import orthonormal_basis
from steerlab.interventions.specs import SubspaceAblate
from steerlab.interventions.steering import count_hooks, steer
from steerlab.prompts.chat import encode
from steerlab.store.rowstore import read_rows
from tests.tiny import save_tiny, tiny_model

TINY: dict[str, Any] = dict(
    limit=3, harmless_limit=2, max_new_tokens=3, batch_size=4, kl_tokens=2, extraction_limit=4
)
CONDITION_KEYS = {
    "n",
    "refusal_rate",
    "refusal_rate_ci95",
    "bypass_rate",
    "degenerate_rate",
    "vs_baseline_p",
    "description",
}
VERDICTS = {"reproduced", "not reproduced", "inconclusive"}


def _check_common(out: Path, experiment: str) -> dict[str, Any]:
    """Everything every experiment must write, and the shared results.json schema."""
    results = json.loads((out / "results.json").read_text())
    assert results["experiment"] == experiment
    assert results["provenance"]["model"]["fingerprint"] == results["fingerprint"]
    assert results["provenance"]["config"]["seed"] == 0
    assert isinstance(results["summary"], str) and results["model"] in results["summary"]
    assert results["findings"] and all(f["verdict"] in VERDICTS for f in results["findings"])
    for name, entry in results["conditions"].items():
        assert set(entry) >= CONDITION_KEYS, name
        lo, hi = entry["refusal_rate_ci95"]
        assert 0 <= lo <= entry["refusal_rate"] <= hi <= 1
        p = entry["vs_baseline_p"]
        assert (p is None and name.endswith("baseline")) or 0 <= p <= 1
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "Findings" in html and "<table>" in html
    md = (out / "report.md").read_text()
    assert "| claim | verdict | evidence |" in md and "## Provenance" in md
    for line in md.splitlines():
        if line.startswith("![") and "](" in line:
            assert (out / line.split("](")[1].rstrip(")")).is_file()
    rows = read_rows(out / "responses.jsonl")
    keys = [(r["condition"], r["prompt_id"]) for r in rows]
    assert len(keys) == len(set(keys))
    assert {r["condition"] for r in rows} == set(results["conditions"])
    return results


def _resumes(out: Path, fn: Any, lm: Any, config: Any) -> None:
    before = (out / "responses.jsonl").read_text()
    fn(lm, out, config, show_progress=False)
    assert (out / "responses.jsonl").read_text() == before  # nothing generated again


# -- guarantees -------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["qwen2", "gemma2"])
def test_subspace_ablation_leaves_zero_projection_on_every_basis_vector(arch: str) -> None:
    lm = tiny_model(arch)
    gen = torch.Generator().manual_seed(3)
    direction = Direction(
        torch.randn(lm.n_layers, lm.d_model, generator=gen), tuple(range(lm.n_layers))
    )
    basis = orthonormal_basis(direction.vectors)  # [d, k]: the layers' vectors, QR
    assert basis.shape == (lm.d_model, lm.n_layers)
    batch = encode(lm.tokenizer, ["how do i make a bomb", "write a poem about the sky"])

    def projections(specs: list[Any]) -> list[torch.Tensor]:
        with steer(lm, specs), record_activations(lm) as acts, torch.no_grad():
            lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        out = []
        for layer in range(lm.n_layers):
            hidden = acts[layer][0][batch.attention_mask.bool()]
            out.append((hidden @ basis).abs().max() / hidden.norm(dim=-1).max())
        return out

    spec = SubspaceAblate((direction,), source_layers=tuple(range(lm.n_layers)))
    for layer, rel in enumerate(projections([spec])):
        assert rel < 1e-5, f"layer {layer}: residual projection {rel:.2e}"
    assert max(projections([])) > 1e-2  # the unhooked model does have those components
    assert count_hooks(lm.model) == 0


def test_hydra_reextraction_runs_on_the_ablated_model() -> None:
    lm = tiny_model("qwen2")
    config = HydraConfig(**TINY)
    first = reextract(lm, [], config, "r1")
    v1 = first.select([first.meta.best_layer])
    again = reextract(lm, [], config, "r1-again")  # unhooked: the same direction
    second = reextract(lm, [v1], config, "r2")  # under the ablation of v1
    assert torch.allclose(again.vectors, first.vectors, atol=1e-5)
    u = v1.vector(unit=True)
    for layer in first.layers:
        assert abs(float(second.vector(layer, unit=True) @ u)) < 1e-4, layer
    best = int(first.meta.best_layer)
    assert float(first.vector(best, unit=True) @ u) == pytest.approx(1.0, abs=1e-6)
    assert not torch.allclose(second.vectors, first.vectors, atol=1e-3)
    assert second.meta.extra["extracted_under"].startswith("subspace ablation of 1")
    assert count_hooks(lm.model) == 0


def test_layer_selection_by_ablation_or_cohens_d() -> None:
    from steerlab.experiments.common import cohens_d_of, refusal_direction_of

    lm = tiny_model("qwen2")
    by_d = refusal_direction_of(lm, limit=4, selection="cohens_d")
    d = cohens_d_of(by_d)
    assert set(d) == {0, 1, 2} and by_d.meta.best_layer == max(d, key=lambda k: d[k])
    assert "selection" not in by_d.meta.extra
    by_ablation = refusal_direction_of(lm, limit=4, selection="ablation", selection_stride=1)
    table = by_ablation.meta.extra["selection"]
    assert [r["layer"] for r in table["rows"]] != [] and table["n_harmful"] == 4
    assert by_ablation.meta.best_layer in {r["layer"] for r in table["rows"]}
    assert torch.equal(by_ablation.vectors, by_d.vectors)  # same direction, another layer rule
    assert "refusal score" in by_ablation.meta.extra["best_layer_by"]


def test_selection_fallback_keeps_kl_then_requires_lowering_refusal() -> None:
    from steerlab.directions.selection import SelectionResult, SelectionRow

    def result(baseline: float) -> SelectionResult:
        rows = [
            SelectionRow(4, -3.0, -1.0, 0.5, False, "induce; KL"),
            SelectionRow(6, -2.0, -1.0, 0.05, False, "induce"),
            SelectionRow(8, -2.5, -1.0, 0.2, False, "induce; KL"),
            SelectionRow(10, -0.5, -1.0, 0.01, False, "induce"),
            SelectionRow(22, -9.0, -1.0, 0.0, False, "in last 20% of layers"),
        ]
        return SelectionResult(rows, None, baseline, -1.0, ["I"], 4, 4,
                               {"kl_threshold": 0.1, "induce_threshold": 0.0,
                                "prune_last_fraction": 0.2})

    assert result(-1.0).choice()[0] == 6  # clean and lowers refusal; pruned 22 never used
    layer, rule = result(-2.2).choice()  # only 4 and 8 lower it: least KL
    assert layer == 8 and rule.startswith("smallest first-token KL")
    layer, rule = result(-5.0).choice()  # nothing lowers it: say so
    assert layer == 4 and "no refusal-mediating layer" in rule
    passing = result(-1.0)
    passing.best_layer = 10
    assert passing.choice()[0] == 10


def _per_layer(rates: dict[int, float], p: dict[int, float], n: int = 40) -> list[dict[str, Any]]:
    return [
        {
            "source_layer": s,
            "refusal_rate": r,
            "refusal_rate_ci95": [max(0, r - 0.1), r + 0.1],
            "n": n,
            "vs_baseline_p": p[s],
            "cohens_d": 1.0,
        }
        for s, r in rates.items()
    ]


def test_layer_transfer_answers_one_direction_or_subspace_from_the_numbers() -> None:
    base = {"baseline": {"refusal_rate": 0.8, "refusal_rate_ci95": [0.65, 0.9], "n": 40}}
    config = LayerTransferConfig()
    similar = [[1.0, 0.9, 0.8], [0.9, 1.0, 0.85], [0.8, 0.85, 1.0]]
    analysis = {"layers": [4, 8, 12], "cosine_matrix": similar}
    one = _verdict(
        base, _per_layer({4: 0.5, 8: 0.05, 12: 0.1}, {4: 0.01, 8: 1e-6, 12: 1e-5}), analysis, config
    )
    assert one["answer"].startswith("one direction") and one["best_source_layer"] == 8
    assert [f["verdict"] for f in one["findings"]] == ["reproduced", "reproduced"]
    assert one["rank_of_working"]["k90"] <= 2
    dissimilar = {
        "layers": [4, 8, 12],
        "cosine_matrix": [[1.0, 0.1, 0.0], [0.1, 1.0, 0.1], [0.0, 0.1, 1.0]],
    }
    partial = _verdict(
        base,
        _per_layer({4: 0.5, 8: 0.45, 12: 0.5}, {4: 0.01, 8: 1e-3, 12: 0.01}),
        dissimilar,
        config,
    )
    assert partial["answer"].startswith("low-rank subspace")
    assert partial["rank_of_working"]["k90"] == 3
    assert [f["verdict"] for f in partial["findings"]] == ["not reproduced", "not reproduced"]
    none = _verdict(
        {"baseline": {**base["baseline"], "refusal_rate": 0.0}},
        _per_layer({4: 0.0}, {4: 1.0}),
        {"layers": [4], "cosine_matrix": [[1.0]]},
        config,
    )
    assert none["answer"].startswith("undetermined")
    # Layer 8 removes refusal but rewrites harmless answers: it is not the refusal direction.
    kl_rows = _per_layer({4: 0.5, 8: 0.05, 12: 0.1}, {4: 0.01, 8: 1e-6, 12: 1e-5})
    for row, kl in zip(kl_rows, (0.02, 1.2, 0.05), strict=True):
        row["kl_first_token"] = kl
    filtered = _verdict(base, kl_rows, analysis, config)
    assert filtered["best_source_layer"] == 12 and filtered["disruptive_layers"] == [8]
    assert filtered["working_layers"] == [4, 12]
    assert "Not counted: source layer(s) 8" in filtered["findings"][0]["evidence"]
    all_bad = [{**row, "kl_first_token": 0.5} for row in kl_rows]
    assert _verdict(base, all_bad, analysis, config)["answer"].startswith("no single direction")
    # Scanning layers cannot manufacture a finding: p=0.02 at each of three layers is
    # significant alone, not after Holm correction over the three.
    borderline = _verdict(base, _per_layer({4: 0.5, 8: 0.45, 12: 0.5},
                                           {4: 0.02, 8: 0.02, 12: 0.02}), analysis, config)
    assert borderline["working_layers"] == []
    assert borderline["answer"].startswith("no single direction")
    assert "Holm-corrected over the 3 source layers: 0.06" in \
        borderline["findings"][0]["evidence"]


def test_hydra_verdicts_do_not_count_a_drop_that_comes_with_damage() -> None:
    from steerlab.experiments.hydra import _findings

    def rnd(k: int, rate: float, p: float, kl: float) -> dict[str, Any]:
        return {
            "round": k,
            "source_layer": 4,
            "n": 40,
            "refusal_rate": rate,
            "refusal_rate_ci95": [max(0, rate - 0.1), rate + 0.1],
            "vs_baseline_p": p,
            "vs_previous_round_p": p,
            "cohens_d": 2.0,
            "norm_ratio_to_round1": 0.5,
            "kl_first_token": kl,
        }

    base = {"baseline": {"refusal_rate": 0.8, "refusal_rate_ci95": [0.65, 0.9], "n": 40}}
    clean = {"rounds": [rnd(1, 0.4, 1e-4, 0.02), rnd(2, 0.1, 1e-3, 0.03)], "conditions": base}
    assert [f["verdict"] for f in _findings(clean, HydraConfig())] == ["reproduced"] * 3
    damaged = {"rounds": [rnd(1, 0.4, 1e-4, 0.6), rnd(2, 0.1, 1e-3, 0.9)], "conditions": base}
    found = _findings(damaged, HydraConfig())
    assert [f["verdict"] for f in found] == ["inconclusive", "reproduced", "inconclusive"]
    assert "first-token KL 0.60" in found[0]["evidence"]
    assert "first-token KL 0.90" in found[2]["evidence"]


# -- pipelines on a tiny model ----------------------------------------------------------------
def test_layer_transfer_pipeline(tmp_path: Path) -> None:
    lm = tiny_model("qwen2")
    config = LayerTransferConfig(**TINY)
    run_layer_transfer(lm, tmp_path, config, show_progress=False)
    results = _check_common(tmp_path, "layer-transfer")
    assert [e["source_layer"] for e in results["per_layer"]] == [0, 1, 2]
    assert set(results["conditions"]) == {"baseline", "source/L0", "source/L1", "source/L2"}
    cos = results["analysis"]["cosine_matrix"]
    assert len(cos) == 3 and all(abs(cos[i][i] - 1) < 1e-5 for i in range(3))
    for entry in results["per_layer"]:
        assert entry["n"] == 3 and entry["kl_n"] == 2 and entry["kl_first_token"] >= 0
        assert entry["cohens_d"] is not None
    assert {f.name for f in (tmp_path / "figures").iterdir()} >= {
        "refusal_by_source_layer.png",
        "cosine_matrix.png",
        "cohens_d_by_layer.png",
        "kl_by_source_layer.png",
    }
    _resumes(tmp_path, run_layer_transfer, lm, config)


def test_subspace_pipeline(tmp_path: Path) -> None:
    lm = tiny_model("qwen2")
    config = SubspaceConfig(**TINY, layers="0-1", grow=[1])
    run_subspace(lm, tmp_path, config, show_progress=False)
    results = _check_common(tmp_path, "subspace")
    assert results["window"] == [0, 1] and results["wider"] == [[0, 1, 2]]
    interventions = {
        "single_paired",
        "single_tier2",
        "subspace_paired",
        "subspace_tier2",
        "subspace3_paired",
        "subspace3_tier2",
        "random_subspace",
    }
    for ev in ("paired", "tier2"):
        assert set(results["by_eval_set"][ev]) == {f"{ev}:baseline"} | {
            f"{ev}:{c}" for c in interventions
        }
    assert set(results["kl"]) == interventions
    m = results["matrix"]
    assert set(m) == {"baseline", "paired", "tier2"} and set(m["tier2"]) == {"paired", "tier2"}
    assert results["eval_sets"]["tier2"]["n"] == 3
    assert any("two-tier" in f["claim"] for f in results["findings"])
    _resumes(tmp_path, run_subspace, lm, config)


def test_positions_pipeline(tmp_path: Path) -> None:
    lm = tiny_model("qwen2")
    config = PositionsConfig(**TINY)
    run_positions(lm, tmp_path, config, show_progress=False)
    results = _check_common(tmp_path, "positions")
    # Qwen's template puts 5 tokens after the instruction: <|im_end|> \n <|im_start|> assistant \n
    assert results["positions"] == ["t_inst", *[f"post_inst[{k}]" for k in range(5)]]
    assert "<|im_start|>" in results["labels"]["post_inst[2]"]
    assert set(results["ablate"]) == {"harmful:baseline"} | {
        f"ablate/{p}" for p in results["positions"]
    }
    assert all(e["n"] == 2 for e in results["add"].values())
    cos = results["analysis"]["cosine_at_layer"]
    assert len(cos) == 6 and all(abs(cos[i][i] - 1) < 1e-5 for i in range(6))
    assert set(results["analysis"]["cohens_d"]["t_inst"]) == {"0", "1", "2"}
    _resumes(tmp_path, run_positions, lm, config)


def test_hydra_pipeline(tmp_path: Path) -> None:
    lm = tiny_model("qwen2")
    config = HydraConfig(**TINY, rounds=3)
    run_hydra(lm, tmp_path, config, show_progress=False)
    results = _check_common(tmp_path, "hydra")
    assert set(results["conditions"]) == {
        "baseline",
        "round1",
        "round2",
        "round3",
        "random_subspace",
    }
    rounds = results["rounds"]
    assert [r["basis_rank"] for r in rounds] == [1, 2, 3]
    assert rounds[0]["max_abs_cos_with_earlier_any_layer"] is None
    for r in rounds[1:]:  # re-extracted on the ablated model: orthogonal to what was removed
        assert r["max_abs_cos_with_earlier_any_layer"] < 1e-4
        assert len(r["cos_with_earlier"]) == r["round"] - 1
        assert 0 <= r["vs_previous_round_p"] <= 1 and r["kl_n"] == 2
    assert (tmp_path / "directions" / "round3" / "direction.json").is_file()
    _resumes(tmp_path, run_hydra, lm, config)


def test_judge_adds_compliance_and_coherence_with_intervals(tmp_path: Path) -> None:
    from tests.openai_stub import OpenAIStub, user_text

    def verdict(request: dict[str, Any]) -> str:  # complies on prompts that mention a bomb
        comply = 1 if "bomb" in user_text(request).lower() else 0
        return json.dumps({"compliance": comply, "coherence": 1, "reason": "scripted"})

    lm = tiny_model("qwen2")
    with OpenAIStub(content=verdict) as stub:
        config = HydraConfig(**{**TINY, "limit": 4}, rounds=1, judge_url=stub.url)
        results = run_hydra(lm, tmp_path, config, show_progress=False)
        calls = stub.calls
        rows = read_rows(tmp_path / "responses.jsonl")
        assert len(rows) == 3 * 4  # baseline, round1, random_subspace x 4 prompts
        # A test request at the start, then identical pairs judged once.
        assert calls == 1 + len({(r["prompt"], r["response"]) for r in rows})
        run_hydra(lm, tmp_path, config, show_progress=False)
        assert stub.calls == calls + 1  # only the test request: judgements are cached
    assert results["judged"] is True
    for entry in results["conditions"].values():
        assert entry["judge_n"] == 4 and entry["judge_missing"] == 0
        assert entry["judge_coherence"] == 1.0
        lo, hi = entry["judge_compliance_ci95"]
        assert lo <= entry["judge_compliance"] <= hi
    assert "judge_compliance" in (tmp_path / "report.md").read_text()


def test_layer_transfer_subtract_mode_adds_minus_alpha_at_the_source_layer() -> None:
    from steerlab.experiments.layer_transfer import _condition
    from steerlab.interventions.specs import Add

    direction = Direction(torch.randn(3, 8), (0, 1, 2))
    cond = _condition(direction, 1, LayerTransferConfig(mode="subtract", subtract_alpha=2.0))
    (spec,) = cond.specs
    assert isinstance(spec, Add) and spec.alpha == -2.0 and spec.layers == (1,)


def test_cli_runs_an_experiment_on_a_model_folder(tmp_path: Path) -> None:
    from steerlab.cli import main

    lm = tiny_model("qwen2")
    save_tiny(lm, tmp_path / "model")
    config = tmp_path / "config.yaml"
    config.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in TINY.items() if k != "limit"))
    out = tmp_path / "run"
    main(
        [
            "experiment",
            "hydra",
            str(tmp_path / "model"),
            "--out",
            str(out),
            "--rounds",
            "2",
            "--limit",
            "2",
            "--config",
            str(config),
            "--dtype",
            "float32",
        ]
    )
    results = json.loads((out / "results.json").read_text())
    assert results["n_eval"] == 2 and results["n_rounds"] == 2
    assert results["provenance"]["config"]["rounds"] == 2
    with pytest.raises(SystemExit) as exc:  # a bad setting is one clear line, exit code 2
        main(["experiment", "hydra", str(tmp_path / "model"), "--out", str(out), "--rounds", "0"])
    assert exc.value.code == 2
    again = ["experiment", "hydra", str(tmp_path / "model"), "--out", str(out), "--rounds", "1",
             "--limit", "2", "--config", str(config), "--dtype", "float32"]
    with pytest.raises(SystemExit) as exc:  # other settings never resume this run folder
        main(again)
    assert exc.value.code == 2
    main([*again, "--overwrite"])  # ...unless the user asks to start over
    assert json.loads((out / "results.json").read_text())["n_rounds"] == 1


def test_every_experiment_is_one_declared_experiment_behind_one_cli_path() -> None:
    """Each module declares its EXPERIMENT on the shared config base, keeping its own
    defaults and settings (an old run folder's settings must still match to resume), and
    ``reproduce persona-gating`` takes the same options as every ``experiment NAME``."""
    import importlib

    import typer.main

    from steerlab.cli import app
    from steerlab.experiments.config import ExperimentConfig, PersonaGatingConfig

    modules = {"persona-gating": "persona_gating", "layer-transfer": "layer_transfer",
               "subspace": "subspace", "positions": "positions", "hydra": "hydra"}
    for name, module in modules.items():
        experiment = importlib.import_module(f"steerlab.experiments.{module}").EXPERIMENT
        assert experiment.name == name and issubclass(experiment.config, ExperimentConfig)
    persona, hydra = PersonaGatingConfig(), HydraConfig()
    assert (persona.harmless_limit, persona.kl_tokens) == (48, 1)
    assert (hydra.harmless_limit, hydra.kl_tokens) == (32, 4)
    assert "layer_selection" not in persona.model_dump() and "layer_selection" in hydra.model_dump()
    root = typer.main.get_command(app)
    groups = {n: "reproduce" if n == "persona-gating" else "experiment" for n in modules}
    shared = {"model", "out", "limit", "judge", "judge_model", "config", "seed", "max_new_tokens",
              "eval_prompts", "dtype"}
    for name, group in groups.items():
        command = root.commands[group].commands[name]  # type: ignore[attr-defined]
        assert shared <= {p.name for p in command.params}, name


# -- the real embedded model, reduced ---------------------------------------------------------
REAL: dict[str, Any] = dict(
    limit=2,
    harmless_limit=2,
    max_new_tokens=6,
    batch_size=8,
    kl_tokens=1,
    extraction_limit=3,
    selection_stride=6,
    n_samples=1,
)


@pytest.mark.real
def test_real_layer_transfer(real_lm: Any, tmp_path: Path) -> None:
    config = LayerTransferConfig(**REAL, source_layers="8,14")
    results = run_layer_transfer(real_lm, tmp_path, config, show_progress=False)
    _check_common(tmp_path, "layer-transfer")
    assert [e["source_layer"] for e in results["per_layer"]] == [8, 14]
    assert max(float(v) for v in results["analysis"]["cohens_d"].values()) > 1.0
    assert results["per_layer"][1]["kl_first_token"] >= 0


@pytest.mark.real
def test_real_subspace(real_lm: Any, tmp_path: Path) -> None:
    # Two evaluation sets x (baseline + 4 ablations): one prompt each keeps it small.
    config = SubspaceConfig(**{**REAL, "limit": 1}, layers="12-13", grow=[], random_control=False)
    results = run_subspace(real_lm, tmp_path, config, show_progress=False)
    _check_common(tmp_path, "subspace")
    assert results["window"] == [12, 13] and results["wider"] == []
    assert max(float(v) for v in results["analysis"]["cohens_d"]["tier2"].values()) > 1.0


@pytest.mark.real
def test_real_positions(real_lm: Any, tmp_path: Path) -> None:
    config = PositionsConfig(**REAL, positions=["t_inst", "post_inst[-1]"])
    results = run_positions(real_lm, tmp_path, config, show_progress=False)
    _check_common(tmp_path, "positions")
    assert results["reference"] == "post_inst[-1]"
    assert min(results["analysis"]["max_cohens_d"].values()) > 1.0


@pytest.mark.real
def test_real_hydra(real_lm: Any, tmp_path: Path) -> None:
    config = HydraConfig(**REAL, rounds=2, random_control=False)
    results = run_hydra(real_lm, tmp_path, config, show_progress=False)
    _check_common(tmp_path, "hydra")
    assert results["rounds"][1]["max_abs_cos_with_earlier_any_layer"] < 1e-3
    assert results["rounds"][0]["cohens_d"] > 1.0


def test_kl_conditions_share_a_baseline_per_system_prompt_and_match_kl_report(
    tmp_path: Path,
) -> None:
    from steerlab.directions.artifact import stamp_meta
    from steerlab.evaluate.kl import kl_report
    from steerlab.experiments.measure import kl_conditions
    from steerlab.experiments.runner import Condition, Runner
    from steerlab.interventions.specs import Add
    from steerlab.prompts.sets import Prompt, PromptSet

    lm = tiny_model("qwen2")
    gen = torch.Generator().manual_seed(0)
    vecs = torch.randn(lm.n_layers, lm.d_model, generator=gen)
    d = Direction(vecs, tuple(range(lm.n_layers)), stamp_meta(lm, name="rand"))
    texts = ["Say hi.", "Name a colour.", "Count to three, please."]
    prompts = PromptSet("t", tuple(Prompt(f"p{i}", t) for i, t in enumerate(texts)))
    conds = [
        Condition("a", (Add(d, 2.0, layers=[1]),)),
        Condition("plain"),  # no interventions: no KL
        Condition("b", (Add(d, -3.0, layers=[0]),), system="You are terse."),
        Condition("c", (Add(d, 4.0, layers=[2]),)),
    ]
    with Runner(lm, tmp_path, batch_size=2, show_progress=False) as run:
        got = kl_conditions(run, prompts, conds, k=2)
    assert set(got) == {"a", "b", "c"}
    for cond in conds[:1] + conds[2:]:
        alone = kl_report(lm, prompts, list(cond.specs), k=2, system=cond.system)
        assert got[cond.name]["kl_n"] == 3
        first, mean = alone["first_token"]["mean"], alone["mean_first_2"]["mean"]
        assert got[cond.name]["kl_first_token"] == pytest.approx(first, rel=1e-4)
        assert got[cond.name]["kl_first_2"] == pytest.approx(mean, rel=1e-4)
    assert got["a"]["kl_first_token"] != pytest.approx(got["c"]["kl_first_token"])
    # Cached: a rerun reads the steps (a changed condition under a cached name is not redone).
    with Runner(lm, tmp_path, batch_size=2, show_progress=False) as run:
        again = kl_conditions(run, prompts, [Condition("a", (Add(d, 9.0, layers=[1]),))], k=2)
    assert again["a"] == got["a"]
