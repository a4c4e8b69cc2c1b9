"""PNG plots, readable without zooming (Agg backend; global rcParams left alone).

Two families share one frame (:func:`_figure`: style, tight layout, atomic write):

- layer-analysis plots (``plot_*``, :func:`save_scan_plots`, large fonts,
  :data:`STYLE`) for ``steerlab extract --scan``;
- experiment-report figures (:func:`rate_by_layer`, :func:`bars_with_ci`,
  :func:`lines_by_layer`, :func:`matrix_heatmap`,
  :data:`REPORT_STYLE`) for the experiment reports.

Each function takes measured numbers, writes one PNG and returns its path;
nothing here computes results.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steerlab.store.atomic import atomic_open

if TYPE_CHECKING:
    from steerlab.directions.analysis import ScanResult

STYLE: dict[str, Any] = {
    "font.size": 15,
    "axes.titlesize": 18,
    "axes.labelsize": 16,
    "xtick.labelsize": 13,
    "ytick.labelsize": 13,
    "legend.fontsize": 14,
    "lines.linewidth": 2.5,
    "lines.markersize": 7,
}

REPORT_STYLE: dict[str, Any] = {
    "font.size": 12,
    "axes.titlesize": 14,
    "axes.labelsize": 13,
    "legend.fontsize": 11,
    "figure.dpi": 110,
}


@contextmanager
def _figure(path: str | Path, width: float = 10, height: float = 6,
            style: Mapping[str, Any] = STYLE) -> Iterator[tuple[Any, Any]]:
    """A figure in ``style`` (the user's global rcParams are left alone), written to
    ``path`` atomically when the block ends."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    with plt.rc_context(dict(style)):  # type: ignore[arg-type]
        fig, ax = plt.subplots(figsize=(width, height), dpi=110)
        try:
            yield fig, ax
            fig.tight_layout()
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png")
        finally:
            plt.close(fig)
    with atomic_open(Path(path), "wb") as handle:
        handle.write(buffer.getvalue())


def _plot_by_layer(ax: Any, values: Mapping[Any, float], **style: Any) -> None:
    """One curve over layers; keys are layer ints or, read back from JSON, digit strings."""
    xs = sorted(int(k) for k in values)
    ax.plot(xs, [values[k] if k in values else values[str(k)] for k in xs], **style)


def _finish(ax: Any, **labels: Any) -> None:
    """Titles and limits, a legend where it fits best and a light grid: every line chart's end."""
    ax.set(**labels)
    ax.legend(loc="best")
    ax.grid(alpha=0.3)


def _mark_best(ax: Any, best: int | None) -> None:
    if best is not None:
        ax.axvline(best, color="0.5", linestyle=":", linewidth=2, label=f"best layer {best}")


def plot_cohens_d(cohens_d: Mapping[int, float], path: str | Path, *,
                  best_layer: int | None = None, title: str = "Separation by layer") -> Path:
    """Cohen's d of the held-out projection per layer."""
    with _figure(path) as (_fig, ax):
        _plot_by_layer(ax, cohens_d, marker="o", color="tab:blue")
        ax.axhline(1.0, color="tab:red", linestyle="--", linewidth=1.5, label="d = 1")
        _mark_best(ax, best_layer)
        ax.set(xlabel="layer (residual stream after it)", ylabel="Cohen's d (held out)",
               title=title)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")
    return Path(path)


def plot_probe_accuracy(probe: Mapping[int, Mapping[str, Any]], path: str | Path, *,
                        best_layer: int | None = None,
                        title: str = "Probe accuracy by layer") -> Path:
    """Held-out linear-probe accuracy per layer with 95% Wilson intervals."""
    with _figure(path) as (_fig, ax):
        layers = sorted(probe)
        acc = [probe[i]["accuracy"] for i in layers]
        lo = [probe[i]["accuracy"] - probe[i]["ci95"][0] for i in layers]
        hi = [probe[i]["ci95"][1] - probe[i]["accuracy"] for i in layers]
        n = probe[layers[0]]["n"] if layers else 0
        ax.errorbar(layers, acc, yerr=[lo, hi], marker="o", color="tab:green", capsize=3,
                    label=f"held-out accuracy (n={n}, 95% CI)")
        ax.axhline(0.5, color="0.4", linestyle="--", linewidth=1.5, label="chance")
        _mark_best(ax, best_layer)
        ax.set(xlabel="layer (residual stream after it)", ylabel="accuracy", ylim=(0.0, 1.05),
               title=title)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    return Path(path)


def plot_cosine_heatmap(matrix: Sequence[Sequence[float]], layers: Sequence[int],
                        path: str | Path, *,
                        title: str = "Cosine similarity across layers") -> Path:
    """Cross-layer cosine similarity of one direction's per-layer vectors."""
    with _figure(path, 9, 8) as (fig, ax):
        image = ax.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1, origin="lower")
        ticks = list(range(0, len(layers), max(1, len(layers) // 12)))
        ax.set_xticks(ticks, [str(layers[i]) for i in ticks])
        ax.set_yticks(ticks, [str(layers[i]) for i in ticks])
        ax.set(xlabel="layer", ylabel="layer", title=title)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="cosine")
    return Path(path)


def plot_refusal_persona_cosine(cosines: Mapping[int, float], path: str | Path, *,
                                title: str = "Refusal vs compliant-persona direction") -> Path:
    """Cosine between the refusal and the persona direction, per layer."""
    with _figure(path) as (_fig, ax):
        _plot_by_layer(ax, cosines, marker="o", color="tab:purple")
        ax.axhline(0.0, color="0.4", linewidth=1.2)
        ax.set(xlabel="layer (residual stream after it)", ylabel="cosine similarity", title=title,
               ylim=(-1.0, 1.0))
        ax.grid(alpha=0.3)
    return Path(path)


def save_scan_plots(result: ScanResult, out_dir: str | Path) -> list[Path]:
    """Write ``cohens_d.png``, ``probe_accuracy.png``, ``cosine_heatmap.png`` and, when
    the scan has it, ``refusal_persona_cosine.png`` into ``out_dir``."""
    folder = Path(out_dir)
    paths = [
        plot_cohens_d(result.cohens_d, folder / "cohens_d.png", best_layer=result.best_layer),
        plot_probe_accuracy(result.probe_accuracy, folder / "probe_accuracy.png",
                            best_layer=result.best_layer),
        plot_cosine_heatmap(result.cosine_matrix, result.layers, folder / "cosine_heatmap.png"),
    ]
    if result.refusal_persona_cosine:
        paths.append(plot_refusal_persona_cosine(result.refusal_persona_cosine,
                                                 folder / "refusal_persona_cosine.png"))
    return paths


# -- experiment-report figures ---------------------------------------------------------------------
def _ci_errors(rates: Sequence[float], cis: Sequence[Sequence[float]]) -> list[list[float]]:
    """Matplotlib's asymmetric ``yerr`` from rates and their ``[lo, hi]`` intervals."""
    return [
        [r - c[0] for r, c in zip(rates, cis, strict=True)],
        [c[1] - r for r, c in zip(rates, cis, strict=True)],
    ]


def rate_by_layer(
    path: str | Path,
    layers: Sequence[int],
    rates: Sequence[float],
    cis: Sequence[Sequence[float]],
    *,
    title: str,
    ylabel: str,
    references: Mapping[str, tuple[float, Sequence[float]]] | None = None,
    spans: Mapping[str, tuple[float, float]] | None = None,
    label: str = "measured (95% CI)",
    more: Mapping[str, tuple[Sequence[float], Sequence[Sequence[float]]]] | None = None,
) -> Path:
    """Rates (with 95% CI bars) by layer, with horizontal reference rates and shaded spans;
    ``more`` adds other measured series over the same layers, each ``(rates, cis)``."""
    with _figure(path, 9, 5, REPORT_STYLE) as (_fig, ax):
        colors = ["#444444", "#d62728", "#2ca02c", "#9467bd"]
        for (span_name, (lo_x, hi_x)), color in zip(
            (spans or {}).items(), ["#e8f0ff", "#fff0e0"], strict=False
        ):
            ax.axvspan(lo_x, hi_x, color=color, alpha=0.8, label=span_name, zorder=0)
        for (ref_name, (rate, ci)), color in zip((references or {}).items(), colors, strict=False):
            ax.axhline(rate, color=color, linestyle="--", label=f"{ref_name} ({rate:.0%})")
            ax.axhspan(ci[0], ci[1], color=color, alpha=0.08)
        ax.errorbar(layers, rates, yerr=_ci_errors(rates, cis), marker="o", capsize=4,
                    color="#1f77b4", lw=2, label=label)
        for (name, (more_rates, more_cis)), color in zip(
            (more or {}).items(), ["#ff7f0e", "#8c564b", "#e377c2"], strict=False
        ):
            ax.errorbar(layers, more_rates, yerr=_ci_errors(more_rates, more_cis), marker="s",
                        capsize=3, color=color, lw=1.5, label=name)
        _finish(ax, title=title, xlabel="layer", ylabel=ylabel, ylim=(-0.03, 1.03))
    return Path(path)


def bars_with_ci(
    path: str | Path,
    names: Sequence[str],
    rates: Sequence[float],
    cis: Sequence[Sequence[float]],
    *,
    title: str,
    ylabel: str,
) -> Path:
    """One bar per condition with its 95% interval."""
    with _figure(path, max(8, 0.7 * len(names) + 3), 5.5, REPORT_STYLE) as (_fig, ax):
        ax.bar(range(len(names)), rates, yerr=_ci_errors(rates, cis), capsize=4,
               color="#4c72b0")
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right")
        ax.set(title=title, ylabel=ylabel, ylim=(0, 1.05))
        ax.grid(axis="y", alpha=0.3)
    return Path(path)


def lines_by_layer(
    path: str | Path,
    series: Mapping[str, Mapping[Any, float]],
    *,
    title: str,
    ylabel: str,
    zero_line: bool = True,
) -> Path:
    """Several per-layer curves on one axis (cosines, Cohen's d); layer keys may be the
    digit strings of a JSON read-back."""
    with _figure(path, 9, 5, REPORT_STYLE) as (_fig, ax):
        for label, values in series.items():
            _plot_by_layer(ax, values, marker="o", lw=2, label=label)
        if zero_line:
            ax.axhline(0, color="black", lw=0.8)
        _finish(ax, title=title, xlabel="layer", ylabel=ylabel)
    return Path(path)


def matrix_heatmap(
    path: str | Path,
    rows: Sequence[str],
    cols: Sequence[str],
    values: Sequence[Sequence[float]],
    *,
    title: str,
    row_label: str,
    col_label: str,
    value_label: str,
    vmin: float = -1.0,
    vmax: float = 1.0,
    annotate: bool | None = None,
    cmap: str = "RdBu_r",
    value_format: str = "{:.2f}",
    size: tuple[float, float] | None = None,
    fontsize: float = 9,
) -> Path:
    """A square-ish matrix (e.g. cosines between layers, or rates over a grid with
    ``cmap="viridis"``); ``size`` (inches) defaults to one that grows with the matrix.

    Values are printed in the cells when ``annotate`` (default: up to 12x12).
    """
    n_r, n_c = len(rows), len(cols)
    width, height = size or (min(14, max(7.0, 0.45 * n_c + 3.5)),
                             min(12, max(4.5, 0.4 * n_r + 2.5)))
    with _figure(path, width, height, REPORT_STYLE) as (fig, ax):
        image = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
        crowded = sum(len(str(c)) for c in cols) > 50
        ax.set_xticks(range(n_c), list(cols), rotation=90 if n_c > 12 else 35 if crowded else 0,
                      ha="right" if crowded and n_c <= 12 else "center")
        ax.set_yticks(range(n_r), list(rows))
        if annotate if annotate is not None else max(n_r, n_c) <= 12:
            for i, row in enumerate(values):
                for j, v in enumerate(row):
                    dark = (abs(v) > 0.6 * max(abs(vmin), abs(vmax)) if cmap == "RdBu_r"
                            else v < (vmin + vmax) / 2)
                    ax.text(j, i, value_format.format(v), ha="center", va="center",
                            fontsize=fontsize, color="white" if dark else "black")
        ax.set(title=title, xlabel=col_label, ylabel=row_label)
        fig.colorbar(image, ax=ax, label=value_label)
    return Path(path)


def pareto_scatter(
    path: str | Path,
    points: Sequence[tuple[float, float]],
    front: Sequence[int],
    chosen: int | None,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    cap: float | None = None,
) -> Path:
    """Every trial as a point (x, y), the Pareto front joined, the chosen one circled and an
    optional vertical cap line (e.g. the KL limit of a choice rule)."""
    with _figure(path, 8, 5.5, REPORT_STYLE) as (_fig, ax):
        ax.scatter([p[0] for p in points], [p[1] for p in points], s=36, color="0.6",
                   label=f"trials ({len(points)})")
        line = sorted(points[i] for i in front)
        ax.plot([p[0] for p in line], [p[1] for p in line], "o-", color="tab:blue", lw=2,
                label="Pareto front")
        if chosen is not None:
            ax.scatter([points[chosen][0]], [points[chosen][1]], s=220, facecolors="none",
                       edgecolors="tab:red", linewidths=2.5, label="chosen")
        if cap is not None:
            ax.axvline(cap, color="tab:red", linestyle=":", lw=1.5, label=f"cap {cap:g}")
        _finish(ax, title=title, xlabel=xlabel, ylabel=ylabel)
    return Path(path)
