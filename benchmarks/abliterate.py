"""steerlab abliterate beside heretic-llm 1.4.0 on the same model, prompts and trial budget,
both chosen models scored by one steerlab scorer on the same held-out prompts.

The prompt sets come from ``../shared/data`` beside the repository (or ``--data DIR``):
the first 128 of harmful_train / harmless_train (directions), all 39 of harmful_val and
the first 48 of harmless_val (the per-trial objectives). They are written once into the
work folder both as steerlab prompt files and as heretic's dataset folders
(``NAME/data.jsonl``, one ``{"text": ...}`` per line).

Steps (``--steps``, default all three):

- ``steerlab``: ``steerlab abliterate`` with those prompts and ``--trials`` trials;
- ``heretic``: heretic in its own venv (``--peers-python`` or ``$STEERLAB_PEERS_PYTHON``),
  started in a tmux session ``heretic``. Selecting and saving its trial is interactive
  (see heretic's notes): the script waits for the saved model folder ``WORK/heretic-model``
  and gives up after ``--heretic-timeout`` seconds;
- ``score``: both chosen models, each as a merged Hugging Face folder, scored by
  ``steerlab compare`` (refusal on held-out harmful prompts with the substring scorer,
  over-refusal, first-token KL, capability, perplexity) against the unedited model.

heretic is AGPL-3.0: it runs as a separate program and none of its code is used here.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
from optuna.storages.journal import JournalFileBackend

from locations import DATA, PEERS_PYTHON
from sections import section, write_section
from steerlab.abliterate import AbliterateConfig, abliterate
from steerlab.abliterate.heldout import heldout_config
from steerlab.evaluate.compare import compare_models
from steerlab.evaluate.stats import mcnemar, mcnemar_table
from steerlab.model.embedded import safetensors_dir
from steerlab.model.loading import load_model
from steerlab.store.rowstore import read_rows
from steerlab.weights.export.kernel import export_kernel

SECTION = "abliterate"
WHAT = ("held-out refusal and first-token KL of steerlab abliterate's chosen model and "
        "heretic's, at the same trial budget, scored by one steerlab scorer; wall time per "
        "trial of each.")
RERUN = "python benchmarks/abliterate.py --data DIR --peers-python PY --trials 40 --write"
SETS = {"harmful_train": 128, "harmless_train": 128, "harmful_val": None, "harmless_val": 48}
STEPS = ("steerlab", "heretic", "score")


def prompt_sets(data: Path) -> dict[str, list[str]]:
    """The four prompt lists of the benchmark, read from the shared data folder."""
    out = {}
    for name, limit in SETS.items():
        path = data / f"{name}.json"
        if not path.is_file():
            raise SystemExit(f"{data} holds no {name}.json: pass --data DIR")
        texts = [row["instruction"] for row in json.loads(path.read_text())]
        out[name] = texts[:limit] if limit is not None else texts
    return out


def write_prompt_files(sets: dict[str, list[str]], work: Path) -> dict[str, Path]:
    """``WORK/prompts/NAME.jsonl`` for steerlab and ``WORK/heretic-data/NAME/data.jsonl``
    for heretic, the same texts in the same order. Returns steerlab's files."""
    files = {}
    for name, texts in sets.items():
        lines = "".join(json.dumps({"prompt": t}) + "\n" for t in texts)
        files[name] = work / "prompts" / f"{name}.jsonl"
        files[name].parent.mkdir(parents=True, exist_ok=True)
        files[name].write_text(lines)
        folder = work / "heretic-data" / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "data.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                                   for t in texts))
    return files


def steerlab_config(files: dict[str, Path], trials: int, max_new_tokens: int,
                    heldout_limit: int = 48) -> dict[str, Any]:
    """The abliterate settings: the benchmark's prompt files; its own held-out step (the
    chosen trial against plain selection) uses the same held-out prompts as ``score``."""
    return {"harmful_train": str(files["harmful_train"]),
            "harmless_train": str(files["harmless_train"]),
            "harmful_val": str(files["harmful_val"]), "harmless_val": str(files["harmless_val"]),
            "train_limit": None, "harmful_val_limit": None, "harmless_val_limit": None,
            "trials": trials, "max_new_tokens": max_new_tokens, "heldout_limit": heldout_limit}


def heretic_command(python: Path, model_dir: Path, work: Path, trials: int,
                    max_new_tokens: int) -> list[str]:
    """heretic's command line (its notes' settings) on the benchmark's dataset folders."""
    heretic = python.parent / "heretic"
    data = work / "heretic-data"
    cmd = [str(heretic), "--model", str(model_dir), "--n-trials", str(trials),
           "--n-startup-trials", "12", "--max-response-length", str(max_new_tokens),
           "--batch-size", "16", "--seed", "0", "--study-checkpoint-dir", str(work / "heretic")]
    for flag, name in (("bad-prompts", "harmful_train"), ("good-prompts", "harmless_train"),
                       ("bad-evaluation-prompts", "harmful_val"),
                       ("good-evaluation-prompts", "harmless_val")):
        cmd += [f"--{flag}.dataset", str(data / name), f"--{flag}.split", "train",
                f"--{flag}.column", "text"]
    return cmd


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA,
                        help="shared data folder (default: ../shared/data beside the repository)")
    parser.add_argument("--peers-python", default=PEERS_PYTHON,
                        help="python of the venv with heretic-llm 1.4.0 "
                             "(default: $STEERLAB_PEERS_PYTHON)")
    parser.add_argument("--work", type=Path, default=Path("runs") / "bench-abliterate",
                        help="work folder, relative to the current folder (resumes: steerlab's "
                             "study is reused)")
    parser.add_argument("--trials", type=int, default=40, help="trial budget of both tools")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--steps", default=",".join(STEPS),
                        help=f"comma-separated subset of {','.join(STEPS)}")
    parser.add_argument("--heretic-timeout", type=float, default=4 * 3600)
    parser.add_argument("--heldout-limit", type=int, default=48)
    parser.add_argument("--kl-cap", type=float, default=0.1,
                        help="the rule that picks each tool's trial: fewest validation "
                             "refusals with first-token KL at most this")
    parser.add_argument("--write", action="store_true", help="write the BENCHMARKS.md section")
    parser.add_argument("--timed-since", default="",
                        help="TOOL=UTC_ISO_TIME[,TOOL=...]: per-trial medians over that tool's "
                             "trials started after the time (when it had the machine to itself)")
    args = parser.parse_args(argv)
    if args.trials < 1:
        parser.error("--trials must be at least 1")
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown or not steps:
        parser.error(f"unknown --steps {unknown or '(none)'}; choose from {', '.join(STEPS)}")
    args.steps = steps
    try:
        args.timed_since = dict(item.split("=", 1) for item in args.timed_since.split(",") if item)
    except ValueError:
        parser.error("--timed-since takes TOOL=TIME pairs, e.g. steerlab=2026-12-06T23:51:00")
    if "heretic" in steps and not args.peers_python:
        parser.error("the heretic step needs --peers-python PY or $STEERLAB_PEERS_PYTHON")
    return args


def run_steerlab(work: Path, files: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    """Run the search (in process) and export its choice as a merged HF folder."""
    config = AbliterateConfig(**steerlab_config(files, args.trials, args.max_new_tokens,
                                                args.heldout_limit))
    lm = load_model("default")
    start = time.perf_counter()
    result = abliterate(lm, work / "steerlab", config, progress=True)
    wall = time.perf_counter() - start
    trials = json.loads((work / "steerlab" / "trials.json").read_text())
    seconds = sorted(t["seconds"] for t in trials if t.get("seconds"))
    target = work / "steerlab-model"
    if not target.exists():
        export_kernel(lm, result.spec, target, "hf")
    base = result.baseline
    return {"trials": len(trials), "trial_seconds_median": median(seconds), "wall_s": wall,
            "baseline_refusals": base.refusals,
            "choice": {"number": result.choice.trial.number, **result.choice.score.to_dict()}}


def run_heretic(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Start heretic in tmux and wait until its saved model folder appears."""
    cmd = heretic_command(Path(args.peers_python), safetensors_dir(), work, args.trials,
                          args.max_new_tokens)
    target = work / "heretic-model"
    if not target.exists():
        subprocess.run(["tmux", "new-session", "-d", "-s", "heretic", shlex.join(cmd)],
                       check=True)
        print(f"heretic runs in tmux session 'heretic'; when it asks, save the chosen trial "
              f"merged to {target}", file=sys.stderr)
        deadline = time.time() + args.heretic_timeout
        while not (target / "config.json").is_file():
            if time.time() > deadline:
                raise SystemExit(f"no heretic model in {target} after {args.heretic_timeout} s")
            time.sleep(30)
    trials = heretic_trials(work / "heretic")
    base = optuna_base_refusals(work / "heretic")
    return {"command": shlex.join(cmd), "model": str(target), "trials": len(trials),
            "trial_seconds_median": median([t["seconds"] for t in trials]),
            "baseline_refusals": base, "choice": rule_choice(trials, args.kl_cap)}


def heretic_trials(study_dir: Path) -> list[dict[str, Any]]:
    """heretic's finished trials (validation refusals, KL, seconds) from its Optuna journal."""
    files = sorted(study_dir.glob("*.jsonl"))
    if not files:
        raise SystemExit(f"no heretic study journal in {study_dir}")
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(files[0])))
    name = storage.get_all_studies()[0].study_name
    trials = optuna.load_study(study_name=name, storage=storage).get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return [{"number": t.user_attrs.get("index", t.number + 1), "start": t.datetime_start,
             "refusals": int(t.user_attrs["refusals"]),
             "n_harmful": int(t.user_attrs["n_bad_prompts"]),
             "kl": float(t.user_attrs["kl_divergence"]),
             "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
             if t.datetime_complete and t.datetime_start else None} for t in trials]


def steerlab_trial_times(work: Path) -> list[dict[str, Any]]:
    """Start and seconds of each finished trial of steerlab's study."""
    storage = optuna.storages.RDBStorage(f"sqlite:///{(work / 'steerlab' / 'study.db')}")
    study = optuna.load_study(study_name="abliterate", storage=storage)
    return [{"start": t.datetime_start, "seconds": t.user_attrs.get("seconds")}
            for t in study.get_trials(deepcopy=False,
                                      states=(optuna.trial.TrialState.COMPLETE,))]


def timing(trials: list[dict[str, Any]], since: str | None) -> dict[str, Any]:
    """Median seconds per trial over the trials started at or after ``since`` (UTC, ISO;
    the trials that ran with the machine to themselves), or over all."""
    start = datetime.fromisoformat(since) if since else None
    kept = [t["seconds"] for t in trials
            if t["seconds"] is not None and (start is None or t["start"] >= start)]
    return {"median_s": median(kept), "n": len(kept), "since": since}


def optuna_base_refusals(study_dir: Path) -> int | None:
    """heretic's own count of validation refusals of the unedited model."""
    for line in next(iter(sorted(study_dir.glob("*.jsonl")))).read_text().splitlines():
        attrs = json.loads(line).get("user_attr", {})
        if "base_refusals" in attrs:
            return int(attrs["base_refusals"])
    return None


def rule_choice(trials: list[dict[str, Any]], kl_cap: float) -> dict[str, Any]:
    """steerlab's stated rule applied to any tool's trials: the fewest validation refusals
    among trials with KL ≤ ``kl_cap`` (ties: lower KL, then the earlier trial)."""
    under = [t for t in trials if t["kl"] <= kl_cap]
    if not under:
        raise SystemExit(f"no trial has KL ≤ {kl_cap}")
    return min(under, key=lambda t: (t["refusals"], t["kl"], t["number"]))


def median(values: list[float]) -> float | None:
    values = sorted(v for v in values if v is not None)
    return values[len(values) // 2] if values else None


def head_to_head(rows_path: Path, a: str = "steerlab", b: str = "heretic") -> dict[str, Any]:
    """McNemar of ``a`` against ``b`` on the same held-out harmful prompts (refused or not)."""
    refused: dict[str, dict[str, bool]] = {a: {}, b: {}}
    for row in read_rows(rows_path):
        if row.get("set") == "harmful" and row.get("model") in refused:
            refused[row["model"]][row["id"]] = row["outcome"] != "bypass"
    ids = sorted(set(refused[a]) & set(refused[b]))
    x, y = [refused[a][i] for i in ids], [refused[b][i] for i in ids]
    return {"models": [a, b], "n": len(ids), **mcnemar_table(x, y), "p": mcnemar(x, y)}


def score(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One steerlab scorer for the unedited, steerlab's and heretic's models: the held-out
    settings steerlab's own run uses (:func:`steerlab.abliterate.heldout.heldout_config`)."""
    cfg = heldout_config(AbliterateConfig(heldout_limit=args.heldout_limit,
                                          max_new_tokens=args.max_new_tokens))
    models = {"unedited": "default", "steerlab": str(work / "steerlab-model"),
              "heretic": str(work / "heretic-model")}
    present = {k: v for k, v in models.items() if k == "unedited" or Path(v).is_dir()}
    return compare_models(present, cfg, out_dir=work / "comparison")


def _rate(m: dict[str, Any]) -> str:
    lo, hi = m["ci95"]
    return f"{m['k']}/{m['n']} = {m['rate']:.0%} [{lo:.0%}, {hi:.0%}]"


def _mean(m: dict[str, Any], digits: int = 3) -> str:
    lo, hi = m["ci95"]
    return f"{m['mean']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def timing_note(record: dict[str, Any]) -> str:
    """Which trials the median is over, when not all."""
    timed = {tool: t for tool, t in record.get("timing", {}).items() if t.get("since")}
    if not timed:
        return ""
    return " are over the trials that ran with the machine otherwise idle: " + "; ".join(
        f"{tool}'s {t['n']} started after {t['since']} UTC" for tool, t in timed.items())


def table(record: dict[str, Any]) -> str:
    """The section body: each tool's search, then one scorer's held-out table."""
    lines = ["Search (each tool's own validation scorer; choice by the same rule: fewest "
             "validation refusals with first-token KL ≤ the cap):", "",
             "| tool | trials | median s/trial | validation refusals, unedited → chosen "
             "| chosen trial's KL |", "| --- | --- | --- | --- | --- |"]
    for tool in ("steerlab", "heretic"):
        run = record.get(tool)
        if not run or "choice" not in run:
            continue
        c = run["choice"]
        timed = record.get("timing", {}).get(tool, {})
        secs = timed.get("median_s", run.get("trial_seconds_median"))
        lines.append(f"| {tool} | {run['trials']} | {secs:.0f} | {run['baseline_refusals']} → "
                     f"{c['refusals']}/{c['n_harmful']} (trial {c['number']}) | {c['kl']:.3f} |")
    note = timing_note(record)
    if note:
        lines += ["", f"Median seconds per trial{note}."]
    results = record.get("comparison", {})
    if results:
        lines += ["", "Held-out (steerlab's substring+degeneracy scorer on the built-in "
                  "`paired:harmful` / `harmless` test splits, the same for every model; "
                  "95% intervals):", "",
                  "| model | refusal | over-refusal | first-token KL | capability |",
                  "| --- | --- | --- | --- | --- |"]
        for name, m in results.items():
            lines.append(f"| {name} | {_rate(m['refusal_harmful'])} | "
                         f"{_rate(m['over_refusal_harmless'])} | {_mean(m['kl_first_token'])} "
                         f"| {_rate(m['capability_accuracy'])} |")
    duel = record.get("head_to_head")
    if duel:
        lines += ["", f"steerlab against heretic on the same {duel['n']} held-out harmful "
                  f"prompts (McNemar): p = {duel['p']:.2g} (refused by {duel['models'][0]} "
                  f"only: {duel['only_a']}, by {duel['models'][1]} only: {duel['only_b']})."]
    return "\n".join(lines + targets(record))


def targets(record: dict[str, Any]) -> list[str]:
    """The issue's three targets, each stated as met or not from the numbers above."""
    results, timed = record.get("comparison", {}), record.get("timing", {})
    if not {"steerlab", "heretic"} <= set(results):
        return []
    mine, theirs = results["steerlab"], results["heretic"]
    r_m, r_t = mine["refusal_harmful"]["k"], theirs["refusal_harmful"]["k"]
    kl_m, kl_t = mine["kl_first_token"]["mean"], theirs["kl_first_token"]["mean"]
    better = r_m <= r_t and kl_m <= kl_t and (r_m < r_t or kl_m < kl_t)
    low = mine["refusal_harmful"]["rate"] <= 0.05 and kl_m <= 0.1
    out = ["", "Targets:",
           f"- at the same budget, no more held-out refusals than heretic at no more KL and "
           f"strictly better on one: {'met' if better else 'not met'} ({r_m} vs {r_t} "
           f"refusals, KL {kl_m:.3f} vs {kl_t:.3f});",
           f"- held-out refusal ≤ 5% with first-token KL ≤ 0.1: {'met' if low else 'not met'} "
           f"({mine['refusal_harmful']['rate']:.0%} at KL {kl_m:.3f});"]
    s_m = timed.get("steerlab", {}).get("median_s")
    s_t = timed.get("heretic", {}).get("median_s")
    if s_m is not None and s_t is not None:
        out.append(f"- wall time per trial ≤ heretic's: {'met' if s_m <= s_t else 'not met'} "
                   f"({s_m:.0f} s vs {s_t:.0f} s).")
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    files = write_prompt_files(prompt_sets(args.data), work)
    saved = work / "benchmark.json"  # steps run apart add to one record
    record: dict[str, Any] = json.loads(saved.read_text()) if saved.is_file() else {}
    if "steerlab" in args.steps:
        record["steerlab"] = run_steerlab(work, files, args)
    if "heretic" in args.steps:
        record["heretic"] = run_heretic(work, args)
    if "score" in args.steps:
        record["comparison"] = score(work, args)["results"]
    if "steerlab" in record.get("comparison", {}) and "heretic" in record["comparison"]:
        record["head_to_head"] = head_to_head(work / "comparison" / "rows.jsonl")
    saved.write_text(json.dumps(record, indent=2, default=str))
    print(json.dumps(record, indent=2, default=str))
    if args.write:
        record["timing"] = {
            "steerlab": timing(steerlab_trial_times(work), args.timed_since.get("steerlab")),
            "heretic": timing(heretic_trials(work / "heretic"), args.timed_since.get("heretic"))}
        saved.write_text(json.dumps(record, indent=2, default=str))
        write_section(SECTION, section(SECTION, WHAT, RERUN, table(record)))


if __name__ == "__main__":
    main()
