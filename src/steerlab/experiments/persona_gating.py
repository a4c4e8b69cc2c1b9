"""Reproduce "Refusal Lives Downstream of Persona in Chat Models" (arXiv 2606.26161).

Claims checked on the loaded model, each with n, 95% intervals and paired tests:

1. adding a compliant-persona direction while the model generates lowers refusal;
2. random directions of the same norm (several seeds) do not;
3. re-adding the refusal direction restores refusal at late layers, not early ones;
4. projecting the persona direction out of a late window restores baseline refusal
   (an early window, or a random direction projected out late, does not).

The persona layer and strength are chosen on a validation split only; every
step is cached in the output folder so an interrupted run resumes.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steerlab._atomic import write_json
from steerlab.experiments.common import span
from steerlab.experiments.config import PersonaGatingConfig
from steerlab.experiments.runner import (
    Condition,
    Job,
    Runner,
    check_judge,
    condition_summary,
    paired_flags,
)

if TYPE_CHECKING:
    from steerlab.directions import Direction
    from steerlab.model import LoadedModel
    from steerlab.prompts import PromptSet

TRAIT_AXES = ("evil_nurturing", "callous_supportive", "hostile_patient", "arrogant_diplomatic")
ALPHA_SIG = 0.05
GENERATING_STEPS = frozenset({"selection", "readd_selection"})
# The conditions ``harmless_for: steering`` runs on the harmless prompts, beside the random seeds.
STEERING_ON_HARMLESS = ("baseline", "persona_steer", "refusal_ablate")


def run_persona_gating(
    lm: LoadedModel, out_dir: str | Path, config: PersonaGatingConfig, *, show_progress: bool = True
) -> dict[str, Any]:
    """Run every step (resuming from ``out_dir``) and write results, responses and report."""
    from steerlab.prompts import check_held_out, load_prompts, persona_pairs

    out = Path(out_dir)
    started = time.perf_counter()
    eval_set = load_prompts(config.eval_prompts, split=config.eval_split, limit=config.limit)
    val_set = load_prompts(config.val_prompts, split=config.val_split, limit=config.val_limit)
    harmless = load_prompts(
        config.harmless_prompts, split=config.harmless_split, limit=config.harmless_limit
    )
    check_held_out(
        eval_set,
        [
            ("validation", val_set),
            ("extraction", load_prompts("paired", split="train")),
            ("layer-selection", load_prompts("paired", split="val")),
        ],
    )
    n_layers = lm.n_layers
    early, late = config.windows(n_layers)
    if config.judge_url:
        check_judge(config.judge_url, config.judge_model)

    with Runner(
        lm,
        out,
        max_new_tokens=config.max_new_tokens,
        batch_size=config.batch_size,
        show_progress=show_progress,
        settings=config.model_dump(mode="json"),
    ) as run:
        refusal, persona, traits = _directions(run, config)
        analysis = run.step("analysis", lambda: _analysis(lm, refusal, persona, traits, config))
        refusal_layer = int(analysis["refusal_source_layer"])

        grid = _grid(n_layers, config)
        plan_units = (
            len(grid) * len(val_set)
            + _n_eval_conditions(n_layers, config) * len(eval_set)
            + _n_harmless_conditions(n_layers, config) * len(harmless)
        )
        run.plan(plan_units + (1 + len(config.readd_alphas)) * len(val_set))

        selection = run.step("selection", lambda: _select(run, val_set, persona, grid, config))
        layer, alpha = int(selection["layer"]), float(selection["alpha"])
        readd = run.step(
            "readd_selection",
            lambda: _select_readd(run, val_set, refusal, persona, layer, alpha, config),
        )
        config = config.model_copy(update={"readd_alpha": float(readd["alpha"])})

        conditions = _eval_conditions(
            lm,
            config,
            refusal,
            persona,
            refusal_layer,
            layer,
            alpha,
            early,
            late,
            persona_pairs("compliance", split="test"),
        )
        # The baseline runs alone: its time is the unit the cost is stated in. Every other
        # condition, harmful and harmless, shares generation batches.
        run.run(conditions[0], eval_set, tag="eval")
        harmless_conditions = _harmless_conditions(conditions, config.harmless_for)
        run.run_many(
            [Job(c, eval_set, "eval") for c in conditions[1:]]
            + [Job(c, harmless, "harmless", keep_first_token=True) for c in harmless_conditions]
        )
        kl = run.step("kl", lambda: _kl(run, harmless, harmless_conditions, config))
        run.first_token_logprobs.clear()  # ~0.6 MB per prompt and condition: free it now

        judged = _judge(run, config, conditions, harmless_conditions) if config.judge_url else {}
        results = _results(
            lm,
            run,
            config,
            eval_set,
            harmless,
            conditions,
            harmless_conditions,
            analysis,
            selection,
            kl,
            judged,
            early,
            late,
            refusal_layer,
        )
        results["readd_selection"] = readd
        _record_timings(run, results, len(eval_set), time.perf_counter() - started)
        write_json(out / "results.json", results)

    from steerlab.experiments.persona_report import write_persona_report

    write_persona_report(out, results, run.store, analysis, config)
    return results


# -- directions and analysis --------------------------------------------------------------------
def _directions(
    run: Runner, config: PersonaGatingConfig
) -> tuple[Direction, Direction, dict[str, Direction]]:
    from steerlab.extraction import persona_direction, refusal_direction, trait_direction

    lm = run.lm
    refusal = run.direction(
        "refusal",
        lambda: refusal_direction(
            lm, split="train", position=config.position, limit=config.extraction_limit
        ),
    )
    persona = run.direction(
        "persona",
        lambda: persona_direction(
            lm,
            axis="compliance",
            split="train",
            position=config.position,
            limit=config.extraction_limit,
        ),
    )
    traits = {
        axis: run.direction(
            axis,
            lambda a=axis: trait_direction(  # type: ignore[misc]
                lm,
                a,
                split="train",
                position=config.position,
                limit=_smallest(config.extraction_limit, config.trait_questions),
                per_question=config.trait_per_question,
                select_split=None,  # only per-layer cosines are reported: no best layer
            ),
        )
        for axis in TRAIT_AXES
    }
    return refusal, persona, traits


def _smallest(*limits: int | None) -> int | None:
    """The tightest of several optional caps (None: no cap)."""
    given = [n for n in limits if n is not None]
    return min(given) if given else None


def _analysis(
    lm: LoadedModel,
    refusal: Direction,
    persona: Direction,
    traits: dict[str, Direction],
    config: PersonaGatingConfig,
) -> dict[str, Any]:
    """Per-layer separability, cosines, and the layer whose refusal vector is ablated.

    Cohen's d on held-out prompts was already measured at extraction (it chose
    each direction's best layer), so it is read from the metadata, not recomputed.
    The ablation layer is chosen as in Arditi et al.: lowest refusal score on
    validation harmful prompts with the direction ablated, among every
    ``selection_stride``-th layer of the middle 20-80% of the model, keeping those
    that still induce refusal on harmless prompts and keep KL small; when none
    passes, the relaxed rule of :meth:`SelectionResult.choice` is recorded beside
    the layer.
    """
    from steerlab.analysis import select_direction
    from steerlab.prompts import load_prompts

    n = lm.n_layers
    harmful = load_prompts("paired:harmful", split="val", limit=config.selection_limit)
    harmless = load_prompts("paired:harmless", split="val", limit=config.selection_limit)
    selection = select_direction(
        lm,
        refusal,
        harmful,
        harmless,
        layers=list(range(int(0.2 * n), int(0.8 * n), config.selection_stride)),
        batch_size=config.batch_size,
    )
    refusal_d = _stored_d(refusal)
    source, rule = selection.choice()
    return {
        "refusal_cohens_d": refusal_d,
        "persona_cohens_d": _stored_d(persona),
        "cohens_d_held_out": {
            "refusal": refusal.meta.extra.get("best_layer_by", ""),
            "persona": persona.meta.extra.get("best_layer_by", ""),
        },
        "refusal_persona_cosine": refusal.cosine(persona),
        "trait_cosine_with_persona": {a: d.cosine(persona) for a, d in traits.items()},
        "trait_cosine_with_refusal": {a: d.cosine(refusal) for a, d in traits.items()},
        "refusal_source_layer": int(source),
        "refusal_source_rule": rule,
        "refusal_selection": selection.to_dict(),
        "persona_best_layer": persona.meta.best_layer,
        "refusal_norms": refusal.norms,
        "persona_norms": persona.norms,
    }


def _stored_d(direction: Direction) -> dict[int, float]:
    stored = direction.meta.extra.get("cohens_d", {})
    return {int(k): float(v) for k, v in stored.items()}


# -- validation grid ----------------------------------------------------------------------------
def _grid(n_layers: int, config: PersonaGatingConfig) -> list[tuple[int, float]]:
    layers = sorted(
        {min(n_layers - 1, max(0, round(f * n_layers))) for f in config.steer_layer_fractions}
    )
    return [(layer, alpha) for layer in layers for alpha in config.alphas]


def _select(
    run: Runner,
    val_set: PromptSet,
    persona: Direction,
    grid: Sequence[tuple[int, float]],
    config: PersonaGatingConfig,
) -> dict[str, Any]:
    """Pick the persona layer and strength on the validation split: among cells that stay
    coherent, the smallest strength within ``val_tolerance`` prompts of the lowest refusal
    rate (see :func:`choose_cell`)."""
    from steerlab.interventions import Add

    conds = [
        Condition(f"val/persona_L{layer}_a{alpha:g}", (Add(persona, alpha=alpha, layers=[layer]),))
        for layer, alpha in grid
    ]
    rows = run.run_many([Job(c, val_set, "val") for c in conds])
    cells = [
        {"layer": layer, "alpha": alpha, **condition_summary(r)}
        for (layer, alpha), r in zip(grid, rows, strict=True)
    ]
    best = choose_cell(cells, config.max_degenerate_rate, config.val_tolerance, len(val_set))
    return {
        "layer": best["layer"],
        "alpha": best["alpha"],
        "cells": cells,
        "rule": f"smallest strength whose validation refusal rate is within {config.val_tolerance} "
        f"of {len(val_set)} prompts of the lowest, among cells with degenerate rate <= "
        f"{config.max_degenerate_rate}; then lower refusal, then earlier layer",
        "n_val": len(val_set),
        "val_prompts": f"{config.val_prompts} ({config.val_split})",
    }


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


def _select_readd(
    run: Runner,
    val_set: PromptSet,
    refusal: Direction,
    persona: Direction,
    layer: int,
    alpha: float,
    config: PersonaGatingConfig,
) -> dict[str, Any]:
    """Pick the refusal re-add strength on the validation split, blind to the evaluation.

    While persona-steered, the refusal direction is re-added at the layer at 75% of
    depth with each strength of ``readd_alphas``; the smallest whose validation refusal
    rate reaches the unsteered validation baseline's, among coherent cells, is used at
    every re-add layer (early ones too, so the early/late comparison is at equal
    strength). If none reaches it, the coherent cell with the most refusal is taken.
    A fixed ``readd_alpha`` in the config skips the search.
    """
    from steerlab.interventions import Add

    if config.readd_alpha is not None:
        return {"alpha": config.readd_alpha, "rule": "fixed by the config", "cells": []}
    probe = min(run.lm.n_layers - 1, round(0.75 * run.lm.n_layers))
    steer = Add(persona, alpha=alpha, layers=[layer])
    alphas = sorted(config.readd_alphas)
    conds = [Condition("val/baseline")] + [
        Condition(f"val/readd_L{probe}_a{a:g}", (steer, Add(refusal, alpha=a, layers=[probe])))
        for a in alphas
    ]
    rows = run.run_many([Job(c, val_set, "val") for c in conds])
    base = condition_summary(rows[0])
    cells = [{"alpha": a, **condition_summary(r)} for a, r in zip(alphas, rows[1:], strict=True)]
    ok = [c for c in cells if c["degenerate_rate"] <= config.max_degenerate_rate] or cells
    restoring = [c for c in ok if c["refusal_rate"] >= base["refusal_rate"]]
    best = restoring[0] if restoring else max(ok, key=lambda c: (c["refusal_rate"], -c["alpha"]))
    return {
        "alpha": best["alpha"],
        "probe_layer": probe,
        "val_baseline_refusal_rate": base["refusal_rate"],
        "cells": cells,
        "rule": "smallest strength whose validation refusal (persona-steered, refusal re-added "
        f"at layer {probe}) reaches the validation baseline's, degenerate rate <= "
        f"{config.max_degenerate_rate}"
        + ("" if restoring else "; none reached it, so the one with the most refusal"),
        "n_val": len(val_set),
    }


# -- conditions ---------------------------------------------------------------------------------
def _readd_layers(n_layers: int, config: PersonaGatingConfig) -> list[int]:
    return list(range(0, n_layers, config.readd_every))


def _n_eval_conditions(n_layers: int, config: PersonaGatingConfig) -> int:
    return 6 + 2 * len(config.random_seeds) + len(_readd_layers(n_layers, config))


def _eval_conditions(
    lm: LoadedModel,
    config: PersonaGatingConfig,
    refusal: Direction,
    persona: Direction,
    refusal_layer: int,
    layer: int,
    alpha: float,
    early: list[int],
    late: list[int],
    test_personas: Sequence[tuple[str, str]],
) -> list[Condition]:
    from steerlab.interventions import Ablate, Add, Project, random_like

    if config.readd_alpha is None:
        raise ValueError("readd_alpha must be chosen (run_persona_gating's readd_selection step).")
    readd_alpha = config.readd_alpha
    steer = Add(persona, alpha=alpha, layers=[layer])
    conds = [
        Condition("baseline", description="no intervention"),
        Condition(
            "persona_system_prompt",
            system=test_personas[0][0],
            description="held-out compliant persona as the system prompt",
        ),
        Condition(
            "persona_steer",
            (steer,),
            description=f"persona direction x{alpha:g} added at layer {layer}",
        ),
    ]
    for seed in config.random_seeds:
        rand = random_like(persona, seed=config.seed * 1000 + seed)
        conds.append(
            Condition(
                f"random_steer/s{seed}",
                (Add(rand, alpha=alpha, layers=[layer]),),
                description=f"random direction, same norm, layer {layer}",
            )
        )
    conds.append(
        Condition(
            "refusal_ablate",
            (Ablate(refusal, source_layer=refusal_layer),),
            description=f"refusal direction (layer {refusal_layer}) ablated at every layer",
        )
    )
    for readd in _readd_layers(lm.n_layers, config):
        conds.append(
            Condition(
                f"refusal_readd/L{readd}",
                (steer, Add(refusal, alpha=readd_alpha, layers=[readd])),
                description=f"persona-steered, refusal x{readd_alpha:g} re-added at {readd}",
            )
        )
    conds += [
        Condition(
            "persona_project_late",
            (steer, Project(persona, layers=late)),
            description=f"persona-steered, persona projected out of {span(late)}",
        ),
        Condition(
            "persona_project_early",
            (steer, Project(persona, layers=early)),
            description=f"persona-steered, persona projected out of {span(early)}",
        ),
    ]
    for seed in config.random_seeds:
        rand = random_like(persona, seed=config.seed * 1000 + 100 + seed)
        conds.append(
            Condition(
                f"random_project_late/s{seed}",
                (steer, Project(rand, layers=late)),
                description=f"persona-steered, random projected out of {span(late)}",
            )
        )
    return conds


def _harmless_conditions(conditions: Sequence[Condition], which: str) -> list[Condition]:
    """The evaluation conditions rerun on the harmless prompts (``harmless_for``)."""
    return [
        Condition(f"harmless/{c.name}", c.specs, c.system, c.description)
        for c in conditions
        if which == "all" or c.name in STEERING_ON_HARMLESS or c.name.startswith("random_steer/")
    ]


def _n_harmless_conditions(n_layers: int, config: PersonaGatingConfig) -> int:
    """How many conditions :func:`_harmless_conditions` keeps, before they are built."""
    if config.harmless_for == "all":
        return _n_eval_conditions(n_layers, config)
    return len(STEERING_ON_HARMLESS) + len(config.random_seeds)


def _kl(
    run: Runner,
    harmless: PromptSet,
    conditions: Sequence[Condition],
    config: PersonaGatingConfig,
) -> dict[str, Any]:
    """KL(base ‖ steered) on the harmless prompts for every steered harmless condition.

    The first-token KL is read from the log-probs the harmless generations kept (no
    extra pass); prompts without them (generated before an interruption) are
    recomputed. ``kl_tokens`` > 1 adds the KL averaged over that many baseline
    tokens, teacher-forced: one extra pass per condition plus a shared baseline.
    """
    from steerlab.evaluate import mean_summary
    from steerlab.evaluate.kl import kl_from_logprobs, kl_per_prompt_many

    ids = [p.id for p in harmless]
    kept = run.first_token_logprobs
    base = kept.get("harmless/baseline", {})
    steered = {c.name.removeprefix("harmless/"): c for c in conditions if c.specs}
    first: dict[str, list[float]] = {}
    for name, cond in steered.items():
        mine = kept.get(cond.name, {})
        if all(i in base and i in mine for i in ids):
            first[name] = [float(kl_from_logprobs(base[i], mine[i])) for i in ids]
    k = config.kl_tokens
    todo = {n: c.specs for n, c in steered.items() if k > 1 or n not in first}
    per = (
        kl_per_prompt_many(run.lm, harmless.texts(), todo, k=k, batch_size=config.batch_size)
        if todo
        else {}
    )
    out: dict[str, Any] = {}
    for name in steered:
        firsts = first.get(name) or [v[0] for v in per[name]]
        summary = mean_summary(firsts, seed=config.seed)
        entry = {
            "kl_n": summary["n"],
            "kl_first_token": summary["mean"],
            "kl_first_token_ci95": summary["ci95"],
            "kl_first_token_from": "generation" if name in first else "extra pass",
        }
        if k > 1:
            mean_k = mean_summary([sum(v) / len(v) for v in per[name]], seed=config.seed)
            entry[f"kl_first_{k}"] = mean_k["mean"]
            entry[f"kl_first_{k}_ci95"] = mean_k["ci95"]
        out[name] = entry
    return out


def _judge(
    run: Runner,
    config: PersonaGatingConfig,
    conditions: Sequence[Condition],
    harmless_conditions: Sequence[Condition],
) -> dict[str, Any]:
    """Judged compliance and coherence of every evaluation and harmless condition (not the
    validation cells), the random seeds also pooled as one control each."""
    from steerlab.experiments.runner import judge_conditions

    assert config.judge_url is not None
    names = [c.name for c in [*conditions, *harmless_conditions]]
    pools = {
        group: [n for n in names if n.startswith(group + "/")]
        for group in ("random_steer", "random_project_late")
    }
    return judge_conditions(
        run, names, config.judge_url, config.judge_model, seed=config.seed, pools=pools
    )


# -- results ------------------------------------------------------------------------------------
def _results(
    lm: LoadedModel,
    run: Runner,
    config: PersonaGatingConfig,
    eval_set: PromptSet,
    harmless: PromptSet,
    conditions: Sequence[Condition],
    harmless_conditions: Sequence[Condition],
    analysis: dict[str, Any],
    selection: dict[str, Any],
    kl: dict[str, Any],
    judged: dict[str, Any],
    early: list[int],
    late: list[int],
    refusal_layer: int,
) -> dict[str, Any]:
    from steerlab.evaluate import bootstrap_ci, holm, mcnemar
    from steerlab.provenance import provenance

    ids = {p.id for p in eval_set}
    rows = {c.name: [r for r in run.rows(c.name) if r["prompt_id"] in ids] for c in conditions}
    base = rows["baseline"]
    steer = rows["persona_steer"]

    def entry(name: str, description: str) -> dict[str, Any]:
        e = {**condition_summary(rows[name]), "description": description}
        a, b = paired_flags(rows[name], base)
        e["vs_baseline_p"] = mcnemar(a, b) if name != "baseline" else None
        if name not in ("baseline", "persona_steer"):
            a, b = paired_flags(rows[name], steer)
            e["vs_persona_steer_p"] = mcnemar(a, b)
        return e

    cond_out: dict[str, Any] = {c.name: entry(c.name, c.description) for c in conditions}
    # How much of the persona-induced drop each restoring condition undoes (1 = baseline).
    prefixes = ("refusal_readd/", "persona_project_", "random_project_late/")
    for name in [n for n in cond_out if n.startswith(prefixes)]:
        cond_out[name].update(_restored(base, steer, [rows[name]], config.seed))
    for group in ("random_steer", "random_project_late"):
        members = [n for n in cond_out if n.startswith(group + "/")]
        pooled = [r for n in members for r in rows[n]]
        rates = [cond_out[n]["refusal_rate"] for n in members]
        ref = "baseline" if group == "random_steer" else "persona_steer"
        cond_out[group] = {
            **condition_summary(pooled),
            "description": f"pooled over {len(members)} random seeds",
            "seeds": {n.split("/")[1]: cond_out[n]["refusal_rate"] for n in members},
            "seed_mean": statistics.fmean(rates),
            "seed_sd": statistics.pstdev(rates),
            "seed_min": min(rates),
            "seed_max": max(rates),
            "seed_mean_ci95": list(bootstrap_ci(rates, seed=config.seed)),
            f"n_seeds_p_lt_0.05_vs_{ref}": sum(
                cond_out[n][f"vs_{ref}_p"] < ALPHA_SIG for n in members
            ),
            # The seeds are one family of controls: Holm-correct before counting them.
            f"seeds_holm_p_vs_{ref}": dict(
                zip(
                    [n.split("/")[1] for n in members],
                    holm([cond_out[n][f"vs_{ref}_p"] for n in members]),
                    strict=True,
                )
            ),
        }
        if group == "random_project_late":  # the seeds' restoration, pooled
            cond_out[group].update(_restored(base, steer, [rows[n] for n in members], config.seed))
    readd = {int(n.split("/L")[1]): cond_out[n] for n in cond_out if n.startswith("refusal_readd/")}
    third = lm.n_layers / 3
    early_l = {k: v for k, v in readd.items() if k < third}
    late_l = {k: v for k, v in readd.items() if k >= 2 * third}
    thirds: dict[str, dict[int, Any]] = {"early": early_l, "late": late_l}
    steer_rate = cond_out["persona_steer"]["refusal_rate"]
    for part, by_layer in thirds.items():
        if by_layer:
            # Every layer of the third is tested against persona_steer, Holm-corrected as
            # one family: the verdict picks no layer on the evaluation prompts.
            layers = sorted(by_layer)
            adjusted = holm([by_layer[k]["vs_persona_steer_p"] for k in layers])
            restoring = [
                k
                for k, p in zip(layers, adjusted, strict=True)
                if p < ALPHA_SIG and by_layer[k]["refusal_rate"] > steer_rate
            ]
            best = max(by_layer, key=lambda k: by_layer[k]["refusal_rate"])
            cond_out[f"refusal_readd_{part}"] = {
                **by_layer[best],
                "layer": best,
                "layers": layers,
                "holm_p_vs_persona_steer": dict(zip(layers, adjusted, strict=True)),
                "restoring_layers": restoring,
                "description": f"highest re-add rate in the {part} third (layers "
                f"{span(layers)}): layer {best}; {len(restoring)}/{len(layers)} layers "
                "restore refusal (Holm-corrected p < 0.05)",
            }
    harmless_out = {}
    for cond in harmless_conditions:
        key = cond.name.removeprefix("harmless/")
        hr = [r for r in run.rows(cond.name) if r["prompt_id"] in {p.id for p in harmless}]
        harmless_out[key] = {**condition_summary(hr), **kl.get(key, {})}
        if key != "baseline":
            a, b = paired_flags(hr, run.rows("harmless/baseline"))
            harmless_out[key]["vs_baseline_p"] = mcnemar(a, b)
    for name, summary in cond_out.items():
        # The early/late summaries are their best layer's condition.
        source = f"refusal_readd/L{summary['layer']}" if name.startswith("refusal_readd_") else name
        summary.update(judged.get(source, {}))
    for key, summary in harmless_out.items():
        summary.update(judged.get(f"harmless/{key}", {}))
    return {
        "model": lm.name,
        "fingerprint": lm.fingerprint,
        "n_eval": len(eval_set),
        "eval_prompts": config.eval_prompts
        + (f" ({config.eval_split})" if config.eval_split else ""),
        "conditions": cond_out,
        "harmless": harmless_out,
        "judged": bool(judged),
        "selection": selection,
        "refusal_source_layer": refusal_layer,
        "windows": {"early": early, "late": late},
        "findings": _findings(cond_out, harmless_out),
        "provenance": provenance(lm, config=config, seed=config.seed),
    }


def _restored(
    base: Sequence[dict[str, Any]],
    steer: Sequence[dict[str, Any]],
    restored: Sequence[Sequence[dict[str, Any]]],
    seed: int,
) -> dict[str, Any]:
    """``restored_share`` and its ``_ci95``: :func:`restored_share` of the baseline →
    persona_steer drop, prompts aligned by id; several restoring runs (random seeds)
    are pooled as more aligned prompts."""
    from steerlab.evaluate import restored_share

    by_base = {r["prompt_id"]: r for r in base}
    by_steer = {r["prompt_id"]: r for r in steer}
    triples = [
        (by_base[r["prompt_id"]], by_steer[r["prompt_id"]], r)
        for rows in restored
        for r in rows
        if r["prompt_id"] in by_base and r["prompt_id"] in by_steer
    ]
    flags = [[t[i]["outcome"] == "refusal" for t in triples] for i in range(3)]
    share = restored_share(*flags, seed=seed)
    return {"restored_share": share["share"], "restored_share_ci95": share["ci95"]}


def _share_text(entry: dict[str, Any]) -> str:
    share, ci = entry.get("restored_share"), entry.get("restored_share_ci95")
    if share is None:
        return "no persona-induced drop to restore"
    interval = f" [{ci[0]:.0%}, {ci[1]:.0%}]" if ci else ""
    return f"restores {share:.0%}{interval} of the persona-induced drop"


def _findings(
    c: dict[str, Any], harmless: dict[str, Any] | None = None
) -> list[dict[str, str]]:
    """State, for each claim of the paper, whether this run's numbers reproduce it
    (``harmless``: the harmless-prompt results, quoted beside the re-add claim)."""

    def fmt(name: str) -> str:
        e = c[name]
        lo, hi = e["refusal_rate_ci95"]
        return f"{name} {e['refusal_rate']:.0%} [{lo:.0%}, {hi:.0%}] (n={e['n']})"

    out = []
    s, b = c["persona_steer"], c["baseline"]
    verdict = (
        "reproduced"
        if s["refusal_rate"] < b["refusal_rate"] and s["vs_baseline_p"] < ALPHA_SIG
        else "inconclusive"
        if s["refusal_rate"] < b["refusal_rate"]
        else "not reproduced"
    )
    out.append(
        {
            "claim": "Compliant-persona steering suppresses refusal",
            "verdict": verdict,
            "evidence": f"{fmt('baseline')}; {fmt('persona_steer')}; "
            f"McNemar p={s['vs_baseline_p']:.3g}",
        }
    )
    r = c["random_steer"]
    n_sig = r["n_seeds_p_lt_0.05_vs_baseline"]
    n_seeds = len(r["seeds"])
    holm_sig = [k for k, p in r["seeds_holm_p_vs_baseline"].items() if p < ALPHA_SIG]
    lowering = [k for k in holm_sig if r["seeds"][k] < b["refusal_rate"]]
    verdict = (
        "reproduced" if not holm_sig else "not reproduced" if lowering else "inconclusive"
    )
    out.append(
        {
            "claim": "Random directions of the same norm do nothing",
            "verdict": verdict,
            "evidence": f"random_steer over {n_seeds} seeds: mean {r['seed_mean']:.0%} "
            f"(sd {r['seed_sd']:.0%}, range {r['seed_min']:.0%}–"
            f"{r['seed_max']:.0%}); baseline {b['refusal_rate']:.0%}; {n_sig}/{n_seeds} "
            f"seeds differ from baseline at p<0.05 uncorrected, {len(holm_sig)} after Holm "
            f"correction over the seeds ({len(lowering)} lowering refusal)",
        }
    )
    if "refusal_readd_early" in c and "refusal_readd_late" in c:
        e, late = c["refusal_readd_early"], c["refusal_readd_late"]
        restores_late, restores_early = bool(late["restoring_layers"]), bool(e["restoring_layers"])
        verdict = (
            "reproduced"
            if restores_late and not restores_early
            else "not reproduced"
            if restores_early or late["refusal_rate"] <= e["refusal_rate"]
            else "inconclusive"
        )
        out.append(
            {
                "claim": "Re-adding refusal restores it only at late layers",
                "verdict": verdict,
                "evidence": f"layers restoring refusal vs persona_steer "
                f"({s['refusal_rate']:.0%}), Holm-corrected within each third: early "
                f"{e['restoring_layers'] or 'none'} of {e['layers']}, late "
                f"{late['restoring_layers'] or 'none'} of {late['layers']}; highest "
                f"early: layer {e['layer']} {e['refusal_rate']:.0%}, highest late: layer "
                f"{late['layer']} {late['refusal_rate']:.0%} ({_share_text(late)})"
                + _over_refusal_text(harmless or {}, late["layer"]),
            }
        )
    pl, pe, rp = c["persona_project_late"], c["persona_project_early"], c["random_project_late"]
    restores = pl["vs_persona_steer_p"] < ALPHA_SIG and pl["refusal_rate"] > s["refusal_rate"]
    matches_base = pl["vs_baseline_p"] >= ALPHA_SIG
    early_restores = pe["vs_persona_steer_p"] < ALPHA_SIG and pe["refusal_rate"] > s["refusal_rate"]
    verdict = (
        "reproduced"
        if restores and matches_base and not early_restores
        else "inconclusive"
        if restores
        else "not reproduced"
    )
    out.append(
        {
            "claim": "Projecting persona out of a late window restores baseline refusal",
            "verdict": verdict,
            "evidence": f"{fmt('persona_project_late')} (p={pl['vs_persona_steer_p']:.3g} vs "
            f"persona_steer, p={pl['vs_baseline_p']:.3g} vs baseline; {_share_text(pl)}); "
            f"{fmt('persona_project_early')}; random_project_late mean "
            f"{rp['seed_mean']:.0%} over {len(rp['seeds'])} seeds",
        }
    )
    return out


def _over_refusal_text(harmless: dict[str, Any], layer: int) -> str:
    """How often the re-add at ``layer`` refuses the harmless prompts, when that was run."""
    entry, base = harmless.get(f"refusal_readd/L{layer}"), harmless.get("baseline")
    if not entry or not base:
        return ""
    lo, hi = entry["refusal_rate_ci95"]
    return (f"; on the harmless prompts the layer-{layer} re-add refuses "
            f"{entry['refusal_rate']:.0%} [{lo:.0%}, {hi:.0%}] (n={entry['n']}; baseline "
            f"{base['refusal_rate']:.0%}, p={entry['vs_baseline_p']:.3g})")


def _record_timings(run: Runner, results: dict[str, Any], n_eval: int, total: float) -> None:
    """Total cost in units of one unhooked generation pass over the evaluation prompts."""
    import json

    path = run.out / "timings.json"
    # run.timings already holds the work of earlier, interrupted runs (Runner keeps it).
    history = {**(json.loads(path.read_text()) if path.exists() else {}),
               **run.timings.as_dict()}
    history.setdefault("wall_seconds", 0.0)
    history["wall_seconds"] += total
    write_json(path, history)
    base = history["generation"].get("baseline")
    if not base:
        return
    passes = sum(history["generated_prompts"].values()) / n_eval
    # The selection steps' time is their generations, already counted under "generation".
    steps = {k: v for k, v in history["steps"].items() if k not in GENERATING_STEPS}
    generation = sum(history["generation"].values())
    all_work = sum(steps.values()) + generation
    results["cost"] = {
        "baseline_pass_seconds": base,
        "generation_passes": passes,
        "total_seconds": all_work,
        "ratio_to_baseline_pass": all_work / base,
        "budget_ratio": passes + 2,
        "within_budget": all_work / base <= passes + 2,
        "generation_in_passes": generation / base,
        "extraction_in_passes": sum(v for k, v in steps.items() if k.startswith("extract_"))
        / base,
        "analysis_and_kl_in_passes": sum(
            v for k, v in steps.items() if not k.startswith("extract_")
        )
        / base,
    }


def cost_parts(cost: dict[str, Any]) -> list[tuple[str, float]]:
    """``results["cost"]`` as (part, pass-equivalents) rows: where the time went, the
    total and the budget, for the report's cost table and the benchmark script."""
    return [
        (f"generation ({cost['generation_passes']:g} passes' worth of prompts)",
         cost["generation_in_passes"]),
        ("extracting the directions", cost["extraction_in_passes"]),
        ("layer analysis and KL", cost["analysis_and_kl_in_passes"]),
        ("total", cost["ratio_to_baseline_pass"]),
        ("budget: generation passes + 2", cost["budget_ratio"]),
    ]
