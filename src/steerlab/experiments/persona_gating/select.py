"""Choosing the persona layer and strength, and the refusal re-add strength, on the
validation split only (never the evaluation prompts)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypedDict

from steerlab.directions.artifact import Direction
from steerlab.experiments.config import PersonaGatingConfig
from steerlab.experiments.runner import Condition, Job, Runner
from steerlab.experiments.summary import Entry, condition_summary
from steerlab.interventions.specs import Add
from steerlab.prompts.sets import PromptSet


class Selection(TypedDict):
    """The validation grid and the (layer, alpha) cell chosen from it."""

    layer: int
    alpha: float
    cells: list[Entry]
    rule: str
    n_val: int
    val_prompts: str


class ReaddSelection(TypedDict, total=False):
    """The refusal re-add strength and the validation cells it was chosen from."""

    alpha: float
    probe_layer: int
    val_baseline_refusal_rate: float
    cells: list[Entry]
    rule: str
    n_val: int


def grid(n_layers: int, config: PersonaGatingConfig) -> list[tuple[int, float]]:
    layers = sorted(
        {min(n_layers - 1, max(0, round(f * n_layers))) for f in config.steer_layer_fractions}
    )
    return [(layer, alpha) for layer in layers for alpha in config.alphas]


def select(run: Runner, val_set: PromptSet, persona: Direction,
           cells_grid: Sequence[tuple[int, float]], config: PersonaGatingConfig) -> Selection:
    """Pick the persona layer and strength on the validation split (see :func:`choose_cell`)."""
    conds = [
        Condition(f"val/persona_L{layer}_a{alpha:g}", (Add(persona, alpha=alpha, layers=[layer]),))
        for layer, alpha in cells_grid
    ]
    rows = run.run_many([Job(c, val_set, "val") for c in conds])
    cells: list[Entry] = [
        {"layer": layer, "alpha": alpha, **condition_summary(r)}
        for (layer, alpha), r in zip(cells_grid, rows, strict=True)
    ]
    best = choose_cell(cells, config.max_degenerate_rate, config.val_tolerance, len(val_set))
    return Selection(
        layer=best["layer"],
        alpha=best["alpha"],
        cells=cells,
        rule=f"smallest strength whose validation refusal rate is within {config.val_tolerance} "
        f"of {len(val_set)} prompts of the lowest, among cells with degenerate rate <= "
        f"{config.max_degenerate_rate}; then lower refusal, then earlier layer",
        n_val=len(val_set),
        val_prompts=f"{config.val_prompts} ({config.val_split})",
    )


def choose_cell(cells: Sequence[dict[str, Any]], max_degenerate_rate: float, tolerance: int,
                n_val: int) -> dict[str, Any]:
    """The grid cell to steer with: among coherent cells (all, when none is), those whose
    refusal rate is within ``tolerance`` of ``n_val`` prompts of the lowest count as tied,
    and the smallest strength among them wins (then lower refusal, then earlier layer)."""
    ok = [c for c in cells if c["degenerate_rate"] <= max_degenerate_rate] or list(cells)
    lowest = min(c["refusal_rate"] for c in ok)
    slack = (tolerance + 0.5) / max(n_val, 1)  # counts are whole prompts: half a prompt spare
    near = [c for c in ok if c["refusal_rate"] <= lowest + slack]
    return min(near, key=lambda c: (c["alpha"], c["refusal_rate"], c["layer"]))


def select_readd(run: Runner, val_set: PromptSet, refusal: Direction, persona: Direction,
                 layer: int, alpha: float, config: PersonaGatingConfig) -> ReaddSelection:
    """Pick the refusal re-add strength on the validation split, blind to the evaluation.

    While persona-steered, the refusal direction is re-added at the layer at 75% of
    depth with each strength of ``readd_alphas``; the smallest whose validation refusal
    rate reaches the unsteered validation baseline's, among coherent cells, is used at
    every re-add layer (early ones too, so the early/late comparison is at equal
    strength). If none reaches it, the coherent cell with the most refusal is taken.
    A fixed ``readd_alpha`` in the config skips the search.
    """
    if config.readd_alpha is not None:
        return ReaddSelection(alpha=config.readd_alpha, rule="fixed by the config", cells=[])
    probe = min(run.lm.n_layers - 1, round(0.75 * run.lm.n_layers))
    steer = Add(persona, alpha=alpha, layers=[layer])
    alphas = sorted(config.readd_alphas)
    conds = [Condition("val/baseline")] + [
        Condition(f"val/readd_L{probe}_a{a:g}", (steer, Add(refusal, alpha=a, layers=[probe])))
        for a in alphas
    ]
    rows = run.run_many([Job(c, val_set, "val") for c in conds])
    base = condition_summary(rows[0])
    cells: list[Entry] = [{"alpha": a, **condition_summary(r)}
                          for a, r in zip(alphas, rows[1:], strict=True)]
    ok = [c for c in cells if c["degenerate_rate"] <= config.max_degenerate_rate] or cells
    restoring = [c for c in ok if c["refusal_rate"] >= base["refusal_rate"]]
    best = restoring[0] if restoring else max(ok, key=lambda c: (c["refusal_rate"], -c["alpha"]))
    return ReaddSelection(
        alpha=best["alpha"],
        probe_layer=probe,
        val_baseline_refusal_rate=base["refusal_rate"],
        cells=cells,
        rule="smallest strength whose validation refusal (persona-steered, refusal re-added "
        f"at layer {probe}) reaches the validation baseline's, degenerate rate <= "
        f"{config.max_degenerate_rate}"
        + ("" if restoring else "; none reached it, so the one with the most refusal"),
        n_val=len(val_set),
    )
