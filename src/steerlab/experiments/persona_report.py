"""The persona-gating report: figures, findings table, samples, provenance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from steerlab import plots
from steerlab.experiments.common import JUDGE_COLUMNS
from steerlab.experiments.common import samples as common_samples
from steerlab.experiments.config import PersonaGatingConfig
from steerlab.experiments.persona_gating import cost_parts
from steerlab.experiments.store import ResponseStore
from steerlab.report import Figure, Finding, Report, Table

MAIN = (
    "baseline",
    "persona_system_prompt",
    "persona_steer",
    "random_steer",
    "refusal_ablate",
    "refusal_readd_early",
    "refusal_readd_late",
    "persona_project_late",
    "persona_project_early",
    "random_project_late",
)


def write_persona_report(
    out: Path,
    results: dict[str, Any],
    store: ResponseStore,
    analysis: dict[str, Any],
    config: PersonaGatingConfig,
) -> Path:
    c = results["conditions"]
    figs = out / "figures"
    readd = sorted(
        (int(k.split("/L")[1]), v) for k, v in c.items() if k.startswith("refusal_readd/L")
    )
    n_layers = results["provenance"]["model"]["n_layers"]
    harmless = results["harmless"]
    harmless_readd = [harmless.get(f"refusal_readd/L{k}") for k, _ in readd]
    ran = [h for h in harmless_readd if h]
    over_refusal = (  # present when the run also re-added refusal on the harmless prompts
        {"harmless prompts, same re-add (95% CI)": (
            [h["refusal_rate"] for h in ran], [h["refusal_rate_ci95"] for h in ran],
        )}
        if readd and len(ran) == len(readd) else None
    )
    figures_ = [
        Figure(
            plots.rate_by_layer(
                figs / "readd_by_layer.png",
                [k for k, _ in readd],
                [v["refusal_rate"] for _, v in readd],
                [v["refusal_rate_ci95"] for _, v in readd],
                title="Refusal when the refusal direction is re-added while persona-steered",
                ylabel="refusal rate",
                references={
                    "baseline": (c["baseline"]["refusal_rate"], c["baseline"]["refusal_rate_ci95"]),
                    "persona_steer": (
                        c["persona_steer"]["refusal_rate"],
                        c["persona_steer"]["refusal_rate_ci95"],
                    ),
                },
                spans={
                    "early third": (-0.5, n_layers / 3 - 0.5),
                    "late third": (2 * n_layers / 3 - 0.5, n_layers - 0.5),
                },
                label="harmful evaluation prompts (95% CI)",
                more=over_refusal,
            ),
            "Refusal rate (95% Wilson CI) by the layer where the refusal direction is re-added, "
            "with baseline and persona-steered rates for reference"
            + (", and the same re-add on the harmless prompts (over-refusal)."
               if over_refusal else "."),
        ),
        Figure(
            plots.bars_with_ci(
                figs / "conditions.png",
                [m for m in MAIN if m in c],
                [c[m]["refusal_rate"] for m in MAIN if m in c],
                [c[m]["refusal_rate_ci95"] for m in MAIN if m in c],
                title=f"Refusal rate by condition (n={results['n_eval']})",
                ylabel="refusal rate",
            ),
            "Refusal rate per condition with 95% Wilson intervals; random conditions pooled "
            "over seeds.",
        ),
        Figure(
            plots.lines_by_layer(
                figs / "cosine_by_layer.png",
                {
                    "refusal vs compliant persona": analysis["refusal_persona_cosine"],
                    **{
                        f"{a} vs persona": v
                        for a, v in analysis["trait_cosine_with_persona"].items()
                    },
                },
                title="Cosine similarity by layer",
                ylabel="cosine",
            ),
            "Per-layer cosine between the refusal and compliant-persona directions, and between "
            "each relational-trait direction and the compliant-persona direction.",
        ),
        Figure(
            plots.lines_by_layer(
                figs / "cohens_d_by_layer.png",
                {
                    "refusal (harmful vs harmless, held-out)": analysis["refusal_cohens_d"],
                    "persona (compliant vs cautious, held-out)": analysis["persona_cohens_d"],
                },
                title="Separability of the projections by layer (Cohen's d)",
                ylabel="Cohen's d",
            ),
            "Cohen's d of the projection onto each layer's direction on held-out prompts.",
        ),
    ]
    sel = results["selection"]
    layers = sorted({cell["layer"] for cell in sel["cells"]})
    alphas = sorted({cell["alpha"] for cell in sel["cells"]})
    grid = [
        [
            next(x["refusal_rate"] for x in sel["cells"] if x["layer"] == la and x["alpha"] == al)
            for al in alphas
        ]
        for la in layers
    ]
    figures_.append(
        Figure(
            plots.grid_heatmap(
                figs / "selection_grid.png",
                layers,
                alphas,
                grid,
                title=f"Validation refusal rate (n={sel['n_val']}), chosen: layer {sel['layer']}, "
                f"alpha {sel['alpha']:g}",
                row_label="layer",
                col_label="alpha (x raw vector)",
                value_label="refusal rate",
            ),
            "The persona layer/strength search on the validation split (never the evaluation "
            "prompts).",
        )
    )

    # Judged compliance and coherence, when the run had a judge (--judge URL).
    judge_columns = JUDGE_COLUMNS if results.get("judged") else []
    columns = [
        "condition",
        "n",
        "refusal_rate",
        "refusal_rate_ci95",
        "bypass_rate",
        "degenerate_rate",
        "vs_baseline_p",
        "vs_persona_steer_p",
        *judge_columns,
        "description",
    ]
    share_keys = ["restored_share", "restored_share_ci95"]
    restoring = ["refusal_readd_early", "refusal_readd_late", "persona_project_late",
                 "persona_project_early", "random_project_late"]
    share_rows = [{"condition": m, **c[m]} for m in restoring if m in c]
    main_rows = [{"condition": m, **c[m]} for m in MAIN if m in c]
    readd_rows = [
        {"condition": f"refusal_readd/L{k}", **v, **_harmless_columns(h)}
        for (k, v), h in zip(readd, harmless_readd, strict=True)
    ]
    seed_rows = [{"condition": k, **v} for k, v in c.items() if "/s" in k]
    harmless_rows = [  # the re-add layers' harmless results are columns of their own table
        {"condition": k, **v} for k, v in harmless.items() if not k.startswith("refusal_readd/")
    ]
    harmless_keys = list(_harmless_columns({})) if over_refusal else []
    kl_keys = ["kl_first_token", "kl_first_token_ci95"]
    if config.kl_tokens > 1:
        kl_keys.append(f"kl_first_{config.kl_tokens}")
    tables = [
        Table(
            "Conditions on the evaluation prompts",
            columns,
            main_rows,
            note="p-values: exact McNemar tests on the same prompts. Random conditions pool "
            "their seeds; each seed is listed below.",
        ),
        Table(
            "How much of the persona-induced drop each restoring condition undoes",
            ["condition", "n", "refusal_rate", "vs_persona_steer_p", *share_keys],
            share_rows,
            note="restored_share: (refusal − persona_steer's) / (baseline's − persona_steer's) "
            "on the same prompts; 1 = back at baseline, 0 = no restoration. 95% interval by "
            "resampling prompts, all three conditions' outcomes on a prompt together.",
        ),
        Table(
            "Refusal re-added at each layer (persona-steered)",
            [*columns[:-1], *share_keys, *harmless_keys],
            readd_rows,
            note="harmless_*: the same condition on the harmless prompts (over-refusal, "
            "McNemar p against the harmless baseline, first-token KL)." if harmless_keys else "",
        ),
        Table("Random-direction controls, per seed", columns, seed_rows, note=_seed_note(c)),
        Table(
            "Harmless prompts: over-refusal and KL",
            [
                "condition",
                "n",
                "refusal_rate",
                "refusal_rate_ci95",
                "degenerate_rate",
                "vs_baseline_p",
                *kl_keys,
                *judge_columns,
            ],
            harmless_rows,
        ),
        Table(
            "Validation grid (persona layer x strength)",
            ["layer", "alpha", "n", "refusal_rate", "refusal_rate_ci95", "degenerate_rate"],
            sel["cells"],
            note=sel["rule"],
        ),
    ]
    readd_sel = results.get("readd_selection", {})
    if readd_sel.get("cells"):
        tables.append(
            Table(
                "Validation choice of the re-add strength (persona-steered, refusal re-added at "
                f"layer {readd_sel['probe_layer']}; validation baseline refusal "
                f"{readd_sel['val_baseline_refusal_rate']:.2f})",
                ["alpha", "n", "refusal_rate", "refusal_rate_ci95", "degenerate_rate"],
                readd_sel["cells"],
                note=f"{readd_sel['rule']}: alpha {readd_sel['alpha']:g}",
            )
        )
    if "cost" in results:
        tables.append(_cost_table(results["cost"]))
    samples = common_samples(
        store,
        [
            "baseline",
            "persona_system_prompt",
            "persona_steer",
            "random_steer/s0",
            "refusal_ablate",
            f"refusal_readd/L{c.get('refusal_readd_late', {}).get('layer')}",
            "persona_project_late",
            "persona_project_early",
        ],
        config.n_samples,
    )
    b, s = c["baseline"], c["persona_steer"]
    summary = (
        f"Model {results['model']} (fingerprint {results['fingerprint']}), "
        f"{results['n_eval']} evaluation prompts from {results['eval_prompts']}, greedy "
        f"{config.max_new_tokens} new tokens. Baseline refusal {b['refusal_rate']:.0%}; "
        f"with the compliant-persona direction (layer {sel['layer']}, x{sel['alpha']:g}, "
        f"chosen on validation) {s['refusal_rate']:.0%}. Refusal is scored by substring "
        "with a degeneracy check (refusal / bypass / degenerate)."
    )
    report = Report(
        title="steerlab: persona gates refusal (arXiv 2606.26161) — reproduction",
        summary=summary,
        findings=[Finding(**f) for f in results["findings"]],
        tables=tables,
        figures=figures_,
        samples=samples,
        provenance=results["provenance"],
    )
    html_path, _ = report.write(out)
    return html_path


def _seed_note(c: dict[str, Any]) -> str:
    parts = []
    for group in ("random_steer", "random_project_late"):
        if group in c:
            g = c[group]
            parts.append(
                f"{group}: mean {g['seed_mean']:.0%}, sd {g['seed_sd']:.0%}, range "
                f"{g['seed_min']:.0%}–{g['seed_max']:.0%}, seed-mean 95% bootstrap CI "
                f"[{g['seed_mean_ci95'][0]:.0%}, {g['seed_mean_ci95'][1]:.0%}]"
            )
    return "; ".join(parts)


def _cost_table(cost: dict[str, Any]) -> Table:
    """Where the run's time went, one part per row, in passes and seconds."""
    base = cost["baseline_pass_seconds"]
    rows = [
        {"part": name, "passes": passes, "seconds": passes * base}
        for name, passes in cost_parts(cost)
    ]
    verdict = "within" if cost["within_budget"] else "over"
    return Table(
        "Cost",
        ["part", "passes", "seconds"],
        rows,
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
