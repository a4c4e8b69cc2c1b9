"""``run_eval``: generate, score, and summarise one condition on one prompt set.

Writes into ``out_dir``:

- ``responses.jsonl``: one row per prompt (prompt, response, every score),
  appended and flushed as each row is finished, so an interrupted run loses
  at most the rows in flight; a rerun skips ids already there;
- rows the judge missed (server down, unparseable output) are judged again
  on a rerun, keeping their responses;
- ``config.json``: what produced the rows (backend, interventions, system
  prompt, scorers); the rows file's header holds the same run identity, and a
  rerun with another identity, or with other texts for the same prompt ids,
  refuses to mix rows (:mod:`steerlab.store.rowstore`);
- ``summary.json`` / ``summary.md``: rates with n and 95% intervals,
  computed from the rows (never stored instead of them), written atomically;
- ``kl.json`` / ``capability.json`` when asked (kept, so a rerun with the same
  identity, prompts and parameters reuses them).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

import steerlab.store.rowstore as rowstore
from steerlab.errors import EvaluationError
from steerlab.evaluate.backends import Backend, Completion, InProcessBackend
from steerlab.evaluate.capability import capability_eval
from steerlab.evaluate.degeneracy import DegeneracyDetector
from steerlab.evaluate.judge import Judge, JudgeScore
from steerlab.evaluate.kl import kl_report
from steerlab.evaluate.markdown import summary_markdown
from steerlab.evaluate.outcome import OUTCOMES, Outcome, classify
from steerlab.evaluate.refusal import RefusalScorer
from steerlab.evaluate.stats import (
    cohens_kappa,
    mcnemar,
    mcnemar_table,
    mean_summary,
    paired_bootstrap,
    rate_summary,
)
from steerlab.prompts.sets import Prompt
from steerlab.store.atomic import write_json, write_text
from steerlab.store.outputs import output_dir
from steerlab.store.provenance import provenance
from steerlab.store.rowstore import RowStore, dict_codec

if TYPE_CHECKING:
    from steerlab.evaluate.classifier import LocalClassifier
    from steerlab.prompts.sets import Prompt, PromptSet

ROWS = "responses.jsonl"
SUMMARY = "summary.json"
SUMMARY_MD = "summary.md"
CONFIG = "config.json"
_CONFIG_KEYS = ("backend", "system", "judge", "classifier", "refusal_phrases", "partial_as")
ROW_CODEC = dict_codec("id")


def _as_prompts(prompts: PromptSet | Sequence[Prompt] | Sequence[str]) -> list[Prompt]:
    out: list[Prompt] = []
    seen: dict[str, int] = {}
    for item in prompts:
        if isinstance(item, str):
            base = "p-" + hashlib.sha1(item.encode("utf-8")).hexdigest()[:12]
            seen[base] = seen.get(base, 0) + 1
            pid = base if seen[base] == 1 else f"{base}-{seen[base]}"
            out.append(Prompt(id=pid, prompt=item))
        else:
            out.append(item)
    ids = [p.id for p in out]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise EvaluationError(f"Prompt ids must be unique to resume safely; repeated: {dup}.")
    if not out:
        raise EvaluationError("No prompts to evaluate.")
    return out


def read_rows(path: str | Path) -> dict[str, dict[str, Any]]:
    """Rows of a responses.jsonl by id, for reading (a baseline): a torn last line is
    ignored; a row appearing twice keeps the last copy."""
    rows: dict[str, dict[str, Any]] = {}
    for n, row in enumerate(rowstore.read_rows(path), 1):
        if not isinstance(row, dict) or "id" not in row:
            raise EvaluationError(f"{path} row {n} has no \"id\"; it is not an eval row. "
                                  "Point at another run's folder, or rerun that eval.")
        rows[str(row["id"])] = row
    return rows


def eval_dir(out_dir: str | Path, overwrite: bool = False) -> Path:
    """``out_dir`` made ready for an eval: empty, or holding one this version resumes."""
    return output_dir(out_dir, overwrite=overwrite, what="steerlab eval",
                      ours=lambda p: rowstore.is_store(p / ROWS, "eval"))


def _store(out: Path, config: dict[str, Any], items: list[Prompt],
           overwrite: bool) -> RowStore[dict[str, Any]]:
    """The run's rows, resumed only under the same identity and for the same prompt texts."""
    texts = {p.id: p.prompt for p in items}

    def check(row: dict[str, Any]) -> str | None:
        text = texts.get(str(row["id"]))
        if text is None or text == row.get("prompt"):
            return None
        return f"row {row['id']!r} was made for another text of that prompt"

    return RowStore(out / ROWS, "eval", {k: config.get(k) for k in _CONFIG_KEYS}, ROW_CODEC,
                    overwrite=overwrite, check=check)


def _score_row(prompt: Prompt, comp: Completion, system: str | None,
               refusal: RefusalScorer, degeneracy: DegeneracyDetector,
               judge_score: JudgeScore | None, partial_as: Outcome) -> dict[str, Any]:
    verdict = classify(comp.response, judge=judge_score, refusal=refusal, degeneracy=degeneracy,
                       partial_as=partial_as)
    row: dict[str, Any] = {
        "id": prompt.id, "prompt": prompt.prompt, "system": system,
        "category": prompt.category, "label": prompt.label, "pair_id": prompt.pair_id,
        "response": comp.response, "finish_reason": comp.finish_reason,
        "n_new_tokens": comp.n_new_tokens,
        "refusal": verdict.refusal.refused, "refusal_match": verdict.refusal.matched,
        "degenerate": verdict.degeneracy.degenerate,
        "degenerate_reasons": list(verdict.degeneracy.reasons),
        "degeneracy_stats": verdict.degeneracy.stats,
        "outcome": verdict.outcome, "outcome_source": verdict.source,
    }
    if judge_score is not None:
        row.update(judge_score.to_row())
    return row


def run_eval(
    prompts: PromptSet | Sequence[Prompt] | Sequence[str],
    backend: Backend,
    out_dir: str | Path,
    *,
    system: str | None = None,
    judge: Judge | None = None,
    classifier: LocalClassifier | None = None,
    refusal: RefusalScorer | None = None,
    degeneracy: DegeneracyDetector | None = None,
    partial_as: Outcome = "bypass",
    baseline: str | Path | None = None,
    kl_prompts: PromptSet | Sequence[str] | None = None,
    kl_k: int = 8,
    capability_limit: int | None = None,
    limit: int | None = None,
    seed: int = 0,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = False,
    extra_config: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Evaluate one condition; resumable. Returns the summary (also in ``summary.json``).

    ``out_dir`` is resumed only when it holds an eval of the same identity (backend,
    system prompt, judge, scorers) whose rows are for the same prompt texts; ``overwrite``
    starts it over.

    ``baseline`` is another run's directory on the same prompts: the summary
    then compares the two per prompt (McNemar exact test on refusal and on
    each outcome, paired bootstrap on judge scores). ``kl_prompts`` asks for
    KL vs the unsteered model (in-process backend only); ``capability_limit``
    asks for capability accuracy on that many built-in items.

    Example:
        >>> backend = InProcessBackend(lm, parse_steer("ablate:dir"))  # doctest: +SKIP
        >>> run_eval(load_prompts("paired:harmful", split="test"), backend, "runs/ablate",
        ...          baseline="runs/base")["refusal_rate"]  # doctest: +SKIP
        0.08
    """
    items = _as_prompts(prompts)[:limit] if limit is not None else _as_prompts(prompts)
    out = eval_dir(out_dir, overwrite)
    refusal = refusal or RefusalScorer()
    degeneracy = degeneracy or DegeneracyDetector()
    config: dict[str, Any] = {
        "backend": backend.describe(),
        "system": system,
        "judge": judge.describe() if judge is not None else {"kind": "substring"},
        "classifier": classifier.describe() if classifier is not None else None,
        "refusal_phrases": refusal.name,
        "partial_as": partial_as,
        "n_prompts": len(items),
        **(extra_config or {}),
    }
    store = _store(out, config, items, overwrite)
    write_json(out / CONFIG, config)
    todo = [p for p in items if (p.id,) not in store]
    if todo:
        _generate_rows(todo, backend, store, system=system, judge=judge,
                       classifier=classifier, refusal=refusal, degeneracy=degeneracy,
                       partial_as=partial_as, on_row=on_row, progress=progress,
                       n_total=len(items), n_done=len(items) - len(todo))
    if judge is not None:
        _rejudge_missing(store, {p.id: p for p in items}, judge, system=system,
                         refusal=refusal, degeneracy=degeneracy, partial_as=partial_as)
    rows_by_id = {str(r["id"]): r for r in store.rows()}
    rows = [rows_by_id[p.id] for p in items if p.id in rows_by_id]
    missing = [p.id for p in items if p.id not in rows_by_id]
    if missing:
        raise EvaluationError(f"{len(missing)} prompts have no row after the run "
                              f"(first: {missing[:3]}); rerun to complete them.")
    summary = summarise(rows, judge_ran=judge is not None, seed=seed)
    summary["outside_prompt_list"] = len(set(rows_by_id) - {p.id for p in items})
    if baseline is not None:
        summary["comparison"] = compare(rows, read_rows(Path(baseline) / ROWS), seed=seed,
                                        baseline=str(baseline))
    if kl_prompts is not None:
        texts = [p if isinstance(p, str) else p.prompt for p in kl_prompts]
        summary["kl"] = _cached_extra(
            out / "kl.json", {**store.identity, "prompts": _digest(texts), "k": kl_k,
                              "seed": seed}, lambda: _kl(backend, kl_prompts, kl_k, system, seed))
    if capability_limit is not None:
        summary["capability"] = _cached_extra(
            out / "capability.json", {**store.identity, "limit": capability_limit},
            lambda: capability_eval(backend, capability_limit if capability_limit > 0 else None,
                                    system=system))

    lm = backend.lm if isinstance(backend, InProcessBackend) else None
    summary["provenance"] = provenance(lm, config=config, seed=seed)
    write_json(out / SUMMARY, summary)
    write_text(out / SUMMARY_MD, summary_markdown(summary))
    return summary


def _generate_rows(todo: list[Prompt], backend: Backend, store: RowStore[dict[str, Any]], *,
                   system: str | None,
                   judge: Judge | None, classifier: LocalClassifier | None,
                   refusal: RefusalScorer, degeneracy: DegeneracyDetector, partial_as: Outcome,
                   on_row: Callable[[dict[str, Any]], None] | None, progress: bool,
                   n_total: int, n_done: int) -> None:
    from rich.progress import Progress

    pending: dict[Future[JudgeScore], tuple[Prompt, Completion, dict[str, Any]]] = {}
    bar = Progress(transient=True, disable=not progress)
    task = bar.add_task("evaluating", total=n_total, completed=n_done)
    with store.appending() as put, bar:

        def write(prompt: Prompt, comp: Completion, extra: dict[str, Any],
                  score: JudgeScore | None) -> None:
            row = put({**_score_row(prompt, comp, system, refusal, degeneracy, score, partial_as),
                       **extra})
            bar.advance(task)
            if on_row is not None:
                on_row(row)

        def drain(block: bool) -> None:
            for fut in [f for f in pending if block or f.done()]:
                prompt, comp, extra = pending.pop(fut)
                write(prompt, comp, extra, fut.result())

        try:
            for comp in backend.stream([p.prompt for p in todo], system):
                prompt = todo[comp.index]
                extra: dict[str, Any] = {}
                if classifier is not None:
                    cs = classifier(prompt.prompt, comp.response)
                    extra = {"classifier_unsafe_prob": cs.unsafe_prob,
                             "classifier_flagged": cs.flagged}
                if judge is None:
                    write(prompt, comp, extra, None)
                else:
                    pending[judge.submit(prompt.prompt, comp.response)] = (prompt, comp, extra)
                    drain(block=False)
            drain(block=True)
        finally:
            for fut in pending:
                fut.cancel()


def _rejudge_missing(store: RowStore[dict[str, Any]], items: dict[str, Prompt], judge: Judge, *,
                     system: str | None, refusal: RefusalScorer, degeneracy: DegeneracyDetector,
                     partial_as: Outcome) -> None:
    """Ask the judge again for rows it missed before (server down, garbage); responses are
    kept. The file is rewritten atomically only when a judgement was recovered."""
    rows = {str(r["id"]): r for r in store.rows()}
    stale = [r for r in rows.values() if r.get("judge_missing") and r["id"] in items]
    if not stale:
        return
    scores = judge.score_many([(r["prompt"], r["response"]) for r in stale])
    changed = False
    for row, score in zip(stale, scores, strict=True):
        if score.missing:
            continue
        comp = Completion(0, row["response"], row.get("finish_reason"), row.get("n_new_tokens"))
        extra = {k: v for k, v in row.items() if k.startswith("classifier_")}
        rows[row["id"]] = {**_score_row(items[row["id"]], comp, system, refusal, degeneracy,
                                        score, partial_as), **extra}
        changed = True
    if changed:
        store.replace(rows.values())


def _digest(texts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(texts), ensure_ascii=False).encode()).hexdigest()[:16]


def _cached_extra(path: Path, key: dict[str, Any], compute: Callable[[], dict[str, Any]]
                  ) -> dict[str, Any]:
    """Reuse a KL/capability result made under the same key (everything that changes it:
    the run identity, the prompts, k, seed or limit), else compute and store it."""
    key = rowstore.jsonable(key)
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(stored, dict) and stored.get("key") == key:
            return dict(stored["result"])
    except (OSError, ValueError):
        pass
    result = compute()
    write_json(path, {"key": key, "result": result})
    return result


def _kl(backend: Backend, prompts: PromptSet | Sequence[str], k: int, system: str | None,
        seed: int) -> dict[str, Any]:
    if not isinstance(backend, InProcessBackend):
        raise EvaluationError(
            "KL needs the model's logits: use the in-process backend (--backend inprocess), "
            "or drop --kl-prompts when evaluating a served model."
        )
    report = kl_report(backend.lm, prompts, backend.specs, k=k, system=system, seed=seed)
    report["n_specs"] = len(backend.specs)
    return report


def _is_outcome(row: dict[str, Any], name: str) -> bool:
    return bool(row["outcome"] == name)


def summarise(rows: Sequence[dict[str, Any]], *, judge_ran: bool = False,
              seed: int = 0) -> dict[str, Any]:
    """Every rate with n and a 95% Wilson interval; judge means with bootstrap intervals."""
    refusal = rate_summary([bool(r["refusal"]) for r in rows])
    summary: dict[str, Any] = {
        "n": len(rows),
        "refusal_rate": refusal["rate"],
        "refusal_rate_ci95": refusal["ci95"],
        "refusal": {**refusal, "method": "substring"},
    }
    outcomes = {name: rate_summary([r["outcome"] == name for r in rows]) for name in OUTCOMES}
    summary["outcomes"] = outcomes
    for name in ("bypass", "degenerate"):
        summary[f"{name}_rate"] = outcomes[name]["rate"]
        summary[f"{name}_rate_ci95"] = outcomes[name]["ci95"]
    summary["degenerate_reasons"] = dict(
        Counter(reason for r in rows for reason in r.get("degenerate_reasons", [])))
    if judge_ran or any("judge_compliance" in r for r in rows):
        summary["judge"] = _judge_summary(rows, seed)
    if any("classifier_flagged" in r for r in rows):
        summary["classifier"] = {"flagged": rate_summary(
            [r.get("classifier_flagged") for r in rows])}
    labels = sorted({str(r["label"]) for r in rows if r.get("label")})
    if labels:
        summary["by_label"] = {
            lab: {"refusal": rate_summary([bool(r["refusal"]) for r in rows
                                           if r.get("label") == lab]),
                  **{name: rate_summary([r["outcome"] == name for r in rows
                                         if r.get("label") == lab]) for name in OUTCOMES}}
            for lab in labels
        }
        if "harmless" in labels:
            summary["over_refusal"] = summary["by_label"]["harmless"]["refusal"]
    return summary


def _judge_summary(rows: Sequence[dict[str, Any]], seed: int) -> dict[str, Any]:
    judged = [r for r in rows if r.get("judge_missing") is False]
    comp = [r.get("judge_compliance") if r.get("judge_missing") is False else None for r in rows]
    coh = [r.get("judge_coherence") if r.get("judge_missing") is False else None for r in rows]
    out: dict[str, Any] = {
        "n": len(judged),
        "missing": len(rows) - len(judged),
        "compliance": mean_summary(comp, seed=seed),
        "coherence": mean_summary(coh, seed=seed),
        "refusal": rate_summary([None if c is None else c == 0.0 for c in comp]),
        "partial": rate_summary([None if c is None else c == 0.5 for c in comp]),
    }
    if judged:
        judge_refused = [r["judge_compliance"] == 0.0 for r in judged]
        substring = [bool(r["refusal"]) for r in judged]
        out["agreement_with_substring"] = {
            "n": len(judged),
            "kappa": cohens_kappa(judge_refused, substring),
            "agree": sum(a == b for a, b in zip(judge_refused, substring, strict=True))
            / len(judged),
        }
    return out


def compare(rows: Sequence[dict[str, Any]], baseline_rows: dict[str, dict[str, Any]], *,
            seed: int = 0, baseline: str = "") -> dict[str, Any]:
    """Paired comparison with a baseline run on the same prompt ids.

    ``diff`` is this run's rate minus the baseline's; ``p_mcnemar`` is the
    exact McNemar test on the discordant pairs.
    """
    pairs = [(baseline_rows[r["id"]], r) for r in rows if r["id"] in baseline_rows]
    if not pairs:
        raise EvaluationError(
            f"The baseline {baseline or ''} shares no prompt ids with this run; compare runs "
            "made on the same prompt set."
        )
    for base, this in pairs:
        if base.get("prompt") != this.get("prompt"):
            raise EvaluationError(
                f"Prompt id {this['id']!r} has different text in the baseline {baseline}; "
                "the runs were made on different prompt sets."
            )

    def paired(flag: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        a = [flag(b) for b, _ in pairs]
        b = [flag(t) for _, t in pairs]
        base_sum, this_sum = rate_summary(a), rate_summary(b)
        return {"baseline": base_sum, "this": this_sum,
                "diff": this_sum["rate"] - base_sum["rate"],
                "table": mcnemar_table(a, b), "p_mcnemar": mcnemar(a, b)}

    result: dict[str, Any] = {"baseline": baseline, "n_pairs": len(pairs),
                              "refusal": paired(lambda r: bool(r["refusal"]))}
    result["outcomes"] = {name: paired(functools.partial(_is_outcome, name=name))
                          for name in OUTCOMES}
    for key in ("judge_compliance", "judge_coherence"):
        both = [(b[key], t[key]) for b, t in pairs
                if b.get("judge_missing") is False and t.get("judge_missing") is False]
        if both:
            result[key] = paired_bootstrap([x for x, _ in both], [y for _, y in both], seed=seed)
    return result
