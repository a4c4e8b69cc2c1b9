"""Figures shared by experiment reports (matplotlib, Agg, large fonts).

Each function takes measured numbers and writes one PNG; nothing here
computes results.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

plt.rcParams.update(
    {
        "font.size": 12,
        "axes.titlesize": 14,
        "axes.labelsize": 13,
        "legend.fontsize": 11,
        "figure.dpi": 110,
    }
)


def rate_by_layer(
    path: Path,
    layers: Sequence[int],
    rates: Sequence[float],
    cis: Sequence[Sequence[float]],
    *,
    title: str,
    ylabel: str,
    references: Mapping[str, tuple[float, Sequence[float]]] | None = None,
    spans: Mapping[str, tuple[float, float]] | None = None,
) -> Path:
    """Rates (with 95% CI bars) by layer, with horizontal reference rates and shaded spans."""
    fig, ax = plt.subplots(figsize=(9, 5))
    colors = ["#444444", "#d62728", "#2ca02c", "#9467bd"]
    for (label, (lo_x, hi_x)), color in zip(
        (spans or {}).items(), ["#e8f0ff", "#fff0e0"], strict=False
    ):
        ax.axvspan(lo_x, hi_x, color=color, alpha=0.8, label=label, zorder=0)
    for (label, (rate, ci)), color in zip((references or {}).items(), colors, strict=False):
        ax.axhline(rate, color=color, linestyle="--", label=f"{label} ({rate:.0%})")
        ax.axhspan(ci[0], ci[1], color=color, alpha=0.08)
    err = [
        [r - c[0] for r, c in zip(rates, cis, strict=True)],
        [c[1] - r for r, c in zip(rates, cis, strict=True)],
    ]
    ax.errorbar(
        layers,
        rates,
        yerr=err,
        marker="o",
        capsize=4,
        color="#1f77b4",
        lw=2,
        label="measured (95% CI)",
    )
    ax.set(title=title, xlabel="layer", ylabel=ylabel, ylim=(-0.03, 1.03))
    ax.legend(loc="best")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def bars_with_ci(
    path: Path,
    names: Sequence[str],
    rates: Sequence[float],
    cis: Sequence[Sequence[float]],
    *,
    title: str,
    ylabel: str,
) -> Path:
    """One bar per condition with its 95% interval."""
    fig, ax = plt.subplots(figsize=(max(8, 0.7 * len(names) + 3), 5.5))
    err = [
        [r - c[0] for r, c in zip(rates, cis, strict=True)],
        [c[1] - r for r, c in zip(rates, cis, strict=True)],
    ]
    ax.bar(range(len(names)), rates, yerr=err, capsize=4, color="#4c72b0")
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right")
    ax.set(title=title, ylabel=ylabel, ylim=(0, 1.05))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def lines_by_layer(
    path: Path,
    series: Mapping[str, Mapping[int, float]],
    *,
    title: str,
    ylabel: str,
    zero_line: bool = True,
) -> Path:
    """Several per-layer curves on one axis (cosines, Cohen's d)."""
    fig, ax = plt.subplots(figsize=(9, 5))
    for label, values in series.items():
        xs = sorted(int(k) for k in values)
        ax.plot(
            xs,
            [values[k] if k in values else values[str(k)] for k in xs],  # type: ignore[index]
            marker="o",
            lw=2,
            label=label,
        )
    if zero_line:
        ax.axhline(0, color="black", lw=0.8)
    ax.set(title=title, xlabel="layer", ylabel=ylabel)
    ax.legend(loc="best")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def grid_heatmap(
    path: Path,
    rows: Sequence[float],
    cols: Sequence[float],
    values: Sequence[Sequence[float]],
    *,
    title: str,
    row_label: str,
    col_label: str,
    value_label: str,
) -> Path:
    """A labelled heatmap with the value printed in each cell."""
    fig, ax = plt.subplots(figsize=(1.4 * len(cols) + 3, 0.9 * len(rows) + 2.5))
    image = ax.imshow(values, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(cols)), [f"{c:g}" for c in cols])
    ax.set_yticks(range(len(rows)), [f"{r:g}" for r in rows])
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(
                j,
                i,
                f"{v:.0%}",
                ha="center",
                va="center",
                color="white" if v < 0.5 else "black",
                fontsize=12,
            )
    ax.set(title=title, xlabel=col_label, ylabel=row_label)
    fig.colorbar(image, ax=ax, label=value_label)
    return _save(fig, path)


def matrix_heatmap(
    path: Path,
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
) -> Path:
    """A square-ish matrix (e.g. cosines between layers) on a diverging scale.

    Values are printed in the cells when ``annotate`` (default: up to 12x12).
    """
    n_r, n_c = len(rows), len(cols)
    fig, ax = plt.subplots(
        figsize=(min(14, max(7.0, 0.45 * n_c + 3.5)), min(12, max(4.5, 0.4 * n_r + 2.5)))
    )
    image = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    crowded = sum(len(str(c)) for c in cols) > 50
    ax.set_xticks(
        range(n_c),
        list(cols),
        rotation=90 if n_c > 12 else 35 if crowded else 0,
        ha="right" if crowded and n_c <= 12 else "center",
    )
    ax.set_yticks(range(n_r), list(rows))
    if annotate if annotate is not None else max(n_r, n_c) <= 12:
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                dark = (
                    abs(v) > 0.6 * max(abs(vmin), abs(vmax))
                    if cmap == "RdBu_r"
                    else v < (vmin + vmax) / 2
                )
                ax.text(
                    j,
                    i,
                    value_format.format(v),
                    ha="center",
                    va="center",
                    fontsize=9,
                    color="white" if dark else "black",
                )
    ax.set(title=title, xlabel=col_label, ylabel=row_label)
    fig.colorbar(image, ax=ax, label=value_label)
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
