"""A layer × strength grid of any steering spec: refusal, a coherence proxy
(degenerate rate) and KL on harmless prompts per cell, with heatmaps.

The spec is a template in the compact steer form with ``{layer}`` and
``{alpha}`` placeholders, e.g. ``add:runs/persona@{layer}:{alpha}``. Fixed
specs (``steer``, e.g. an abliterate run's ``spec.json``) go under every cell
and the baseline, so a grid can be swept on an edited model; KL stays against
the unsteered model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steerlab.errors import InterventionError
from steerlab.experiments.measure import kl_conditions
from steerlab.experiments.reporting import layer_alpha_grid, write_report
from steerlab.experiments.runner import Condition, Job, Runner
from steerlab.experiments.summary import condition_summary, paired_p
from steerlab.interventions.specs import Spec, parse_steer, spec_to_dict, specs_to_json
from steerlab.interventions.steering import check_specs
from steerlab.reporting.report import Figure, Table
from steerlab.store.atomic import write_json
from steerlab.store.provenance import provenance

if TYPE_CHECKING:
    from steerlab.model.loading import LoadedModel
    from steerlab.prompts.sets import PromptSet


def fixed_steering(specs: Sequence[Spec]) -> dict[str, Any] | None:
    """What the fixed specs are, for the run identity and results: their ops and a hash of
    their JSON (inline directions included), not the vectors themselves."""
    if not specs:
        return None
    text = specs_to_json(list(specs), indent=None)
    return {"ops": [spec_to_dict(s)["op"] for s in specs],
            "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]}


def run_sweep(
    lm: LoadedModel,
    out_dir: str | Path,
    *,
    template: str,
    layers: Sequence[int],
    alphas: Sequence[float],
    prompts: PromptSet,
    harmless: PromptSet | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 128,
    kl_tokens: int = 4,
    show_progress: bool = True,
    steer: Sequence[Spec] = (),
) -> dict[str, Any]:
    """Run the grid (resumable in ``out_dir``) and write results.json and the report."""
    if "{layer}" not in template or "{alpha}" not in template:
        raise InterventionError(
            f"Sweep template {template!r} needs both {{layer}} and {{alpha}} placeholders, e.g. "
            "'add:runs/persona@{layer}:{alpha}'."
        )
    grid = [(layer, alpha) for layer in layers for alpha in alphas]
    fixed = tuple(steer)
    conds = [
        Condition(f"L{layer}_a{alpha:g}",
                  fixed + tuple(parse_steer(template.format(layer=layer, alpha=alpha))))
        for layer, alpha in grid
    ]
    for cond in conds:  # a bad cell fails here, before the baseline is generated
        check_specs(lm, cond.specs)
    # Cells are named by layer and alpha: the grid may grow on resume, the template not.
    settings: dict[str, Any] = {"template": template, "max_new_tokens": max_new_tokens}
    steer_info = fixed_steering(fixed)
    if steer_info:
        settings["steer"] = steer_info
    out = Path(out_dir)
    cells: list[dict[str, Any]] = []
    with Runner(
        lm,
        out,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        show_progress=show_progress,
        settings=settings,
    ) as run:
        run.plan((len(layers) * len(alphas) + 1) * len(prompts))
        base = run.run(Condition("baseline", fixed), prompts)
        # The cells share generation batches: a decode step's cost grows slowly with rows.
        grid_rows = run.run_many([Job(c, prompts) for c in conds])
        # KL of every cell not cached yet, against one shared baseline pass.
        kl = kl_conditions(run, harmless, conds, k=kl_tokens) if harmless is not None else {}
        for (layer, alpha), cond, rows in zip(grid, conds, grid_rows, strict=True):
            cell = {"layer": layer, "alpha": alpha, **condition_summary(rows),
                    "vs_baseline_p": paired_p(rows, base)}
            if harmless is not None:
                cell[f"kl_first_{kl_tokens}"] = kl[cond.name][f"kl_first_{kl_tokens}"]
            cells.append(cell)
    results = {
        "model": lm.name,
        "fingerprint": lm.fingerprint,
        "template": template,
        "steer": steer_info,
        "n": len(prompts),
        "prompts": prompts.name,
        "baseline": condition_summary(base),
        "cells": cells,
        "provenance": provenance(
            lm,
            config={
                "template": template,
                "steer": steer_info,
                "layers": list(layers),
                "alphas": list(alphas),
                "max_new_tokens": max_new_tokens,
            },
        ),
    }
    write_json(out / "results.json", results)
    _report(out, results, layers, alphas, kl_tokens if harmless is not None else None)
    return results


def _report(
    out: Path,
    results: dict[str, Any],
    layers: Sequence[int],
    alphas: Sequence[float],
    kl_tokens: int | None,
) -> None:
    cells = results["cells"]
    figs = [
        Figure(
            layer_alpha_grid(
                out / "figures" / f"{key}.png", cells, layers, alphas, key,
                title=title, col_label="alpha", value_label=key,
            ),
            title,
        )
        for key, title in (
            ("refusal_rate", "Refusal rate"),
            ("degenerate_rate", "Degenerate rate (coherence proxy)"),
        )
    ]
    columns = [
        "layer",
        "alpha",
        "n",
        "refusal_rate",
        "refusal_rate_ci95",
        "degenerate_rate",
        "vs_baseline_p",
    ]
    if kl_tokens is not None:
        columns.append(f"kl_first_{kl_tokens}")
    b = results["baseline"]
    write_report(
        out,
        results,
        title=f"steerlab sweep: {results['template']}",
        summary=f"Model {results['model']}, {results['n']} prompts from {results['prompts']}; "
        f"baseline refusal {b['refusal_rate']:.0%} {b['refusal_rate_ci95']}"
        + (f" (baseline and every cell under the fixed steering "
           f"{' + '.join(results['steer']['ops'])}, sha256 {results['steer']['sha256']})"
           if results["steer"] else "") + ".",
        tables=[Table("Grid", columns, cells, note="p: exact McNemar vs baseline.")],
        figures=figs,
    )
