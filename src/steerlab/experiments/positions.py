"""``steerlab experiment positions``: does the last instruction token (t_inst) carry
harmfulness and the post-instruction template tokens (t_post-inst) the decision
to refuse?

A refusal direction (harmful minus harmless, built-in paired set) is read at
t_inst and at each post-instruction token ``post_inst[k]`` of the chat template
(``steerlab.prompts.chat`` positions). For each: held-out Cohen's d per layer, cosines
with the others, the effect of ablating it (every layer) on refusal of harmful
prompts, and the effect of adding it (at one common layer) on harmless prompts
(induced refusal). Zhao et al. (2025) report that harmfulness is read at t_inst
and the refusal decision at the post-instruction tokens.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

import steerlab.reporting.plots as plots
from steerlab.experiments import common, measure
from steerlab.experiments import framework as fw
from steerlab.experiments import reporting as rp
from steerlab.experiments import summary as sm
from steerlab.experiments.config import RefusalExperimentConfig
from steerlab.experiments.runner import Condition, Job, Runner
from steerlab.interventions.specs import Ablate, Add
from steerlab.prompts.chat import post_instruction_ids
from steerlab.reporting.report import Figure, Table

if TYPE_CHECKING:
    from steerlab.directions.artifact import Direction
    from steerlab.model.loading import LoadedModel
    from steerlab.prompts.sets import PromptSet


class PositionsConfig(RefusalExperimentConfig):
    """Settings of ``steerlab experiment positions``."""

    positions: list[str] | None = None
    """Positions to compare (default: t_inst and every post_inst[k] of the model's chat
    template)."""
    layer: int | None = Field(default=None, ge=0)
    """Common layer whose vectors are ablated and added (default: the best held-out layer of
    the last-token direction)."""
    add_alpha: float = 1.0
    """Added strength, in multiples of each position's raw diff-in-means vector at the
    layer."""
    similar_cosine: float = Field(default=0.5, ge=0, le=1)
    """Directions at least this cosine-similar count as one."""
    separable_d: float = Field(default=0.8, gt=0)
    """Cohen's d counted as 'carries the harmful/harmless distinction'."""


def positions_of(lm: LoadedModel, config: PositionsConfig) -> list[str]:
    """t_inst and each post-instruction token position, or the configured list."""
    if config.positions:
        return list(config.positions)
    n_post = len(post_instruction_ids(lm.tokenizer))
    return ["t_inst", *[f"post_inst[{k}]" for k in range(n_post)]]


def position_labels(lm: LoadedModel, positions: list[str]) -> dict[str, str]:
    """``post_inst[2]`` → ``post_inst[2] '<|im_start|>'`` for tables and plots."""
    tokens = lm.tokenizer.convert_ids_to_tokens(list(post_instruction_ids(lm.tokenizer)))
    out = {}
    for pos in positions:
        if pos.startswith("post_inst[") and pos.endswith("]"):
            k = int(pos[len("post_inst[") : -1])
            out[pos] = f"{pos} {tokens[k]!r}" if -len(tokens) <= k < len(tokens) else pos
        else:
            out[pos] = pos
    return out


def run_positions(
    lm: LoadedModel, out_dir: str | Path, config: PositionsConfig, show_progress: bool = True
) -> fw.Results:
    """Run every step (resuming from ``out_dir``); write results, responses and report."""
    started = time.perf_counter()
    eval_set, harmless = fw.eval_prompts(config), fw.harmless_prompts(config)
    positions = positions_of(lm, config)
    labels = position_labels(lm, positions)
    with fw.open_runner(lm, out_dir, config, show_progress) as run:
        run.plan((len(positions) + 1) * (len(eval_set) + len(harmless)))
        reference = positions[-1]
        # Only the reference position's layer is used (all interventions act there), so
        # only it gets the costly causal selection; the others report their Cohen's d.
        dirs = {
            pos: run.direction(
                _safe(pos),
                lambda p=pos: common.configured_refusal_direction(  # type: ignore[misc]
                    lm,
                    config,
                    position=p,
                    name=f"refusal@{p}",
                    **({} if p == reference else {"selection": "cohens_d"}),
                ),
            )
            for pos in positions
        }
        layer = config.layer if config.layer is not None else common.best_layer(dirs[reference])
        analysis = run.step("analysis", lambda: _analysis(dirs, positions, layer, reference))
        ablate, add = _conditions(dirs, positions, labels, layer, config)
        run.run_many(
            [Job(c, eval_set, "harmful") for c in ablate]
            + [Job(c, harmless, "harmless") for c in add]
        )
        t_ablate = measure.summarise(run, ablate, eval_set, "harmful:baseline")
        t_add = measure.summarise(run, add, harmless, "harmless:baseline")
        judged = measure.add_judge(run, config, [t_ablate, t_add])
        results = fw.base_results(lm, "positions", eval_set, config)
        results.update(
            positions=positions,
            labels=labels,
            layer=layer,
            reference=reference,
            conditions={**t_ablate, **t_add},
            ablate=t_ablate,
            add=t_add,
            analysis=analysis,
            judged=judged,
            n_harmless=len(harmless),
            harmless_prompts=f"{config.harmless_prompts} ({config.harmless_split})",
        )
        results["findings"] = _findings(run, eval_set, harmless, results, config)
        results["summary"] = _summary(results, config)
        fw.finish(run, lm, config, results, started)
    _report(Path(out_dir), results, run, config)
    return results


def _safe(position: str) -> str:
    return "refusal_" + position.replace("[", "_").replace("]", "").replace("-", "m")


def _conditions(
    dirs: dict[str, Direction],
    positions: list[str],
    labels: dict[str, str],
    layer: int,
    config: PositionsConfig,
) -> tuple[list[Condition], list[Condition]]:
    ablate = [Condition("harmful:baseline", description="harmful prompts, no intervention")]
    add = [Condition("harmless:baseline", description="harmless prompts, no intervention")]
    for pos in positions:
        ablate.append(
            Condition(
                f"ablate/{pos}",
                (Ablate(dirs[pos], source_layer=layer),),
                description=f"direction read at {labels[pos]}, layer {layer}, "
                "ablated at every layer (harmful prompts)",
            )
        )
        add.append(
            Condition(
                f"add/{pos}",
                (Add(dirs[pos], alpha=config.add_alpha, layers=[layer]),),
                description=f"{config.add_alpha:g} x the raw direction read at "
                f"{labels[pos]} added at layer {layer} (harmless "
                "prompts)",
            )
        )
    return ablate, add


def _analysis(
    dirs: dict[str, Direction], positions: list[str], layer: int, reference: str
) -> dict[str, Any]:
    """Held-out Cohen's d per position and layer; cosines between positions."""
    ref = dirs[reference]
    return {
        "cohens_d": {
            p: {str(k): v for k, v in common.cohens_d_of(dirs[p]).items()} for p in positions
        },
        "best_layer": {p: common.best_layer(dirs[p]) for p in positions},
        "best_layer_by": {p: dirs[p].meta.extra.get("best_layer_by", "") for p in positions},
        "max_cohens_d": {p: max(common.cohens_d_of(dirs[p]).values()) for p in positions},
        "cohens_d_at_layer": {p: common.cohens_d_of(dirs[p])[layer] for p in positions},
        "cosine_with_reference": {
            p: {str(k): v for k, v in dirs[p].cosine(ref).items()} for p in positions
        },
        "cosine_at_layer": [
            [float(dirs[a].cosine(dirs[b].select([layer]))[layer]) for b in positions]
            for a in positions
        ],
        "norm_at_layer": {p: dirs[p].norms[layer] for p in positions},
    }


def _findings(
    run: Runner,
    eval_set: PromptSet,
    harmless: PromptSet,
    results: dict[str, Any],
    config: PositionsConfig,
) -> list[sm.Finding]:
    a, t_ab, t_add = results["analysis"], results["ablate"], results["add"]
    ref, layer, sig = results["reference"], results["layer"], sm.ALPHA_SIG
    out: list[sm.Finding] = []
    if "t_inst" in results["positions"]:
        d_t = a["max_cohens_d"]["t_inst"]
        separates = d_t >= config.separable_d
        out.append(sm.Finding(
            claim="The last instruction token (t_inst) separates harmful from harmless prompts",
            verdict=sm.verdict(separates, not separates),
            evidence=f"largest held-out Cohen's d at t_inst {d_t:.2f} (layer "
            f"{a['best_layer']['t_inst']}); at {ref} {a['max_cohens_d'][ref]:.2f} "
            f"(layer {a['best_layer'][ref]}); criterion d ≥ {config.separable_d:g}.",
        ))
        for kind, table, prompts, tag, higher in (
            ("add", t_add, harmless, "induces refusal on harmless prompts", True),
            ("ablate", t_ab, eval_set, "removes refusal on harmful prompts", False),
        ):
            post, tin = table[f"{kind}/{ref}"], table[f"{kind}/t_inst"]
            p = sm.paired_p(
                measure.rows_of(run, f"{kind}/{ref}", prompts),
                measure.rows_of(run, f"{kind}/t_inst", prompts),
            )
            more = (
                post["refusal_rate"] > tin["refusal_rate"]
                if higher
                else post["refusal_rate"] < tin["refusal_rate"]
            )
            base = table[next(iter(table))]
            # "not reproduced" needs evidence either way: an effect of one of them, and
            # (for ablation) some refusal to remove; otherwise the run had no power.
            powered = min(post["vs_baseline_p"], tin["vs_baseline_p"]) < sig and (
                higher or base["refusal_rate"] > 0
            )
            verb = "Adding" if kind == "add" else "Ablating"
            out.append(sm.Finding(
                claim=f"{verb} the post-instruction direction {tag} more than the t_inst "
                "direction",
                verdict=sm.verdict(more and p < sig, not more and powered),
                evidence=f"{kind} at layer {layer}: {sm.rate(post, ref)} vs "
                f"{sm.rate(tin, 't_inst')}, McNemar p={p:.3g}; baseline {sm.rate(base)}. "
                f"{ref} is the pre-registered comparison (Arditi et al.'s position).",
            ))
        cos = a["cosine_at_layer"][results["positions"].index("t_inst")][
            results["positions"].index(ref)
        ]
        differ = cos < config.similar_cosine
        out.append(sm.Finding(
            claim="The t_inst and post-instruction directions are different directions",
            verdict=sm.verdict(differ, not differ),
            evidence=f"cosine at layer {layer} between t_inst and {ref}: {cos:.2f} "
            f"(criterion < {config.similar_cosine:g}).",
        ))
    return out


def _summary(results: dict[str, Any], config: PositionsConfig) -> str:
    ab, ad = results["ablate"], results["add"]
    per = "; ".join(
        f"{results['labels'][p]}: ablate {ab[f'ablate/{p}']['refusal_rate']:.0%}, "
        f"add {ad[f'add/{p}']['refusal_rate']:.0%}"
        for p in results["positions"]
    )
    return (
        f"Model {results['model']} (fingerprint {results['fingerprint']}); directions read "
        f"at {len(results['positions'])} positions; interventions at layer {results['layer']}; "
        f"harmful prompts n={results['n_eval']} ({results['eval_prompts']}), harmless prompts "
        f"n={results['n_harmless']} ({results['harmless_prompts']}); greedy "
        f"{config.max_new_tokens} new tokens, substring refusal scoring. Baseline refusal: "
        f"harmful {sm.rate(ab['harmful:baseline'])}, harmless "
        f"{sm.rate(ad['harmless:baseline'])}. Per position (refusal on harmful prompts "
        f"with it ablated / on harmless prompts with it added): {per}."
    )


def _figures(figs: Path, results: fw.Results) -> list[Figure]:
    a, labels, positions = results["analysis"], results["labels"], results["positions"]
    ab, ad = results["ablate"], results["add"]
    return [
        rp.cohens_d_lines(
            figs,
            {labels[p]: a["cohens_d"][p] for p in positions},
            "Cohen's d (held-out paired prompts) of the projection on "
            "the direction read at each position, per layer.",
            title="Held-out Cohen's d of the refusal direction by read position",
        ),
        rp.layer_lines(
            figs / "cosine_with_reference.png",
            {labels[p]: a["cosine_with_reference"][p] for p in positions},
            "Per-layer cosine of each position's direction with the last-token direction.",
            title=f"Cosine with the direction read at {labels[results['reference']]}",
            ylabel="cosine",
        ),
        Figure(
            plots.matrix_heatmap(
                figs / "cosine_at_layer.png",
                [labels[p] for p in positions],
                [labels[p] for p in positions],
                a["cosine_at_layer"],
                title=f"Cosine between positions' directions at layer {results['layer']}",
                row_label="position",
                col_label="position",
                value_label="cosine",
                annotate=True,
            ),
            "Cosine between the directions read at each pair of positions, at the "
            "intervention layer.",
        ),
        rp.refusal_bars(
            figs / "ablate.png", ab, list(ab), "Refusal on harmful prompts (95% Wilson CI).",
            title="Harmful prompts: refusal with each position's direction ablated",
        ),
        rp.refusal_bars(
            figs / "add.png", ad, list(ad), "Refusal on harmless prompts (95% Wilson CI).",
            title="Harmless prompts: refusal induced by adding each position's direction",
        ),
    ]


def _report(out: Path, results: fw.Results, run: Runner, config: PositionsConfig) -> Path:
    a, labels, positions = results["analysis"], results["labels"], results["positions"]
    ab, ad = results["ablate"], results["add"]
    fig_list = _figures(out / "figures", results)
    judged = bool(results["judged"])
    per_pos = [
        {
            "position": labels[p],
            "best_layer": a["best_layer"][p],
            "chosen_by": "ablation (Arditi)"
            if a["best_layer_by"][p].startswith("lowest")
            else "Cohen's d",
            "max_cohens_d": a["max_cohens_d"][p],
            "cohens_d_at_layer": a["cohens_d_at_layer"][p],
            "norm_at_layer": a["norm_at_layer"][p],
            "cosine_with_reference_at_layer": a["cosine_with_reference"][p].get(
                str(results["layer"])
            ),
        }
        for p in positions
    ]
    tables = [
        Table(
            "Directions by read position",
            list(per_pos[0]),
            per_pos,
            note=f"Cohen's d on held-out paired prompts; layer {results['layer']} is where "
            "the interventions act.",
        ),
        rp.condition_table("Harmful prompts: each direction ablated", ab, judged=judged),
        rp.condition_table("Harmless prompts: each direction added", ad, judged=judged),
    ]
    ref = results["reference"]
    return rp.write_experiment_report(
        out, results, run.store, config,
        title="steerlab: where refusal is read — t_inst vs post-instruction tokens",
        tables=tables, figures=fig_list,
        show=["harmful:baseline", f"ablate/{ref}", "harmless:baseline", f"add/{ref}",
              "add/t_inst"],
    )


EXPERIMENT = fw.Experiment("positions", PositionsConfig, run_positions)
