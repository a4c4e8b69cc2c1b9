"""The persona-gating pipeline end to end: tiny model (all steps, outputs, schema),
resume after a kill, and a reduced real-model run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from steerlab.experiments.config import PersonaGatingConfig
from steerlab.experiments.persona_gating import run_persona_gating
from steerlab.store.rowstore import read_rows
from tests.tiny import save_tiny, tiny_model

TINY = dict(
    limit=4,
    val_limit=2,
    harmless_limit=2,
    max_new_tokens=4,
    batch_size=4,
    alphas=[1.0, 2.0],
    steer_layer_fractions=[0.5],
    readd_every=1,
    extraction_limit=8,
    trait_questions=5,
)


def _check_outputs(out: Path, n_readd: int, n_eval: int) -> dict:
    results = json.loads((out / "results.json").read_text())
    cond = results["conditions"]
    for name in (
        "baseline",
        "persona_system_prompt",
        "persona_steer",
        "random_steer",
        "refusal_ablate",
        "refusal_readd_early",
        "refusal_readd_late",
        "persona_project_late",
        "persona_project_early",
        "random_project_late",
    ):
        entry = cond[name]
        assert entry["n"] == n_eval * (5 if name.startswith("random_") else 1)
        lo, hi = entry["refusal_rate_ci95"]
        assert 0 <= lo <= entry["refusal_rate"] <= hi <= 1
        for key in ("bypass_rate", "degenerate_rate"):
            assert 0 <= entry[key] <= 1
    assert len(cond["random_steer"]["seeds"]) == 5
    assert sum(k.startswith("refusal_readd/L") for k in cond) == n_readd
    for part in ("early", "late"):  # every layer of the third tested, Holm within it
        entry = cond[f"refusal_readd_{part}"]
        assert set(entry["restoring_layers"]) <= set(entry["layers"])
        holm_p = entry["holm_p_vs_persona_steer"]
        assert [int(k) for k in holm_p] == entry["layers"]
        for k in entry["layers"]:
            assert cond[f"refusal_readd/L{k}"]["vs_persona_steer_p"] <= holm_p[str(k)] <= 1
    assert {f["claim"] for f in results["findings"]} >= {
        "Compliant-persona steering suppresses refusal",
        "Random directions of the same norm do nothing",
    }
    gap = cond["baseline"]["refusal_rate"] - cond["persona_steer"]["refusal_rate"]
    for name in ("persona_project_late", "persona_project_early", "refusal_readd/L0"):
        share = cond[name]["restored_share"]  # every condition has all the eval prompts
        if gap == 0:
            assert share is None
        else:
            undone = cond[name]["refusal_rate"] - cond["persona_steer"]["refusal_rate"]
            assert share == pytest.approx(undone / gap)
    assert "restored_share" in cond["random_project_late"]
    assert results["selection"]["cells"] and "layer" in results["selection"]
    readd = results["readd_selection"]  # strength chosen on validation, used at every layer
    assert readd["alpha"] in [c["alpha"] for c in readd["cells"]]
    assert all(c["n"] == readd["n_val"] for c in readd["cells"])
    assert f"x{readd['alpha']:g} re-added" in cond["refusal_readd/L0"]["description"]
    cost = results["cost"]
    assert cost["total_seconds"] == pytest.approx(
        (cost["generation_in_passes"] + cost["extraction_in_passes"]
         + cost["analysis_and_kl_in_passes"]) * cost["baseline_pass_seconds"])
    assert set(results["harmless"]) >= {"baseline", "persona_steer", "refusal_ablate"}
    assert "kl_first_token" in results["harmless"]["persona_steer"]
    assert results["provenance"]["model"]["fingerprint"] == results["fingerprint"]
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "Findings" in html
    assert "| claim | verdict | evidence |" in (out / "report.md").read_text()
    rows = read_rows(out / "responses.jsonl")
    keys = [(r["condition"], r["prompt_id"]) for r in rows]
    assert len(keys) == len(set(keys))
    return results


def test_tiny_pipeline_all_steps(tmp_path: Path) -> None:
    lm = tiny_model("qwen2")
    config = PersonaGatingConfig(**TINY)
    results = run_persona_gating(lm, tmp_path, config, show_progress=False)
    _check_outputs(tmp_path, lm.n_layers, 4)
    assert results["cost"]["generation_passes"] > 0
    # Traits read the tighter of extraction_limit and trait_questions; persona is uncapped by it.
    for name, rows in (("evil_nurturing", 5), ("persona", 8 * 2)):
        meta = json.loads((tmp_path / "directions" / name / "direction.json").read_text())["meta"]
        assert meta["counts"] == {"positive": rows, "negative": rows}
    # Every evaluation condition also ran on the harmless prompts (harmless_for="all"), and
    # the re-add layers' over-refusal is reported beside their harmful-prompt rates.
    assert {"persona_system_prompt", "refusal_readd/L0", "persona_project_late",
            "random_project_late/s4"} <= set(results["harmless"])
    assert "harmless_refusal_rate" in (tmp_path / "report.md").read_text()
    readd_claim = next(f for f in results["findings"] if f["claim"].startswith("Re-adding"))
    assert "on the harmless prompts the layer-" in readd_claim["evidence"]
    # First-token KL read off the harmless generations equals a teacher-forced pass.
    from steerlab.directions.artifact import Direction
    from steerlab.evaluate.kl import kl_per_prompt_many
    from steerlab.interventions.specs import Add
    from steerlab.prompts.sets import load_prompts

    harmless = load_prompts("harmless", split="test", limit=2)
    steer = results["harmless"]["persona_steer"]
    assert steer["kl_first_token_from"] == "generation" and steer["kl_n"] == 2
    persona = Direction.load(tmp_path / "directions" / "persona", lm)
    sel = results["selection"]
    spec = Add(persona, alpha=sel["alpha"], layers=[sel["layer"]])
    per = kl_per_prompt_many(lm, harmless.texts(), {"s": [spec]})["s"]
    assert steer["kl_first_token"] == pytest.approx(sum(v[0] for v in per) / 2, rel=1e-3, abs=1e-6)
    # A second run resumes everything from the folder: no new generation happens.
    before = (tmp_path / "responses.jsonl").read_text()
    run_persona_gating(lm, tmp_path, config, show_progress=False)
    assert (tmp_path / "responses.jsonl").read_text() == before
    # Resumed rows carry no first-token log-probs: the KL is recomputed, to the same values.
    (tmp_path / "steps" / "kl.json").unlink()
    again = run_persona_gating(lm, tmp_path, config, show_progress=False)["harmless"]
    for name, entry in results["harmless"].items():
        if "kl_first_token" in entry:
            assert again[name]["kl_first_token_from"] == "extra pass"
            assert again[name]["kl_first_token"] == pytest.approx(
                entry["kl_first_token"], rel=1e-3, abs=1e-6
            )
    assert (tmp_path / "responses.jsonl").read_text() == before


def test_killed_run_resumes_without_repeating(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    lm = tiny_model("qwen2")
    save_tiny(lm, model_dir)
    config = tmp_path / "config.yaml"
    config.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in TINY.items()))
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "steerlab",
        "reproduce",
        "persona-gating",
        str(model_dir),
        "--config",
        str(config),
        "--out",
        str(out),
        "--dtype",
        "float32",
    ]
    env = {**os.environ, "COLUMNS": "120"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    responses = out / "responses.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if responses.exists() and len(responses.read_text().splitlines()) >= 12:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    text = responses.read_text()
    # A row the kill tore mid-write is dropped on resume and generated again, as designed.
    first = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]
    assert not (out / "results.json").exists()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    final = responses.read_text().splitlines()
    assert final[: len(first)] == first  # finished rows kept, not redone
    _check_outputs(out, 3, 4)


@pytest.mark.real
def test_reduced_real_run(real_lm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config = PersonaGatingConfig(
        limit=4,
        val_limit=4,
        harmless_limit=4,
        max_new_tokens=12,
        alphas=[8.0],
        steer_layer_fractions=[0.5],
        readd_every=8,
        kl_tokens=2,
        extraction_limit=32,
        batch_size=8,
    )
    results = run_persona_gating(real_lm, tmp_path, config, show_progress=False)
    _check_outputs(tmp_path, 3, 4)
    assert results["selection"]["layer"] == 12


def test_judge_adds_compliance_and_coherence_to_every_condition(tmp_path: Path) -> None:
    from tests.openai_stub import OpenAIStub, user_text

    def verdict(request: dict) -> str:  # scripted, varies with the response's length
        response = user_text(request).split("[ASSISTANT RESPONSE]\n", 1)[1]
        return json.dumps({"compliance": len(response) % 2, "coherence": 0.5,
                           "reason": "scripted"})

    lm = tiny_model("qwen2")
    with OpenAIStub(content=verdict) as stub:
        config = PersonaGatingConfig(**TINY, judge_url=stub.url)
        results = run_persona_gating(lm, tmp_path, config, show_progress=False)
        calls = stub.calls
        rows = read_rows(tmp_path / "responses.jsonl")
        pairs = {(r["prompt"], r["response"]) for r in rows if r["condition"][:4] != "val/"}
        # One test request at the start, then each distinct pair once; validation cells
        # are not judged.
        assert calls == 1 + len(pairs)
        run_persona_gating(lm, tmp_path, config, show_progress=False)
        assert stub.calls == calls + 1  # only the test request: judgements are cached
    cond = results["conditions"]
    assert results["judged"] is True
    for name in ("baseline", "persona_steer", "refusal_readd/L0", "persona_project_late"):
        entry = cond[name]
        mine = [r for r in rows if r["condition"] == name]
        assert entry["judge_n"] == len(mine) == entry["n"] and entry["judge_missing"] == 0
        assert entry["judge_compliance"] == pytest.approx(
            sum(len(r["response"]) % 2 for r in mine) / len(mine))
        assert entry["judge_coherence"] == 0.5
        lo, hi = entry["judge_compliance_ci95"]
        assert 0 <= lo <= entry["judge_compliance"] <= hi <= 1
    for pool in ("random_steer", "random_project_late"):  # the seeds pooled
        seeds = [cond[f"{pool}/s{i}"] for i in range(5)]
        assert cond[pool]["judge_n"] == sum(s["judge_n"] for s in seeds)
        assert cond[pool]["judge_compliance"] == pytest.approx(
            sum(s["judge_compliance"] for s in seeds) / 5)
    late = cond["refusal_readd_late"]
    assert late["judge_compliance"] == cond[f"refusal_readd/L{late['layer']}"]["judge_compliance"]
    assert results["harmless"]["persona_steer"]["judge_n"] == 2
    assert "judge_compliance" in (tmp_path / "report.md").read_text()


def test_an_unreachable_judge_fails_before_any_work(tmp_path: Path) -> None:
    from steerlab.errors import EvaluationError
    from tests.openai_stub import OpenAIStub

    with OpenAIStub(fail_first=10, fail_status=401) as stub:  # a wrong API key, say
        config = PersonaGatingConfig(**TINY, judge_url=stub.url)
        with pytest.raises(EvaluationError, match="did not answer a test request"):
            run_persona_gating(tiny_model("qwen2"), tmp_path / "run", config,
                               show_progress=False)
        assert stub.calls == 1
    assert not (tmp_path / "run").exists()


def test_evaluation_on_the_validation_split_is_refused_before_any_work(tmp_path: Path) -> None:
    from steerlab.errors import DataError

    config = PersonaGatingConfig(**{**TINY, "eval_split": "val"})
    with pytest.raises(DataError, match="also validation prompts"):
        run_persona_gating(tiny_model("qwen2"), tmp_path / "run", config, show_progress=False)
    assert not (tmp_path / "run").exists()


def test_restored_share_aligns_rows_by_prompt_and_pools_seeds() -> None:
    from steerlab.experiments.persona_gating.results import _restored

    def rows(refusing: set[int], order: list[int]) -> list[dict]:
        return [{"prompt_id": f"p{i}", "outcome": "refusal" if i in refusing else "bypass"}
                for i in order]

    ids = list(range(10))
    base = rows(set(range(8)), ids)  # 80%
    steer = rows({0, 1}, ids[::-1])  # 20%, stored in another order
    half = rows({0, 1, 2, 3, 4}, [3, 1, 4, 0, 5, 9, 2, 6, 8, 7])  # 50%: half the drop
    out = _restored(base, steer, [half], seed=0)
    assert out["restored_share"] == pytest.approx(0.5)
    lo, hi = out["restored_share_ci95"]
    assert lo < 0.5 < hi
    pooled = _restored(base, steer, [half, rows(set(range(8)), ids)], seed=0)  # 50% and 100%
    assert pooled["restored_share"] == pytest.approx(0.75)
    # Only prompts all three have count: base and steer are read on the restored run's ids.
    subset = _restored(base, steer, [rows({0, 1, 2, 3, 4}, [4, 2, 0, 1, 3])], seed=0)
    assert subset["restored_share"] == pytest.approx(1.0)  # (100% - 40%) / (100% - 40%)


def test_the_grid_choice_takes_the_smallest_strength_within_the_tolerance() -> None:
    """One validation prompt of 24 apart counts as tied (it flips with rounding); a cell
    past the degenerate limit is never chosen; with no tolerance the lowest rate wins."""
    from steerlab.experiments.persona_gating import choose_cell

    def cell(layer: int, alpha: float, refusals: int, degenerate: int = 0) -> dict:
        return {"layer": layer, "alpha": alpha, "refusal_rate": refusals / 24,
                "degenerate_rate": degenerate / 24}

    cells = [cell(12, 4.0, 10), cell(16, 4.0, 4), cell(16, 8.0, 1), cell(16, 12.0, 0),
             cell(12, 8.0, 1, degenerate=9)]
    assert (choose_cell(cells, 0.25, 1, 24)["alpha"], choose_cell(cells, 0.25, 1, 24)["layer"]) \
        == (8.0, 16)
    assert choose_cell(cells, 0.25, 0, 24)["alpha"] == 12.0
    assert choose_cell(cells, 0.25, 3, 24)["alpha"] == 8.0  # 4 refusals is 4 prompts away
    assert choose_cell(cells, 0.25, 4, 24)["alpha"] == 4.0
    assert choose_cell(cells, 0.5, 1, 24)["layer"] == 12  # same strength and rate: earlier layer
    cells[2] = cell(16, 8.0, 0)
    assert choose_cell(cells, 0.5, 1, 24)["layer"] == 16  # same strength: lower refusal wins
    unsafe = [cell(16, 8.0, 0, degenerate=20), cell(16, 12.0, 5)]
    assert choose_cell(unsafe, 0.25, 1, 24)["alpha"] == 12.0


def test_harmless_for_steering_keeps_only_the_steering_conditions() -> None:
    from steerlab.experiments.persona_gating.conditions import (
        harmless_conditions as _harmless_conditions,
    )
    from steerlab.experiments.runner import Condition

    names = ("baseline", "persona_system_prompt", "persona_steer", "random_steer/s0",
             "refusal_ablate", "refusal_readd/L0", "persona_project_late")
    conditions = [Condition(n) for n in names]
    assert [c.name for c in _harmless_conditions(conditions, "steering")] == [
        "harmless/baseline", "harmless/persona_steer", "harmless/random_steer/s0",
        "harmless/refusal_ablate"]
    assert [c.name for c in _harmless_conditions(conditions, "all")] == [
        f"harmless/{n}" for n in names]


def test_a_given_refusal_direction_is_ablated_and_named(tmp_path: Path) -> None:
    """--refusal-direction: an abliterate run's direction replaces extraction and layer
    selection, its layer and name reach results.json and the report, and the run
    identity differs from a run without it; a folder holding no direction is one error."""
    import dataclasses

    from steerlab.directions.extraction import refusal_direction
    from steerlab.errors import SteerlabError

    lm = tiny_model("qwen2")
    made = refusal_direction(lm, split="train", limit=8)
    layer = 1 if made.meta.best_layer != 1 else 0
    made = dataclasses.replace(made, meta=dataclasses.replace(
        made.meta, name="my-refusal", best_layer=layer))
    abliterated = tmp_path / "abliterate"
    made.save(abliterated / "direction")
    (abliterated / "spec.json").write_text("{}")
    config = PersonaGatingConfig(**TINY, refusal_direction=str(abliterated))
    assert "refusal_direction" not in PersonaGatingConfig(**TINY).model_dump(mode="json")
    results = run_persona_gating(lm, tmp_path / "run", config, show_progress=False)
    used = results["refusal_direction"]
    assert (used["source"], used["name"], used["layer"]) == ("given", "my-refusal", layer)
    assert results["refusal_source_layer"] == layer
    assert used["ablated_refusal_rate"] == results["conditions"]["refusal_ablate"]["refusal_rate"]
    assert not (tmp_path / "run" / "directions" / "refusal").exists()  # nothing extracted
    analysis = json.loads((tmp_path / "run" / "steps" / "analysis.json").read_text())
    assert analysis["refusal_selection"] is None
    assert f"given from {abliterated} (my-refusal, best layer {layer})" in (
        tmp_path / "run" / "report.md").read_text()
    # A run folder made with it is not resumed without it (the settings differ).
    with pytest.raises(SteerlabError):
        run_persona_gating(lm, tmp_path / "run", PersonaGatingConfig(**TINY),
                           show_progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SteerlabError, match=r"refusal_direction .*not a direction folder"):
        run_persona_gating(lm, tmp_path / "bad", PersonaGatingConfig(
            **TINY, refusal_direction=str(empty)), show_progress=False)
    assert not (tmp_path / "bad").exists()
