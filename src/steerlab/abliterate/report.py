"""``report.html`` / ``report.md`` of an abliterate run, from the files in its folder:
the Pareto front of every trial, the chosen per-layer kernels, the held-out table and
sample responses before and after."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from steerlab.abliterate.heldout import HELDOUT_JSON, HELDOUT_ROWS, UNEDITED
from steerlab.reporting.plots import lines_by_layer, pareto_scatter
from steerlab.reporting.report import Figure, Report, Sample, Table

SAMPLES = 3
"""Held-out harmful prompts shown before and after."""
MEASURES = (("refusal_harmful", "refusal (harmful)", "refusal_harmful_p"),
            ("over_refusal_harmless", "over-refusal (harmless)", "over_refusal_p"),
            ("kl_first_token", "first-token KL", None),
            ("capability_accuracy", "capability accuracy", "capability_p"),
            ("perplexity", "perplexity", None))


def _read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _cell(summary: dict[str, Any]) -> str:
    value = summary.get("rate", summary.get("mean", summary.get("value")))
    ci = summary.get("ci95") or [float("nan"), float("nan")]
    count = f"{summary['k']}/{summary['n']}" if "k" in summary else f"n={summary['n']}"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] ({count})"


def heldout_rows(heldout: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per condition: each measure with its interval and paired p-value."""
    rows = []
    for name, measures in heldout["results"].items():
        row: dict[str, Any] = {"condition": name}
        paired = measures.get("vs_baseline", {})
        for key, label, p_key in MEASURES:
            if key in measures:
                p = paired.get(p_key) if p_key else None
                row[label] = _cell(measures[key]) + (f"; p={p:.3g}" if p is not None else "")
        if "nll_diff" in paired:
            diff = paired["nll_diff"]
            row["NLL diff vs unedited"] = (f"{diff['mean_diff']:+.4f} [{diff['ci95'][0]:+.4f}, "
                                             f"{diff['ci95'][1]:+.4f}]")
        rows.append(row)
    return rows


def _samples(run_dir: Path) -> list[Sample]:
    path = run_dir / HELDOUT_ROWS
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line]
    harmful = [r for r in rows if r.get("set") == "harmful"]
    prompts = list(dict.fromkeys(r["prompt"] for r in harmful))[:SAMPLES]
    return [Sample(r["condition"], r["prompt"], r["response"], r.get("outcome", ""))
            for p in prompts for r in harmful if r["prompt"] == p
            and r["condition"] in (UNEDITED, "abliterate")]


def write_report(run_dir: Path) -> tuple[Path, Path]:
    """Render the run folder's report (figures under ``figures/``)."""
    trials = _read(run_dir / "trials.json") or []
    choice = _read(run_dir / "choice.json")
    base = _read(run_dir / "baseline.json")["score"]
    manifest = _read(run_dir / "manifest.json") or {}
    heldout = _read(run_dir / HELDOUT_JSON)
    figures = run_dir / "figures"
    points = [(t["score"]["kl"], t["score"]["refusals"] / t["score"]["n_harmful"])
              for t in trials]
    index = {t["number"]: i for i, t in enumerate(trials)}
    cap = float(manifest.get("config", {}).get("kl_cap", 0.1))
    pareto = pareto_scatter(
        figures / "pareto.png", points, [i for i, t in enumerate(trials) if t["pareto"]],
        index.get(choice["trial"]), title="Every trial: validation refusal against KL",
        xlabel="first-token KL on harmless validation prompts",
        ylabel="refusal rate on harmful validation prompts", cap=cap)
    kernels = lines_by_layer(
        figures / "kernels.png",
        {"attention output": dict(enumerate(choice["weights"]["attn"])),
         "MLP output": dict(enumerate(choice["weights"]["mlp"]))},
        title="Chosen ablation weight per layer", ylabel="weight w (x ← x − w·QQᵀx)")
    chosen = choice["score"]
    summary = (
        f"{len(trials)} trials. Validation refusals {base['refusals']}/{base['n_harmful']} "
        f"unedited → {chosen['refusals']}/{chosen['n_harmful']} for trial {choice['trial']} "
        f"at first-token KL {chosen['kl']:.3f} (rule: {choice['rule']})."
    )
    tables = [Table("Chosen trial", ["parameter", "value"],
                    [{"parameter": k, "value": v} for k, v in choice["params"].items()])]
    if heldout is not None:
        plain = heldout.get("plain_selection", {})
        rows = heldout_rows(heldout)
        tables.insert(0, Table(
            "Held-out evaluation", list(dict.fromkeys(k for row in rows for k in row)), rows,
            note=("Rates with 95% Wilson intervals, means with bootstrap intervals; p: McNemar "
                  "against the unedited model on the same prompts. 'plain selection' ablates "
                  f"layer {plain.get('layer')}'s direction everywhere ({plain.get('rule', '')})."
                  )))
    report = Report(
        title="steerlab abliterate", summary=summary, tables=tables,
        figures=[Figure(pareto, "Every trial's validation refusal rate against its first-token "
                        "KL; the Pareto front joined, the chosen trial circled."),
                 Figure(kernels, "The chosen trial's ablation weight at each layer's attention "
                        "and MLP output.")],
        samples=_samples(run_dir), provenance=manifest)
    return report.write(run_dir)


__all__ = ["heldout_rows", "write_report"]
