"""The one report builder: every experiment's report.html and report.md are a summary,
its findings, tables, figures, sample responses and provenance, built here."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import steerlab.reporting.plots as plots
from steerlab.experiments.config import ExperimentConfig
from steerlab.experiments.store import ResponseStore
from steerlab.experiments.summary import Entry
from steerlab.reporting.report import Figure, Finding, Report, Sample, Table

RATE_KEYS = ("n", "refusal_rate", "refusal_rate_ci95", "bypass_rate", "degenerate_rate",
             "vs_baseline_p")
JUDGE_COLUMNS = ["judge_compliance", "judge_compliance_ci95", "judge_coherence",
                 "judge_coherence_ci95"]


def write_report(
    out: Path,
    results: Mapping[str, Any],
    *,
    title: str,
    tables: Sequence[Table],
    figures: Sequence[Figure],
    samples: Sequence[Sample] = (),
    summary: str | None = None,
) -> Path:
    """Write ``report.html`` and ``report.md``: the summary (``results["summary"]`` unless
    given), findings and provenance from ``results``, then tables, figures and samples."""
    report = Report(
        title=title,
        summary=results["summary"] if summary is None else summary,
        findings=[Finding(**f) for f in results.get("findings", [])],
        tables=list(tables),
        figures=list(figures),
        samples=list(samples),
        provenance=results["provenance"],
    )
    html, _ = report.write(out)
    return html


def write_experiment_report(out: Path, results: Mapping[str, Any], store: ResponseStore,
                            config: ExperimentConfig, *, title: str, tables: Sequence[Table],
                            figures: Sequence[Figure], show: Sequence[str],
                            summary: str | None = None) -> Path:
    """An experiment's report (:func:`write_report`) with the first ``config.n_samples``
    responses by prompt id of each condition in ``show`` (once each): the same prompts
    across conditions, whatever order the rows finished in."""
    samples = [Sample(name, row["prompt"], row["response"], row["outcome"])
               for name in dict.fromkeys(show)
               for row in sorted(store.rows(name), key=lambda r: str(r["prompt_id"]))
               [:config.n_samples]]
    return write_report(out, results, title=title, tables=tables, figures=figures,
                        samples=samples, summary=summary)


def setup_sentence(results: Mapping[str, Any], config: ExperimentConfig) -> str:
    """The opening of a summary: model, evaluation prompts, decoding and scoring."""
    return (
        f"Model {results['model']} (fingerprint {results['fingerprint']}), "
        f"{results['n_eval']} harmful evaluation prompts from {results['eval_prompts']}, "
        f"greedy {config.max_new_tokens} new tokens, substring refusal scoring"
    )


def condition_table(title: str, entries: Mapping[str, Entry], *, judged: bool = False,
                    extra: Sequence[str] = (), note: str = "") -> Table:
    columns = ["condition", *RATE_KEYS, *extra, *(JUDGE_COLUMNS if judged else []),
               "description"]
    return Table(
        title,
        columns,
        [{"condition": n, **e} for n, e in entries.items()],
        note=note
        or "p: exact McNemar test against the baseline on the same prompts; intervals: Wilson 95%.",
    )


def kl_table(title: str, kl: Mapping[str, Entry], k: int) -> Table:
    columns = ["condition", "kl_n", "kl_first_token", "kl_first_token_ci95", f"kl_first_{k}",
               f"kl_first_{k}_ci95"]
    return Table(
        title,
        columns,
        [{"condition": n, **v} for n, v in kl.items()],
        note=f"KL(base ‖ steered) in nats on harmless prompts: at the first "
        f"response token and averaged over the first {k} baseline tokens "
        "(teacher-forced); bootstrap 95% intervals.",
    )


def refusal_bars(path: Path, entries: Mapping[str, Mapping[str, Any]], names: Sequence[str],
                 caption: str, *, title: str) -> Figure:
    """Bar chart of the refusal rate (95% Wilson CI) of the conditions ``names``."""
    return Figure(plots.bars_with_ci(
        path,
        list(names),
        [entries[n]["refusal_rate"] for n in names],
        [entries[n]["refusal_rate_ci95"] for n in names],
        title=title,
        ylabel="refusal rate",
    ), caption)


def layer_lines(path: Path, series: Mapping[str, Mapping[Any, float]], caption: str, *,
                title: str, ylabel: str) -> Figure:
    """Per-layer curves on one axis (Cohen's d, cosines), with the figure's caption."""
    return Figure(plots.lines_by_layer(path, series, title=title, ylabel=ylabel), caption)


def cohens_d_lines(figs: Path, series: Mapping[str, Mapping[Any, float]], caption: str, *,
                   title: str) -> Figure:
    """The held-out Cohen's d by layer that every experiment's report shows
    (``cohens_d_by_layer.png`` in ``figs``), one curve per direction."""
    return layer_lines(figs / "cohens_d_by_layer.png", series, caption, title=title,
                       ylabel="Cohen's d")


def layer_alpha_grid(path: Path, cells: Sequence[Mapping[str, Any]], layers: Sequence[int],
                     alphas: Sequence[float], key: str, *, title: str, col_label: str,
                     value_label: str) -> Path:
    """Heatmap of the rate ``key`` over the (layer, alpha) cells of a steering search:
    layers as rows, alphas as columns, each cell's rate printed."""
    values = [[next(c[key] for c in cells if c["layer"] == la and c["alpha"] == al)
               for al in alphas] for la in layers]
    return plots.matrix_heatmap(
        path, [f"{la:g}" for la in layers], [f"{al:g}" for al in alphas], values,
        title=title, row_label="layer", col_label=col_label, value_label=value_label,
        vmin=0.0, vmax=1.0, annotate=True, cmap="viridis", value_format="{:.0%}",
        size=(1.4 * len(alphas) + 3, 0.9 * len(layers) + 2.5), fontsize=12,
    )
