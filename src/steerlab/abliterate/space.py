"""The search space: what one trial chooses, and how its choice becomes a spec.

Parameters (all relative to the model's depth, so one space fits any model):

- ``position``: which candidate direction (token position it was read at);
- ``source``: the fractional layer its vector is interpolated at;
- for ``attn`` and ``mlp`` separately: ``peak`` weight, ``center`` layer,
  ``width`` in layers and ``floor`` as a fraction of the peak;
- ``rank`` of the removed subspace, when ``max_rank > 1``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from steerlab.directions.artifact import Direction
from steerlab.interventions.kernel_ablate import KERNEL_SITES, Kernel, KernelAblate

SOURCE_RANGE = (0.15, 0.9)
"""Fraction of the depth the direction's source layer is searched in (it covers the layers
plain selection tries, so its choice can be a trial)."""
CENTER_RANGE = (0.2, 1.0)
PEAK_RANGE = (0.4, 1.5)
WIDTH_RANGE = (0.05, 0.7)
"""Kernel width as a fraction of the depth (at least one layer)."""


class TrialLike(Protocol):
    """The part of ``optuna.Trial`` the space uses (a ``FrozenTrial`` replay works too)."""

    def suggest_float(self, name: str, low: float, high: float) -> float: ...
    def suggest_int(self, name: str, low: int, high: int) -> int: ...
    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any: ...


def suggest(trial: TrialLike, n_layers: int, positions: Sequence[str],
            max_rank: int = 1) -> dict[str, Any]:
    """Draw one trial's parameters."""
    last = n_layers - 1
    params: dict[str, Any] = {
        "position": trial.suggest_categorical("position", list(positions)),
        "source": trial.suggest_float("source", SOURCE_RANGE[0] * last, SOURCE_RANGE[1] * last),
    }
    for site in KERNEL_SITES:
        params[f"{site}_peak"] = trial.suggest_float(f"{site}_peak", *PEAK_RANGE)
        params[f"{site}_center"] = trial.suggest_float(
            f"{site}_center", CENTER_RANGE[0] * last, CENTER_RANGE[1] * last)
        params[f"{site}_width"] = trial.suggest_float(
            f"{site}_width", max(1.0, WIDTH_RANGE[0] * last), max(1.0, WIDTH_RANGE[1] * last))
        params[f"{site}_floor"] = trial.suggest_float(f"{site}_floor", 0.0, 1.0)
    params["rank"] = trial.suggest_int("rank", 1, max_rank) if max_rank > 1 else 1
    return params


def kernel(params: Mapping[str, Any], site: str) -> Kernel:
    """The ``site`` kernel of a trial's parameters (floor = fraction × peak)."""
    peak = float(params[f"{site}_peak"])
    return Kernel(peak=peak, center=float(params[f"{site}_center"]),
                  width=float(params[f"{site}_width"]),
                  floor=float(params[f"{site}_floor"]) * peak)


def to_spec(params: Mapping[str, Any], direction: Direction | str) -> KernelAblate:
    """The intervention one trial applies."""
    return KernelAblate(direction, float(params["source"]), kernel(params, "attn"),
                        kernel(params, "mlp"), rank=int(params.get("rank", 1)))


__all__ = ["TrialLike", "kernel", "suggest", "to_spec"]
