"""How well a direction separates two prompt sets, layer by layer: Cohen's d of the
projections, held-out probe accuracy, and the cross-layer cosine matrix; and stamping the
layer of largest held-out d into a direction's metadata."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from steerlab.activations.record import ActivationStats, Progress, project_activations
from steerlab.directions.artifact import Direction
from steerlab.errors import DataError
from steerlab.evaluate.stats import wilson_ci
from steerlab.model.loading import LoadedModel


def effect_sizes(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Cohen's d per column of projections ``[n, L]`` vs ``[m, L]`` (pooled SD)."""
    n, m = pos.shape[0], neg.shape[0]
    if n < 2 or m < 2:
        raise DataError(f"Cohen's d needs at least 2 prompts per side; got {n} and {m}.")
    pooled = ((n - 1) * pos.var(dim=0) + (m - 1) * neg.var(dim=0)) / (n + m - 2)
    return (pos.mean(dim=0) - neg.mean(dim=0)) / pooled.sqrt().clamp_min(1e-12)


def cohens_d(
    lm: LoadedModel,
    direction: Direction,
    positive: Any,
    negative: Any,
    *,
    position: str = "last",
    system_positive: str | Sequence[str | None] | None = None,
    system_negative: str | Sequence[str | None] | None = None,
    batch_size: int = 32,
    progress: Progress | None = None,
) -> dict[int, float]:
    """Per-layer Cohen's d of the projection on the direction's unit vectors.

    Use held-out prompts: on the extraction prompts d is optimistic.
    """
    common: dict[str, Any] = dict(position=position, batch_size=batch_size, progress=progress)
    pos = project_activations(lm, positive, direction, system=system_positive, **common)
    neg = project_activations(lm, negative, direction, system=system_negative, **common)
    d = effect_sizes(pos, neg)
    return {layer: float(d[i]) for i, layer in enumerate(direction.layers)}


def with_best_layer(direction: Direction, d: dict[int, float], how: str, *,
                    best: int | None = None, **extra: Any) -> Direction:
    """``direction`` with ``best_layer`` (default: largest ``d``), the per-layer ``d`` as
    ``extra["cohens_d"]``, the rule that chose it as ``extra["best_layer_by"]``, and ``extra``."""
    chosen = max(d, key=lambda layer: d[layer]) if best is None else best
    meta = dataclasses.replace(direction.meta, best_layer=chosen, extra={
        **direction.meta.extra, "cohens_d": {str(k): v for k, v in d.items()},
        "best_layer_by": how, **extra})
    return Direction(direction.vectors, direction.layers, meta)


@dataclass
class Probe:
    """A standardizing logistic-regression probe for one layer."""

    coef_: Any
    center_: Any
    scale_: Any
    model: Any

    def predict(self, x: Any) -> Any:
        return self.model.predict((x - self.center_) / self.scale_)


def fit_probe(x: Any, y: Sequence[int], *, c: float = 1.0, seed: int = 0) -> Probe:
    """Fit ``LogisticRegression`` on standardized ``x`` [n, d] (numpy) with labels ``y``."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression  # slow to import: only when used

    center = x.mean(axis=0)
    scale = x.std(axis=0)
    scale = np.where(scale > 1e-8, scale, 1.0)
    model = LogisticRegression(C=c, max_iter=2000, random_state=seed)
    model.fit((x - center) / scale, np.asarray(y))
    return Probe(model.coef_, center, scale, model)


def probe_accuracies(
    train_pos: ActivationStats, train_neg: ActivationStats,
    test_pos: ActivationStats, test_neg: ActivationStats,
) -> dict[int, dict[str, Any]]:
    """Held-out accuracy of a logistic probe per layer: ``{layer: {accuracy, n, ci95}}``."""
    for stats in (train_pos, train_neg, test_pos, test_neg):
        if stats.raw is None:
            raise DataError("Probe accuracy needs per-prompt activations (keep_raw=True).")
    out = {}
    for row, layer in enumerate(train_pos.layers):
        x = torch.cat([train_pos.raw[:, row], train_neg.raw[:, row]]).double().numpy()  # type: ignore[index]
        probe = fit_probe(x, [1] * train_pos.count + [0] * train_neg.count)
        x_test = torch.cat([test_pos.raw[:, row], test_neg.raw[:, row]]).double().numpy()  # type: ignore[index]
        y_test = [1] * test_pos.count + [0] * test_neg.count
        correct = int(sum(int(a == b) for a, b in zip(probe.predict(x_test), y_test, strict=True)))
        n = len(y_test)
        lo, hi = wilson_ci(correct, n)
        out[layer] = {"accuracy": correct / n, "n": n, "k": correct, "ci95": [lo, hi]}
    return out


def cosine_matrix(direction: Direction) -> torch.Tensor:
    """``[L, L]`` cosine similarity between the direction's vectors on every pair of layers."""
    units = direction.unit().vectors.double()
    return (units @ units.T).clamp(-1.0, 1.0)
