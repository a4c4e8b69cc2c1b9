"""``run_eval``: generate, score, and summarise one condition on one prompt set.

Writes into ``out_dir``:

- ``responses.jsonl``: one row per prompt (prompt, response, every score),
  appended and flushed as each row is finished, so an interrupted run loses
  at most the rows in flight; a rerun skips ids already there;
- rows the judge missed (server down, unparseable output) are judged again
  on a rerun, keeping their responses;
- ``config.json``: what produced the rows (backend, interventions, system
  prompt, scorers); a rerun with a different config refuses to mix rows;
- ``summary.json`` / ``summary.md``: rates with n and 95% intervals,
  computed from the rows (never stored instead of them), written atomically;
- ``kl.json`` / ``capability.json`` when asked (kept, so a rerun reuses them).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steerlab._atomic import atomic_open, write_json, write_text
from steerlab.errors import EvaluationError
from steerlab.evaluate.backends import Backend, Completion, InProcessBackend
from steerlab.evaluate.degeneracy import DegeneracyDetector
from steerlab.evaluate.judge import Judge, JudgeScore
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

if TYPE_CHECKING:
    from steerlab.evaluate.classifier import LocalClassifier
    from steerlab.prompts import Prompt, PromptSet

ROWS = "responses.jsonl"
SUMMARY = "summary.json"
SUMMARY_MD = "summary.md"
CONFIG = "config.json"
_CONFIG_KEYS = ("backend", "system", "judge", "classifier", "refusal_phrases", "partial_as")


def _as_prompts(prompts: PromptSet | Sequence[Prompt] | Sequence[str]) -> list[Prompt]:
    from steerlab.prompts import Prompt

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


def read_rows(path: str | Path, *, repair: bool = False) -> dict[str, dict[str, Any]]:
    """Rows of a responses.jsonl by id. A last line cut off by a kill is ignored
    (and removed when ``repair``); a row appearing twice keeps the last copy."""
    path = Path(path)
    if not path.exists():
        return {}
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        raw = raw[: raw.rfind(b"\n") + 1]
        if repair:
            with path.open("r+b") as handle:
                handle.truncate(len(raw))
    rows: dict[str, dict[str, Any]] = {}
    for n, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise EvaluationError(
                f"{path} line {n} is not JSON ({exc}). Fix or delete that line, then rerun."
            ) from exc
        rows[str(row["id"])] = row
    return rows


def _check_config(out: Path, config: dict[str, Any], has_rows: bool) -> None:
    path = out / CONFIG
    if path.exists() and has_rows:
        old = json.loads(path.read_text(encoding="utf-8"))
        diffs = [k for k in _CONFIG_KEYS if old.get(k) != config.get(k)]
        if diffs:
            raise EvaluationError(
                f"{out} already holds rows made with a different {', '.join(diffs)}. "
                "Use a new --out directory (or delete this one) instead of mixing conditions."
            )
    write_json(path, config)


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
) -> dict[str, Any]:
    """Evaluate one condition; resumable. Returns the summary (also in ``summary.json``).

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
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
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
    rows_path = out / ROWS
    done = read_rows(rows_path, repair=True)
    _check_config(out, config, bool(done))
    todo = [p for p in items if p.id not in done]
    if todo:
        _generate_rows(todo, backend, rows_path, system=system, judge=judge,
                       classifier=classifier, refusal=refusal, degeneracy=degeneracy,
                       partial_as=partial_as, on_row=on_row, progress=progress,
                       n_total=len(items), n_done=len(items) - len(todo))
    if judge is not None:
        _rejudge_missing(rows_path, {p.id: p for p in items}, judge, system=system,
                         refusal=refusal, degeneracy=degeneracy, partial_as=partial_as)
    rows_by_id = read_rows(rows_path)
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
        summary["kl"] = _cached_extra(out / "kl.json", config, lambda: _kl(backend, kl_prompts,
                                                                           kl_k, system, seed))
    if capability_limit is not None:
        summary["capability"] = _cached_extra(out / "capability.json", config,
                                              lambda: _capability(backend, capability_limit,
                                                                  system))
    from steerlab.provenance import provenance

    lm = backend.lm if isinstance(backend, InProcessBackend) else None
    summary["provenance"] = provenance(lm, config=config, seed=seed)
    write_json(out / SUMMARY, summary)
    write_text(out / SUMMARY_MD, summary_markdown(summary))
    return summary


def _generate_rows(todo: list[Prompt], backend: Backend, rows_path: Path, *, system: str | None,
                   judge: Judge | None, classifier: LocalClassifier | None,
                   refusal: RefusalScorer, degeneracy: DegeneracyDetector, partial_as: Outcome,
                   on_row: Callable[[dict[str, Any]], None] | None, progress: bool,
                   n_total: int, n_done: int) -> None:
    from rich.progress import Progress

    pending: dict[Future[JudgeScore], tuple[Prompt, Completion, dict[str, Any]]] = {}
    bar = Progress(transient=True, disable=not progress)
    task = bar.add_task("evaluating", total=n_total, completed=n_done)
    with rows_path.open("a", encoding="utf-8") as handle, bar:

        def write(prompt: Prompt, comp: Completion, extra: dict[str, Any],
                  score: JudgeScore | None) -> None:
            row = _score_row(prompt, comp, system, refusal, degeneracy, score, partial_as)
            row.update(extra)
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            handle.flush()
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


def _rejudge_missing(rows_path: Path, items: dict[str, Prompt], judge: Judge, *,
                     system: str | None, refusal: RefusalScorer, degeneracy: DegeneracyDetector,
                     partial_as: Outcome) -> None:
    """Ask the judge again for rows it missed before (server down, garbage); responses are
    kept. The file is rewritten atomically only when a judgement was recovered."""
    rows = read_rows(rows_path)
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
        with atomic_open(rows_path, "w") as handle:
            for row in rows.values():
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def _cached_extra(path: Path, config: dict[str, Any], compute: Callable[[], dict[str, Any]]
                  ) -> dict[str, Any]:
    """Reuse a KL/capability result made under the same backend config, else compute it."""
    if path.exists():
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored.get("backend") == config["backend"] and stored.get("system") == config["system"]:
            return dict(stored["result"])
    result = compute()
    write_json(path, {"backend": config["backend"], "system": config["system"], "result": result})
    return result


def _kl(backend: Backend, prompts: PromptSet | Sequence[str], k: int, system: str | None,
        seed: int) -> dict[str, Any]:
    from steerlab.evaluate.kl import kl_report

    if not isinstance(backend, InProcessBackend):
        raise EvaluationError(
            "KL needs the model's logits: use the in-process backend (--backend inprocess), "
            "or drop --kl-prompts when evaluating a served model."
        )
    report = kl_report(backend.lm, prompts, backend.specs, k=k, system=system, seed=seed)
    report["n_specs"] = len(backend.specs)
    return report


def _capability(backend: Backend, limit: int, system: str | None) -> dict[str, Any]:
    from steerlab.evaluate.capability import capability_eval

    return capability_eval(backend, limit if limit > 0 else None, system=system)


def _is_outcome(row: dict[str, Any], name: str) -> bool:
    return bool(row["outcome"] == name)


def _outcome_flags(rows: Sequence[dict[str, Any]], name: str) -> list[bool]:
    return [r["outcome"] == name for r in rows]


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
    outcomes = {name: rate_summary(_outcome_flags(rows, name)) for name in OUTCOMES}
    summary["outcomes"] = outcomes
    for name in ("bypass", "degenerate"):
        summary[f"{name}_rate"] = outcomes[name]["rate"]
        summary[f"{name}_rate_ci95"] = outcomes[name]["ci95"]
    reasons: dict[str, int] = {}
    for r in rows:
        for reason in r.get("degenerate_reasons", []):
            reasons[reason] = reasons.get(reason, 0) + 1
    summary["degenerate_reasons"] = reasons
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


def _fmt_rate(s: dict[str, Any] | None) -> str:
    if not s or s.get("rate") is None:
        return "n/a"
    lo, hi = s["ci95"]
    return f"{s['rate']:.3f} [{lo:.3f}, {hi:.3f}] (k={s['k']}, n={s['n']})"


def _fmt_mean(s: dict[str, Any] | None) -> str:
    if not s or s.get("mean") is None:
        return "n/a"
    lo, hi = s["ci95"]
    return f"{s['mean']:.3f} [{lo:.3f}, {hi:.3f}] (n={s['n']})"


def summary_markdown(summary: dict[str, Any]) -> str:
    """A short human-readable summary: every rate with its interval and n."""
    lines = ["# steerlab eval summary", "",
             f"n = {summary['n']} prompts. Rates: value [95% Wilson interval] (k, n).", "",
             "| measure | value |", "|---|---|",
             f"| refusal (substring) | {_fmt_rate(summary['refusal'])} |"]
    for name in OUTCOMES:
        lines.append(f"| outcome: {name} | {_fmt_rate(summary['outcomes'][name])} |")
    if "over_refusal" in summary:
        lines.append(f"| over-refusal (harmless) | {_fmt_rate(summary['over_refusal'])} |")
    judge = summary.get("judge")
    if judge:
        lines.append(f"| judge compliance (mean) | {_fmt_mean(judge['compliance'])} |")
        lines.append(f"| judge coherence (mean) | {_fmt_mean(judge['coherence'])} |")
        lines.append(f"| judge missing | {judge['missing']} |")
        agree = judge.get("agreement_with_substring")
        if agree:
            lines.append(f"| judge vs substring kappa | {agree['kappa']:.3f} (n={agree['n']}) |")
    if "classifier" in summary:
        lines.append(f"| classifier flagged | {_fmt_rate(summary['classifier']['flagged'])} |")
    kl = summary.get("kl")
    if kl:
        lines.append(f"| KL first token | {_fmt_mean(kl['first_token'])} |")
        k = kl["k"]
        lines.append(f"| KL mean over first {k} tokens | {_fmt_mean(kl[f'mean_first_{k}'])} |")
    cap = summary.get("capability")
    if cap:
        lines.append(f"| capability accuracy | {_fmt_rate({**cap, 'rate': cap['accuracy']})} |")
    comp = summary.get("comparison")
    if comp:
        lines += ["", f"## Paired comparison with {comp['baseline']} (n = {comp['n_pairs']})",
                  "", "| measure | baseline | this run | diff | McNemar p |",
                  "|---|---|---|---|---|"]
        measures = [("refusal (substring)", comp["refusal"])] + [
            (f"outcome: {name}", comp["outcomes"][name]) for name in OUTCOMES]
        for label, c in measures:
            lines.append(f"| {label} | {_fmt_rate(c['baseline'])} | {_fmt_rate(c['this'])} | "
                         f"{c['diff']:+.3f} | {c['p_mcnemar']:.4g} |")
        for key in ("judge_compliance", "judge_coherence"):
            if key in comp:
                c = comp[key]
                lines.append(f"| {key} (paired bootstrap) | | | {c['mean_diff']:+.3f} "
                             f"[{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}] | {c['p']:.4g} |")
    return "\n".join(lines) + "\n"


def iter_rows(out_dir: str | Path) -> Iterable[dict[str, Any]]:
    """The rows of a finished or partial run, in file order."""
    return read_rows(Path(out_dir) / ROWS).values()
