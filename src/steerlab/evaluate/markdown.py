"""``summary.md``: an eval summary as a short Markdown table, every rate with its
interval and n (the numbers come from :func:`steerlab.evaluate.run.summarise`)."""

from __future__ import annotations

from typing import Any

from steerlab.evaluate.outcome import OUTCOMES


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
    rows = [("refusal (substring)", _fmt_rate(summary["refusal"]))]
    rows += [(f"outcome: {name}", _fmt_rate(summary["outcomes"][name])) for name in OUTCOMES]
    if "over_refusal" in summary:
        rows.append(("over-refusal (harmless)", _fmt_rate(summary["over_refusal"])))
    judge = summary.get("judge")
    if judge:
        rows += [("judge compliance (mean)", _fmt_mean(judge["compliance"])),
                 ("judge coherence (mean)", _fmt_mean(judge["coherence"])),
                 ("judge missing", str(judge["missing"]))]
        agree = judge.get("agreement_with_substring")
        if agree:
            rows.append(("judge vs substring kappa", f"{agree['kappa']:.3f} (n={agree['n']})"))
    if "classifier" in summary:
        rows.append(("classifier flagged", _fmt_rate(summary["classifier"]["flagged"])))
    kl = summary.get("kl")
    if kl:
        k = kl["k"]
        rows += [("KL first token", _fmt_mean(kl["first_token"])),
                 (f"KL mean over first {k} tokens", _fmt_mean(kl[f"mean_first_{k}"]))]
    cap = summary.get("capability")
    if cap:
        rows.append(("capability accuracy", _fmt_rate({**cap, "rate": cap["accuracy"]})))
    lines = ["# steerlab eval summary", "",
             f"n = {summary['n']} prompts. Rates: value [95% Wilson interval] (k, n).", "",
             "| measure | value |", "|---|---|", *(f"| {m} | {v} |" for m, v in rows)]
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
