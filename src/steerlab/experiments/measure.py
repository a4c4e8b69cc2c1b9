"""Numbers read off a run's rows: condition tables with paired tests, KL on harmless
prompts and judged compliance, each cached in the run folder."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from steerlab.evaluate.judge import Judge
from steerlab.evaluate.kl import kl_per_prompt_many
from steerlab.evaluate.stats import mean_summary
from steerlab.experiments.config import ExperimentConfig
from steerlab.experiments.runner import Condition, Runner
from steerlab.experiments.summary import Entry, JudgeEntry, condition_summary, paired_p
from steerlab.prompts.sets import PromptSet


def rows_of(run: Runner, name: str, prompts: PromptSet) -> list[dict[str, Any]]:
    ids = {p.id for p in prompts}
    return [r for r in run.rows(name) if r["prompt_id"] in ids]


def summarise(run: Runner, conditions: Sequence[Condition], prompts: PromptSet,
              reference: str) -> dict[str, Entry]:
    """Rates with Wilson intervals per condition and the McNemar p against ``reference``."""
    ref = rows_of(run, reference, prompts)
    out = {}
    for cond in conditions:
        rows = rows_of(run, cond.name, prompts)
        entry: Entry = {**condition_summary(rows), "description": cond.description}
        entry["vs_baseline_p"] = None if cond.name == reference else paired_p(rows, ref)
        out[cond.name] = entry
    return out


def kl_conditions(
    run: Runner, harmless: PromptSet, conditions: Sequence[Condition], *, k: int, seed: int = 0
) -> dict[str, Entry]:
    """KL(base ‖ steered) on harmless prompts per steered condition, each cached as a step.

    Per condition: first-token KL and KL averaged over the first ``k`` baseline
    tokens, each with n and a bootstrap 95% interval. The conditions not cached
    yet share one unsteered baseline pass per system prompt (n + 1 passes, not
    2n); that time is split evenly between their steps in ``timings.json``.
    """

    def step_name(cond: Condition) -> str:
        return "kl/" + cond.name.replace("/", "__").replace(":", "_")

    out: dict[str, Entry] = {}
    todo = []
    for cond in conditions:
        if cond.specs and run.has_step(step_name(cond)):
            out[cond.name] = run.step(step_name(cond), dict)  # cached: read back
        elif cond.specs:
            todo.append(cond)
    for system in dict.fromkeys(c.system for c in todo):  # each system prompt, in order
        group = [c for c in todo if c.system == system]
        start = time.perf_counter()
        per = kl_per_prompt_many(
            run.lm, harmless.texts(), {c.name: list(c.specs) for c in group}, k=k,
            system=system, batch_size=run.batch_size,
        )
        share = (time.perf_counter() - start) / len(group)
        for cond in group:
            out[cond.name] = kl_columns([v[0] for v in per[cond.name]], per[cond.name], k, seed)
            run.save_step(step_name(cond), out[cond.name], share)
    return {c.name: out[c.name] for c in conditions if c.specs}


def kl_columns(first: Sequence[float], per_prompt: Sequence[Sequence[float]] | None, k: int,
               seed: int, **more: Any) -> Entry:
    """A condition's KL columns: the first-token mean with its bootstrap interval, ``more``,
    then (given per-prompt KL lists) the mean over the first ``k`` tokens with its interval."""
    head = mean_summary(first, seed=seed)
    entry: Entry = {"kl_n": head["n"], "kl_first_token": head["mean"],
                    "kl_first_token_ci95": head["ci95"], **more}
    if per_prompt is not None:
        mean_k = mean_summary([sum(v) / len(v) for v in per_prompt], seed=seed)
        entry[f"kl_first_{k}"], entry[f"kl_first_{k}_ci95"] = mean_k["mean"], mean_k["ci95"]
    return entry


def check_judge(config: ExperimentConfig) -> None:
    """Fail at the start of an experiment, not after its generations, when ``--judge``
    names an endpoint that does not answer (see :meth:`Judge.check`)."""
    if config.judge_url:
        with Judge(config.judge_url, config.judge_model) as judge:
            judge.check()


def judge_conditions(
    run: Runner,
    names: Sequence[str],
    config: ExperimentConfig,
    pools: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, JudgeEntry]:
    """Judged compliance and coherence (mean, bootstrap 95% CI, n, missing) per condition.

    ``pools`` adds entries summarised over several conditions' rows (random seeds
    pooled as one control). Scores are cached in ``judge_cache.jsonl`` in the run
    folder, so a rerun sends only the pairs not judged yet.
    """
    assert config.judge_url is not None
    rows = [r for name in names for r in run.rows(name)]
    with Judge(config.judge_url, config.judge_model, cache=run.out / "judge_cache.jsonl") as j:
        scores = j.score_many([(r["prompt"], r["response"]) for r in rows])
    values: dict[str, dict[str, list[float | None]]] = {
        n: {"compliance": [], "coherence": []} for n in names
    }
    for row, score in zip(rows, scores, strict=True):
        bucket = values[row["condition"]]
        bucket["compliance"].append(None if score.missing else score.compliance)
        bucket["coherence"].append(None if score.missing else score.coherence)
    for pool, members in (pools or {}).items():
        values[pool] = {m: [v for n in members for v in values[n][m]]
                        for m in ("compliance", "coherence")}
    out: dict[str, JudgeEntry] = {}
    for name, bucket in values.items():
        entry: dict[str, Any] = {}
        for metric, vals in bucket.items():
            summary = mean_summary(vals, seed=config.seed)
            entry[f"judge_{metric}"] = summary["mean"]
            entry[f"judge_{metric}_ci95"] = summary["ci95"]
            entry["judge_n"] = summary["n"]
            entry["judge_missing"] = summary.get("missing", 0)
        out[name] = JudgeEntry(**entry)  # type: ignore[typeddict-item]
    return out


def add_judge(run: Runner, config: ExperimentConfig,
              tables: Sequence[dict[str, Entry]]) -> bool:
    """Merge judged compliance/coherence into each condition entry when a judge is set."""
    if not config.judge_url:
        return False
    judged = judge_conditions(run, [name for table in tables for name in table], config)
    for table in tables:
        for name, entry in table.items():
            entry.update(judged.get(name, {}))
    return True
