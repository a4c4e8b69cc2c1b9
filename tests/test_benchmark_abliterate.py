"""benchmarks/abliterate.py: argument handling and the prompt files both tools read."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import optuna
import pytest

from steerlab.abliterate import AbliterateConfig
from steerlab.abliterate.search import prompt_sets as search_prompt_sets

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_abliterate", BENCH / "abliterate.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH))


def fake_data(folder: Path) -> Path:
    folder.mkdir()
    for name, n in (("harmful_train", 130), ("harmless_train", 129), ("harmful_val", 39),
                    ("harmless_val", 60)):
        rows = [{"instruction": f"{name} prompt {i}", "category": "x"} for i in range(n)]
        (folder / f"{name}.json").write_text(json.dumps(rows))
    return folder


def test_arguments(bench, monkeypatch):
    args = bench.parse_args(["--steps", "steerlab,score"])
    assert args.trials == 40 and args.steps == ["steerlab", "score"]
    assert args.data == BENCH.parents[1] / "shared" / "data"
    for bad in (["--trials", "0"], ["--steps", "steerlab,nope"], ["--steps", ","]):
        with pytest.raises(SystemExit) as exc:
            bench.parse_args(bad)
        assert exc.value.code == 2
    with pytest.raises(SystemExit):
        bench.parse_args(["--steps", "heretic", "--peers-python", ""])
    assert bench.parse_args(["--steps", "heretic", "--peers-python", "/x/bin/python"]).steps \
        == ["heretic"]
    assert bench.parse_args(["--steps", "score", "--timed-since",
                             "steerlab=2026-12-06T23:51,heretic=2026-12-07"]
                            ).timed_since == {"steerlab": "2026-12-06T23:51",
                                              "heretic": "2026-12-07"}
    with pytest.raises(SystemExit):
        bench.parse_args(["--steps", "score", "--timed-since", "steerlab"])


def test_both_tools_read_the_same_prompts(bench, tmp_path):
    sets = bench.prompt_sets(fake_data(tmp_path / "data"))
    assert [len(sets[k]) for k in bench.SETS] == [128, 128, 39, 48]
    files = bench.write_prompt_files(sets, tmp_path / "work")
    config = AbliterateConfig(**bench.steerlab_config(files, 40, 32))
    loaded = search_prompt_sets(config.model_copy(update={"over_refusal_limit": 0}))
    for name in bench.SETS:
        assert loaded[name] == sets[name]
        heretic = (tmp_path / "work" / "heretic-data" / name / "data.jsonl").read_text()
        assert [json.loads(line)["text"] for line in heretic.splitlines()] == sets[name]
    cmd = bench.heretic_command(Path("/venv/bin/python"), Path("/m"), tmp_path / "work", 40, 32)
    assert cmd[0] == "/venv/bin/heretic" and cmd[cmd.index("--n-trials") + 1] == "40"
    assert str(tmp_path / "work" / "heretic-data" / "harmful_val") in cmd
    with pytest.raises(SystemExit, match="harmful_train"):
        bench.prompt_sets(tmp_path)


def test_heretic_trials_are_read_from_its_journal_and_chosen_by_the_same_rule(bench, tmp_path):
    path = tmp_path / "study" / "model.jsonl"
    path.parent.mkdir()
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(path)))
    study = optuna.create_study(study_name="heretic", storage=storage,
                                directions=["minimize", "minimize"])
    for i, (refusals, kl) in enumerate([(7, 0.14), (5, 0.07), (5, 0.05), (9, 0.008)]):
        trial = study.ask()
        for key, value in {"index": i + 1, "refusals": refusals, "kl_divergence": kl,
                           "n_bad_prompts": 39, "base_refusals": 11}.items():
            trial.set_user_attr(key, value)
        study.tell(trial, [kl, refusals / 11])
    trials = bench.heretic_trials(path.parent)
    assert [(t["refusals"], t["kl"]) for t in trials] == [(7, 0.14), (5, 0.07), (5, 0.05),
                                                          (9, 0.008)]
    assert all(t["seconds"] >= 0 for t in trials)
    assert bench.timing(trials, None)["n"] == 4
    later = max(t["start"] for t in trials).isoformat()
    assert bench.timing(trials, later)["n"] == 1  # only trials started at or after it
    assert bench.timing(trials, "2999-01-01T00:00:00") == {"median_s": None, "n": 0,
                                                           "since": "2999-01-01T00:00:00"}
    assert bench.optuna_base_refusals(path.parent) == 11
    assert bench.rule_choice(trials, 0.1)["number"] == 3  # fewest refusals, then lower KL
    assert bench.rule_choice(trials, 0.01)["number"] == 4
    with pytest.raises(SystemExit):
        bench.rule_choice(trials, 0.001)


def test_the_section_is_a_table_of_both_tools(bench):
    rate = {"k": 2, "n": 48, "rate": 2 / 48, "ci95": [0.01, 0.14]}
    mean = {"mean": 0.05, "ci95": [0.03, 0.07]}
    measures = {"refusal_harmful": rate, "over_refusal_harmless": rate,
                "kl_first_token": mean, "capability_accuracy": rate}
    choice = {"number": 7, "refusals": 3, "n_harmful": 39, "kl": 0.04}
    record = {"steerlab": {"trials": 40, "trial_seconds_median": 41.0,
                           "baseline_refusals": 20, "choice": choice},
              "heretic": {"trials": 40, "trial_seconds_median": 59.0,
                          "baseline_refusals": 11, "choice": choice},
              "comparison": {"unedited": measures, "steerlab": measures}}
    text = bench.table(record)
    assert "| steerlab | 40 | 41 | 20 → 3/39 (trial 7) | 0.040 |" in text
    record["timing"] = {"steerlab": {"median_s": 22.0, "n": 36, "since": "2026-12-06T23:51"},
                        "heretic": {"median_s": 48.0, "n": 9, "since": "2026-12-06T23:51"}}
    timed = bench.table(record)
    assert "heretic's 9 started after 2026-12-06T23:51 UTC" in timed
    assert "| steerlab | 40 | 22 |" in timed and "| heretic | 40 | 48 |" in timed
    assert "| heretic | 40 | 59 |" in text
    assert "| steerlab | 2/48 = 4% [1%, 14%] |" in text


def test_head_to_head_pairs_the_two_tools_on_the_same_prompts(bench, tmp_path):
    rows = tmp_path / "rows.jsonl"
    lines = [{"format": "steerlab.rows", "version": 1, "kind": "compare", "identity": {}}]
    outcomes = {"steerlab": ["bypass", "refusal", "bypass", "bypass"],
                "heretic": ["refusal", "refusal", "refusal", "degenerate"]}
    for model, outs in outcomes.items():
        lines += [{"model": model, "set": "harmful", "id": f"p{i}", "outcome": o}
                  for i, o in enumerate(outs)]
        lines.append({"model": model, "set": "harmless", "id": "h0", "outcome": "refusal"})
    rows.write_text("".join(json.dumps(line) + "\n" for line in lines))
    duel = bench.head_to_head(rows)
    assert duel["n"] == 4 and (duel["only_a"], duel["only_b"], duel["both"]) == (0, 3, 1)
    assert duel["p"] == pytest.approx(0.25)
    record = {"head_to_head": duel}
    assert "refused by steerlab only: 0, by heretic only: 3" in bench.table(record)


def test_targets_are_stated_from_the_numbers(bench):
    def measures(k: int, kl: float) -> dict:
        return {"refusal_harmful": {"k": k, "n": 48, "rate": k / 48},
                "kl_first_token": {"mean": kl}}

    record = {"comparison": {"steerlab": measures(2, 0.05), "heretic": measures(3, 0.05)},
              "timing": {"steerlab": {"median_s": 22.0}, "heretic": {"median_s": 48.0}}}
    text = "\n".join(bench.targets(record))
    assert "strictly better on one: met" in text and "≤ 0.1: met (4% at KL 0.050)" in text
    assert "per trial ≤ heretic's: met (22 s vs 48 s)" in text
    record["comparison"]["steerlab"] = measures(2, 0.06)  # fewer refusals but more KL
    assert "strictly better on one: not met" in "\n".join(bench.targets(record))
