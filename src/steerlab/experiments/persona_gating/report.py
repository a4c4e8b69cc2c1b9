"""The persona-gating report: figures, findings, tables, samples, provenance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import steerlab.reporting.plots as plots
from steerlab.experiments.config import PersonaGatingConfig
from steerlab.experiments.framework import Results
from steerlab.experiments.reporting import (
    JUDGE_COLUMNS,
    cohens_d_lines,
    layer_alpha_grid,
    layer_lines,
    refusal_bars,
    write_experiment_report,
)
from steerlab.experiments.store import ResponseStore
from steerlab.experiments.summary import Entry
from steerlab.experiments.timings import Cost, cost_parts
from steerlab.reporting.report import Figure, Table

MAIN = ("baseline", "persona_system_prompt", "persona_steer", "random_steer", "refusal_ablate",
        "refusal_readd_early", "refusal_readd_late", "persona_project_late",
        "persona_project_early", "random_project_late")
RESTORING = ("refusal_readd_early", "refusal_readd_late", "persona_project_late",
             "persona_project_early", "random_project_late")
SHARE_KEYS = ["restored_share", "restored_share_ci95"]


def write_persona_report(out: Path, results: Results, store: ResponseStore,
                         analysis: dict[str, Any], config: PersonaGatingConfig) -> Path:
    c, sel = results["conditions"], results["selection"]
    figs = out / "figures"
    figures = [_readd_figure(figs, results), *_main_figures(figs, results, analysis),
               _grid_figure(figs, sel)]
    b, s = c["baseline"], c["persona_steer"]
    return write_experiment_report(
        out, results, store, config,
        title="steerlab: persona gates refusal (arXiv 2606.26161) — reproduction",
        summary=f"Model {results['model']} (fingerprint {results['fingerprint']}), "
        f"{results['n_eval']} evaluation prompts from {results['eval_prompts']}, greedy "
        f"{config.max_new_tokens} new tokens. Baseline refusal {b['refusal_rate']:.0%}; "
        f"with the compliant-persona direction (layer {sel['layer']}, x{sel['alpha']:g}, "
        f"chosen on validation) {s['refusal_rate']:.0%}. Refusal is scored by substring "
        "with a degeneracy check (refusal / bypass / degenerate). " + _refusal_line(results),
        tables=_tables(results, config),
        figures=figures,
        show=["baseline", "persona_system_prompt", "persona_steer", "random_steer/s0",
              "refusal_ablate",
              f"refusal_readd/L{c.get('refusal_readd_late', {}).get('layer')}",
              "persona_project_late", "persona_project_early"],
    )


def _refusal_line(results: Results) -> str:
    """Which refusal direction was ablated and re-added, and what its ablation leaves."""
    used = results.get("refusal_direction")
    if used is None:  # results written before this was recorded
        return ""
    where = (f"given from {used['folder']} ({used['name']}, best layer {used['layer']})"
             if used["source"] == "given" else f"selected at layer {used['layer']}")
    return (f"Refusal direction: {where}; ablating it leaves "
            f"{used['ablated_refusal_rate']:.0%} refusal (refusal_ablate).")


def _readd(results: Results) -> tuple[list[tuple[int, Entry]], list[Entry | None]]:
    """The re-add layers' entries, and the same re-adds on the harmless prompts (or None)."""
    readd = sorted((int(k.split("/L")[1]), v) for k, v in results["conditions"].items()
                   if k.startswith("refusal_readd/L"))
    return readd, [results["harmless"].get(f"refusal_readd/L{k}") for k, _ in readd]


def _readd_figure(figs: Path, results: Results) -> Figure:
    c, n_layers = results["conditions"], results["provenance"]["model"]["n_layers"]
    readd, on_harmless = _readd(results)
    ran = [h for h in on_harmless if h]
    over_refusal = (  # present when the run also re-added refusal on the harmless prompts
        {"harmless prompts, same re-add (95% CI)": (
            [h["refusal_rate"] for h in ran], [h["refusal_rate_ci95"] for h in ran],
        )}
        if readd and len(ran) == len(readd) else None
    )
    path = plots.rate_by_layer(
        figs / "readd_by_layer.png",
        [k for k, _ in readd],
        [v["refusal_rate"] for _, v in readd],
        [v["refusal_rate_ci95"] for _, v in readd],
        title="Refusal when the refusal direction is re-added while persona-steered",
        ylabel="refusal rate",
        references={name: (c[name]["refusal_rate"], c[name]["refusal_rate_ci95"])
                    for name in ("baseline", "persona_steer")},
        spans={
            "early third": (-0.5, n_layers / 3 - 0.5),
            "late third": (2 * n_layers / 3 - 0.5, n_layers - 0.5),
        },
        label="harmful evaluation prompts (95% CI)",
        more=over_refusal,
    )
    return Figure(
        path,
        "Refusal rate (95% Wilson CI) by the layer where the refusal direction is re-added, "
        "with baseline and persona-steered rates for reference"
        + (", and the same re-add on the harmless prompts (over-refusal)."
           if over_refusal else "."),
    )


def _main_figures(figs: Path, results: Results, analysis: dict[str, Any]) -> list[Figure]:
    c = results["conditions"]
    main = [m for m in MAIN if m in c]
    return [
        refusal_bars(
            figs / "conditions.png", c, main,
            "Refusal rate per condition with 95% Wilson intervals; random conditions pooled "
            "over seeds.",
            title=f"Refusal rate by condition (n={results['n_eval']})",
        ),
        layer_lines(
            figs / "cosine_by_layer.png",
            {"refusal vs compliant persona": analysis["refusal_persona_cosine"],
             **{f"{a} vs persona": v for a, v in analysis["trait_cosine_with_persona"].items()}},
            "Per-layer cosine between the refusal and compliant-persona directions, and between "
            "each relational-trait direction and the compliant-persona direction.",
            title="Cosine similarity by layer", ylabel="cosine",
        ),
        cohens_d_lines(
            figs,
            {"refusal (harmful vs harmless, held-out)": analysis["refusal_cohens_d"],
             "persona (compliant vs cautious, held-out)": analysis["persona_cohens_d"]},
            "Cohen's d of the projection onto each layer's direction on held-out prompts.",
            title="Separability of the projections by layer (Cohen's d)",
        ),
    ]


def _grid_figure(figs: Path, sel: dict[str, Any]) -> Figure:
    layers = sorted({cell["layer"] for cell in sel["cells"]})
    alphas = sorted({cell["alpha"] for cell in sel["cells"]})
    return Figure(
        layer_alpha_grid(
            figs / "selection_grid.png", sel["cells"], layers, alphas, "refusal_rate",
            title=f"Validation refusal rate (n={sel['n_val']}), chosen: layer {sel['layer']}, "
            f"alpha {sel['alpha']:g}",
            col_label="alpha (x raw vector)", value_label="refusal rate",
        ),
        "The persona layer/strength search on the validation split (never the evaluation "
        "prompts).",
    )


def _tables(results: Results, config: PersonaGatingConfig) -> list[Table]:
    c, harmless = results["conditions"], results["harmless"]
    judge_columns = JUDGE_COLUMNS if results.get("judged") else []
    columns = ["condition", "n", "refusal_rate", "refusal_rate_ci95", "bypass_rate",
               "degenerate_rate", "vs_baseline_p", "vs_persona_steer_p", *judge_columns,
               "description"]
    readd, on_harmless = _readd(results)
    harmless_keys = (list(_harmless_columns({}))
                     if readd and all(on_harmless) else [])
    kl_keys = ["kl_first_token", "kl_first_token_ci95"]
    if config.kl_tokens > 1:
        kl_keys.append(f"kl_first_{config.kl_tokens}")
    return [
        Table("Conditions on the evaluation prompts", columns,
              [{"condition": m, **c[m]} for m in MAIN if m in c],
              note="p-values: exact McNemar tests on the same prompts. Random conditions pool "
              "their seeds; each seed is listed below."),
        Table("How much of the persona-induced drop each restoring condition undoes",
              ["condition", "n", "refusal_rate", "vs_persona_steer_p", *SHARE_KEYS],
              [{"condition": m, **c[m]} for m in RESTORING if m in c],
              note="restored_share: (refusal − persona_steer's) / (baseline's − persona_steer's) "
              "on the same prompts; 1 = back at baseline, 0 = no restoration. 95% interval by "
              "resampling prompts, all three conditions' outcomes on a prompt together."),
        Table("Refusal re-added at each layer (persona-steered)",
              [*columns[:-1], *SHARE_KEYS, *harmless_keys],
              [{"condition": f"refusal_readd/L{k}", **v, **_harmless_columns(h)}
               for (k, v), h in zip(readd, on_harmless, strict=True)],
              note="harmless_*: the same condition on the harmless prompts (over-refusal, "
              "McNemar p against the harmless baseline, first-token KL)."
              if harmless_keys else ""),
        Table("Random-direction controls, per seed", columns,
              [{"condition": k, **v} for k, v in c.items() if "/s" in k], note=_seed_note(c)),
        Table("Harmless prompts: over-refusal and KL",
              ["condition", "n", "refusal_rate", "refusal_rate_ci95", "degenerate_rate",
               "vs_baseline_p", *kl_keys, *judge_columns],
              # the re-add layers' harmless results are columns of their own table
              [{"condition": k, **v} for k, v in harmless.items()
               if not k.startswith("refusal_readd/")]),
        Table("Validation grid (persona layer x strength)",
              ["layer", "alpha", "n", "refusal_rate", "refusal_rate_ci95", "degenerate_rate"],
              results["selection"]["cells"], note=results["selection"]["rule"]),
        *_readd_selection_table(results.get("readd_selection", {})),
        *([_cost_table(results["cost"])] if "cost" in results else []),
    ]


def _readd_selection_table(readd_sel: dict[str, Any]) -> list[Table]:
    if not readd_sel.get("cells"):
        return []
    return [Table(
        "Validation choice of the re-add strength (persona-steered, refusal re-added at "
        f"layer {readd_sel['probe_layer']}; validation baseline refusal "
        f"{readd_sel['val_baseline_refusal_rate']:.2f})",
        ["alpha", "n", "refusal_rate", "refusal_rate_ci95", "degenerate_rate"],
        readd_sel["cells"],
        note=f"{readd_sel['rule']}: alpha {readd_sel['alpha']:g}",
    )]


def _seed_note(c: dict[str, Entry]) -> str:
    return "; ".join(
        f"{group}: mean {g['seed_mean']:.0%}, sd {g['seed_sd']:.0%}, range "
        f"{g['seed_min']:.0%}–{g['seed_max']:.0%}, seed-mean 95% bootstrap CI "
        f"[{g['seed_mean_ci95'][0]:.0%}, {g['seed_mean_ci95'][1]:.0%}]"
        for group in ("random_steer", "random_project_late") if (g := c.get(group))
    )


def _cost_table(cost: Cost) -> Table:
    """Where the run's time went, one part per row, in passes and seconds."""
    base = cost["baseline_pass_seconds"]
    verdict = "within" if cost["within_budget"] else "over"
    return Table(
        "Cost",
        ["part", "passes", "seconds"],
        [{"part": name, "passes": passes, "seconds": passes * base}
         for name, passes in cost_parts(cost)],
        note=f"In units of one unhooked generation pass over the evaluation prompts "
        f"({base:.1f} s); the run is {verdict} budget.",
    )


def _harmless_columns(entry: dict[str, Any] | None) -> dict[str, Any]:
    """A condition's harmless-prompt results as ``harmless_*`` columns (None: not run)."""
    entry = entry or {}
    return {
        f"harmless_{key}": entry.get(key)
        for key in ("refusal_rate", "refusal_rate_ci95", "vs_baseline_p", "kl_first_token")
    }
