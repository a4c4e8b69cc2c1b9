"""PNG plots of layer analyses, readable without zooming (large fonts, Agg backend).

Each function writes one PNG atomically and returns its path;
:func:`save_scan_plots` writes every plot a :class:`~steerlab.analysis.ScanResult` supports.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steerlab._atomic import atomic_open

if TYPE_CHECKING:
    from steerlab.analysis import ScanResult

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


@contextmanager
def _figure(path: str | Path, width: float = 10, height: float = 6) -> Iterator[tuple[Any, Any]]:
    """A figure with steerlab's style (the user's global rcParams are left alone),
    written to ``path`` atomically when the block ends."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    with plt.rc_context(STYLE):  # type: ignore[arg-type]
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


def _mark_best(ax: Any, best: int | None) -> None:
    if best is not None:
        ax.axvline(best, color="0.5", linestyle=":", linewidth=2, label=f"best layer {best}")


def plot_cohens_d(cohens_d: Mapping[int, float], path: str | Path, *,
                  best_layer: int | None = None, title: str = "Separation by layer") -> Path:
    """Cohen's d of the held-out projection per layer."""
    with _figure(path) as (_fig, ax):
        layers = sorted(cohens_d)
        ax.plot(layers, [cohens_d[i] for i in layers], marker="o", color="tab:blue")
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
        layers = sorted(cosines)
        ax.plot(layers, [cosines[i] for i in layers], marker="o", color="tab:purple")
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
