"""steerlab abliterate: the KernelAblate spec, the search loop, resume, and bad input."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from steerlab.abliterate import (
    AbliterateConfig,
    NothingToRemoveError,
    StudyMismatchError,
    Verdicts,
    abliterate,
    make_scorer,
)
from steerlab.abliterate.priors import plain_ablation, prior_params
from steerlab.abliterate.search import prompt_sets
from steerlab.abliterate.space import to_spec
from steerlab.cli import main
from steerlab.directions.artifact import Direction
from steerlab.errors import EvaluationError, InterventionError, SteerlabError
from steerlab.generation.generate import generate
from steerlab.interventions.kernel_ablate import Kernel, KernelAblate
from steerlab.interventions.specs import Ablate, parse_steer, spec_from_dict, spec_to_dict
from steerlab.interventions.steering import count_hooks, steer
from steerlab.store.outputs import OutputError
from tests.tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(trials=3, startup_trials=2, train_limit=6, harmful_val_limit=5, harmless_val_limit=4,
            over_refusal_limit=3, max_new_tokens=5, evaluate=False)


class SameAsBaseline:
    """Scores a response as a refusal when it is the unedited model's response: on a random
    tiny model this makes "every prompt refused at baseline" and lets a trial lower it."""

    def __init__(self, lm, prompts: list[str], max_new_tokens: int) -> None:
        self.base = {p: g.response for p, g in zip(
            prompts, generate(lm, prompts, max_new_tokens=max_new_tokens), strict=True)}

    def describe(self) -> dict:
        return {"kind": "same-as-baseline"}

    def __call__(self, pairs, *, harmful: bool) -> Verdicts:
        return Verdicts(["refusal" if self.base[p] == r else "bypass" for p, r in pairs])


def tiny_scorer(lm, config: AbliterateConfig) -> SameAsBaseline:
    sets = prompt_sets(config)
    return SameAsBaseline(lm, sets["harmful_val"] + sets["over_refusal"], config.max_new_tokens)


def random_direction(lm, seed: int = 0) -> Direction:
    gen = torch.Generator().manual_seed(seed)
    return Direction(torch.randn(lm.n_layers, lm.d_model, generator=gen),
                     tuple(range(lm.n_layers)))


def logits(lm, specs=()):
    ids = lm.tokenizer("hello world how are you", return_tensors="pt").input_ids
    with steer(lm, list(specs)), torch.no_grad():
        return lm.model(input_ids=ids).logits


# -- the spec --------------------------------------------------------------------------------
def test_kernel_weights_are_a_tent_over_a_floor():
    k = Kernel(peak=1.0, center=2.0, width=2.0, floor=0.2)
    assert k.weights(6) == pytest.approx([0.2, 0.6, 1.0, 0.6, 0.2, 0.2])
    assert Kernel(1.5, 3.2, 0.0).weights(5) == [0.0, 0.0, 0.0, 1.5, 0.0]
    with pytest.raises(InterventionError, match="width"):
        Kernel(1.0, 2.0, -1.0)


def test_kernel_ablate_rejects_bad_values():
    with pytest.raises(InterventionError, match="rank"):
        KernelAblate("runs/x", 1.0, [1, 1, 1, 0], [1, 1, 1, 0], rank=0)
    with pytest.raises(InterventionError, match="source"):
        KernelAblate("runs/x", -1.0, [1, 1, 1, 0], [1, 1, 1, 0])
    with pytest.raises(InterventionError, match="kernel"):
        KernelAblate("runs/x", 1.0, "wide", [1, 1, 1, 0])


def test_kernel_ablate_json_round_trip_through_steer(tmp_path):
    lm = tiny_model("qwen2")
    spec = KernelAblate(random_direction(lm), 1.4, [1.2, 1.0, 1.5, 0.1], [0.7, 2.0, 1.0, 0.0],
                        rank=2)
    data = spec_to_dict(spec)
    assert data["op"] == "kernel_ablate"
    assert list(data["attn"]) == [1.2, 1.0, 1.5, pytest.approx(0.1)]
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"format_version": 1, "steer": [data]}))
    back = parse_steer(str(path))[0]
    assert isinstance(back, KernelAblate) and back.rank == 2 and back.mlp == spec.mlp
    assert torch.allclose(logits(lm, [back]), logits(lm, [spec]))
    assert spec_from_dict(data).source == 1.4


def test_unit_kernels_at_an_integer_source_equal_ablate_at_attn_and_mlp():
    lm = tiny_model("qwen2")
    d = random_direction(lm)
    everywhere = [1.0, 0.0, 0.0, 1.0]  # floor 1: weight 1 at every layer
    kernel = KernelAblate(d, 1.0, everywhere, everywhere)
    ablate = Ablate(d, layers="all", source_layer=1, sites=("attn", "mlp"))
    assert torch.allclose(logits(lm, [kernel]), logits(lm, [ablate]), atol=1e-5)
    assert not torch.allclose(logits(lm, [kernel]), logits(lm), atol=1e-3)


def test_fractional_source_interpolates_neighbouring_unit_vectors():
    lm = tiny_model("qwen2")
    d = random_direction(lm)
    spec = KernelAblate(d, 0.25, [1, 0, 0, 1], [1, 0, 0, 1])
    expected = 0.75 * d.vector(0, unit=True) + 0.25 * d.vector(1, unit=True)
    basis = spec.basis(d)
    assert basis.shape == (lm.d_model, 1)
    cos = torch.nn.functional.cosine_similarity(basis[:, 0], expected.float(), dim=0)
    assert abs(float(cos)) == pytest.approx(1.0, abs=1e-5)
    deep = Direction(torch.randn(6, 16), tuple(range(6)))
    assert KernelAblate(deep, 0.25, [1, 0, 0, 1], [1, 0, 0, 1], rank=3).basis(deep).shape[1] == 3
    assert KernelAblate(d, 0.25, [1, 0, 0, 1], [1, 0, 0, 1], rank=3).basis(d).shape[1] == 2


def test_a_fresh_study_starts_from_plain_selection(tmp_path):
    lm = tiny_model("qwen2")
    config = AbliterateConfig(**{**TINY, "trials": 4, "positions": ["last"]})
    abliterate(lm, tmp_path / "run", config, scorer=tiny_scorer(lm, config))
    trials = json.loads((tmp_path / "run" / "trials.json").read_text())
    assert [t["prior"] for t in trials[:3]] == ["everywhere@last", "local@last", "late@last"]
    assert trials[3]["prior"] is None  # then the sampler's own draws
    selection = json.loads((tmp_path / "run" / "selection.json").read_text())["last"]
    layer = selection["layer"]
    assert selection["kl_cap"] == config.kl_cap
    assert trials[0]["params"] == prior_params(layer, "last", lm.n_layers)["everywhere"]
    candidate = Direction.load(tmp_path / "run" / "candidates" / "last", lm)
    everywhere = to_spec(prior_params(1, "last", lm.n_layers)["everywhere"], candidate)
    plain = plain_ablation(candidate, {"layer": 1})
    assert plain.layers == "all" and plain.source_layer == 1
    plain = Ablate(candidate, layers="all", source_layer=1, sites=("attn", "mlp"))
    assert torch.allclose(logits(lm, [everywhere]), logits(lm, [plain]), atol=1e-5)


def test_hooks_are_removed_when_the_block_raises():
    lm = tiny_model("qwen2")
    spec = KernelAblate(random_direction(lm), 1.0, [1, 1, 1, 0], [1, 1, 1, 0])
    with pytest.raises(RuntimeError), steer(lm, [spec]):
        assert count_hooks(lm.model) > 0
        raise RuntimeError("boom")
    assert count_hooks(lm.model) == 0


# -- the search ------------------------------------------------------------------------------
def test_search_writes_an_artifact_every_steer_accepts(tmp_path):
    lm = tiny_model("qwen2")
    config = AbliterateConfig(**TINY)
    result = abliterate(lm, tmp_path / "run", config, scorer=tiny_scorer(lm, config))
    run = tmp_path / "run"
    assert result.n_trials == 3
    assert result.baseline.refusals == result.baseline.n_harmful == 5
    assert result.choice.score.refusals <= result.baseline.refusals
    trials = json.loads((run / "trials.json").read_text())
    assert len(trials) == 3 and any(t["pareto"] for t in trials)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["budget"] == 3 and manifest["sampler"]["seed"] == 0
    assert manifest["study"]["model_fingerprint"] == lm.fingerprint
    assert set(manifest["prompt_files"]) >= {"harmful_train", "harmful_val"}
    spec = parse_steer(str(run / "spec.json"))
    assert isinstance(spec[0], KernelAblate)
    chosen = result.choice.trial.params
    assert spec[0].source == pytest.approx(chosen["source"])
    assert torch.allclose(logits(lm, spec), logits(lm, [result.spec]))
    assert Direction.load(run / "direction", lm).meta.best_layer == round(chosen["source"])
    assert count_hooks(lm.model) == 0


def test_resume_keeps_finished_trials_and_refuses_other_settings(tmp_path):
    lm = tiny_model("qwen2")
    config = AbliterateConfig(**{**TINY, "trials": 2})
    scorer = tiny_scorer(lm, config)
    abliterate(lm, tmp_path / "run", config, scorer=scorer)
    first = json.loads((tmp_path / "run" / "trials.json").read_text())
    more = abliterate(lm, tmp_path / "run", config.model_copy(update={"trials": 4}),
                      scorer=scorer)
    after = json.loads((tmp_path / "run" / "trials.json").read_text())
    def kept(rows):  # the Pareto flag may change as trials are added; the rest may not
        return [{k: v for k, v in r.items() if k != "pareto"} for r in rows]

    assert more.n_trials == 4 and kept(after[:2]) == kept(first)
    params = [json.dumps(t["params"], sort_keys=True) for t in after]
    assert len(set(params)) == 4  # no trial drawn twice
    with pytest.raises(StudyMismatchError, match=r"settings\.max_new_tokens"):
        abliterate(lm, tmp_path / "run", config.model_copy(update={"max_new_tokens": 7}),
                   scorer=scorer)
    other = tiny_model("qwen2", seed=1)
    with pytest.raises(StudyMismatchError, match="model_fingerprint"):
        abliterate(other, tmp_path / "run", config, scorer=scorer)


KILLED_RUN = """
import sys, time
sys.path.insert(0, {root!r})
from tests.test_abliterate import TINY, tiny_scorer
from tests.tiny import tiny_model
from steerlab.abliterate import AbliterateConfig, abliterate
import steerlab.abliterate.objective as objective

lm = tiny_model("qwen2")
config = AbliterateConfig(**{{**TINY, "trials": 50}})
scorer = tiny_scorer(lm, config)
slow = objective.Objective.__call__
def slowed(self, specs):
    out = slow(self, specs)
    time.sleep(0.5)
    return out
objective.Objective.__call__ = slowed
abliterate(lm, {out!r}, config, scorer=scorer)
"""


def complete_trials(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db) as con:
            return con.execute("select count(*) from trials where state='COMPLETE'").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_a_killed_study_resumes_without_repeating_a_trial(tmp_path):
    out = tmp_path / "run"
    code = KILLED_RUN.format(root=str(ROOT), out=str(out))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT)
    try:
        deadline = time.time() + 120
        while complete_trials(out / "study.db") < 2 and time.time() < deadline:
            assert proc.poll() is None, "the search process died before it was killed"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    killed_done = complete_trials(out / "study.db")
    assert 2 <= killed_done < 50
    with sqlite3.connect(out / "study.db") as con:
        before = con.execute("select number from trials where state='COMPLETE'").fetchall()
    lm = tiny_model("qwen2")
    config = AbliterateConfig(**{**TINY, "trials": killed_done + 1})
    result = abliterate(lm, out, config, scorer=tiny_scorer(lm, config))
    assert result.n_trials == killed_done + 1
    trials = json.loads((out / "trials.json").read_text())
    assert [t["number"] for t in trials[:killed_done]] == [n for (n,) in before]
    assert len({json.dumps(t["params"], sort_keys=True) for t in trials}) == len(trials)


# -- bad input -------------------------------------------------------------------------------
class NeverRefuses:
    def describe(self) -> dict:
        return {"kind": "never"}

    def __call__(self, pairs, *, harmful: bool) -> Verdicts:
        return Verdicts(["bypass"] * len(pairs))


def test_a_model_that_refuses_nothing_stops_before_searching(tmp_path):
    lm = tiny_model("qwen2")
    with pytest.raises(NothingToRemoveError, match="refuses none"):
        abliterate(lm, tmp_path / "run", AbliterateConfig(**TINY), scorer=NeverRefuses())
    assert not (tmp_path / "run").exists()


def test_a_folder_steerlab_did_not_write_is_refused_before_any_compute(tmp_path):
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty"):
        abliterate(tiny_model("qwen2"), foreign, AbliterateConfig(**TINY), scorer=NeverRefuses())
    assert [p.name for p in foreign.iterdir()] == ["todo.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        abliterate(tiny_model("qwen2"), tmp_path / "file", AbliterateConfig(**TINY),
                   scorer=NeverRefuses())


def test_a_budget_below_one_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(SteerlabError, match="at least 1"):
        AbliterateConfig.from_file(None, trials=0)
    with pytest.raises(SystemExit) as exc:
        main(["abliterate", "default", "--out", str(tmp_path / "run"), "--trials", "-3"])
    assert exc.value.code == 2
    assert "trial budget must be at least 1" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "run").exists()


def test_an_unreachable_judge_is_one_clear_error():
    start = time.perf_counter()
    with pytest.raises(EvaluationError, match="did not answer"):
        make_scorer("http://127.0.0.1:9/v1", "judge", None)
    assert time.perf_counter() - start < 30


# -- the real embedded model -----------------------------------------------------------------
@pytest.mark.real
def test_real_search_lowers_heldout_refusal(real_lm, tmp_path):
    config = AbliterateConfig(trials=3, startup_trials=3, train_limit=16, harmful_val_limit=8,
                              harmless_val_limit=4, over_refusal_limit=0, max_new_tokens=12,
                              positions=["last"], heldout_limit=12, capability_limit=4)
    result = abliterate(real_lm, tmp_path / "run", config)
    assert result.baseline.refusals > 0 and result.heldout is not None
    heldout = result.heldout["results"]
    before = heldout["unedited"]["refusal_harmful"]
    after = heldout["abliterate"]["refusal_harmful"]
    assert before["n"] == after["n"] == 12
    assert after["rate"] < before["rate"]
    assert count_hooks(real_lm.model) == 0


def test_heldout_evaluation_has_intervals_and_paired_tests(tmp_path):
    lm = tiny_model("qwen2")
    config = AbliterateConfig(**{**TINY, "trials": 2, "evaluate": True, "heldout_limit": 4,
                                 "capability_limit": 3})
    result = abliterate(lm, tmp_path / "run", config, scorer=tiny_scorer(lm, config))
    assert result.heldout is not None
    heldout = json.loads((tmp_path / "run" / "heldout.json").read_text())
    assert set(heldout["results"]) == {"unedited", "abliterate", "plain selection"}
    assert heldout["chosen_trial"] == result.choice.trial.number
    assert heldout["plain_selection"]["layer"] in heldout["plain_selection"]["layers_tried"]
    for name, measures in heldout["results"].items():
        refusal = measures["refusal_harmful"]
        assert refusal["n"] == 4 and len(refusal["ci95"]) == 2
        assert measures["capability_accuracy"]["n"] == 3
        assert "ci95" in measures["perplexity"] and "ci95" in measures["kl_first_token"]
        if name != "unedited":
            assert 0.0 <= measures["vs_baseline"]["refusal_harmful_p"] <= 1.0
    assert heldout["results"]["unedited"]["kl_first_token"]["mean"] == pytest.approx(0.0,
                                                                                     abs=1e-6)
    rows = (tmp_path / "run" / "heldout_rows.jsonl").read_text().splitlines()
    assert {json.loads(r)["condition"] for r in rows} == set(heldout["results"])
    again = abliterate(lm, tmp_path / "run", config, scorer=tiny_scorer(lm, config))
    assert again.heldout == heldout  # reused, not recomputed
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Held-out evaluation" in report and "plain selection" in report
    assert "figures/pareto.png" in report and "figures/kernels.png" in report
    html = (tmp_path / "run" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2
