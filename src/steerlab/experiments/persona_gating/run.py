"""``steerlab reproduce persona-gating``: directions, layer analysis, validation choices,
then every condition on the evaluation and harmless prompts, results and report."""

from __future__ import annotations

import time
from pathlib import Path

from steerlab.directions.artifact import Direction
from steerlab.directions.extraction import (
    TRAIT_AXES,
    persona_direction,
    refusal_direction,
    trait_direction,
)
from steerlab.directions.selection import select_direction
from steerlab.errors import SteerlabError
from steerlab.experiments.common import cohens_d_of
from steerlab.experiments.config import PersonaGatingConfig
from steerlab.experiments.framework import Experiment, Results, harmless_prompts, open_runner
from steerlab.experiments.persona_gating import conditions as pc
from steerlab.experiments.persona_gating.report import write_persona_report
from steerlab.experiments.persona_gating.results import Evaluation, build_results
from steerlab.experiments.persona_gating.select import grid, select, select_readd
from steerlab.experiments.runner import Job, Runner
from steerlab.experiments.timings import record_cost
from steerlab.model.loading import LoadedModel
from steerlab.prompts.sets import PromptSet, check_held_out, load_prompts, persona_pairs
from steerlab.store.atomic import write_json


def run_persona_gating(
    lm: LoadedModel, out_dir: str | Path, config: PersonaGatingConfig, *, show_progress: bool = True
) -> Results:
    """Run every step (resuming from ``out_dir``) and write results, responses and report."""
    out = Path(out_dir)
    started = time.perf_counter()
    eval_set, val_set, harmless = _prompts(config)
    early, late = config.windows(lm.n_layers)
    given = given_refusal(lm, config.refusal_direction) if config.refusal_direction else None
    with open_runner(lm, out, config, show_progress) as run:
        refusal, persona, traits = _directions(run, config, given)
        analysis = run.step("analysis", lambda: _analysis(lm, refusal, persona, traits, config))
        cells = grid(lm.n_layers, config)
        run.plan(len(cells) * len(val_set)
                 + pc.n_eval_conditions(lm.n_layers, config) * len(eval_set)
                 + pc.n_harmless_conditions(lm.n_layers, config) * len(harmless)
                 + (1 + len(config.readd_alphas)) * len(val_set))
        selection = run.step("selection", lambda: select(run, val_set, persona, cells, config))
        layer, alpha = int(selection["layer"]), float(selection["alpha"])
        readd = run.step("readd_selection", lambda: select_readd(
            run, val_set, refusal, persona, layer, alpha, config))
        config = config.model_copy(update={"readd_alpha": float(readd["alpha"])})
        steering = pc.Steering(refusal, persona, int(analysis["refusal_source_layer"]), layer,
                               alpha, early, late)
        conditions = pc.eval_conditions(lm.n_layers, config, steering,
                                        persona_pairs("compliance", split="test"))
        # The baseline runs alone: its time is the unit the cost is stated in. Every other
        # condition, harmful and harmless, shares generation batches.
        run.run(conditions[0], eval_set, tag="eval")
        on_harmless = pc.harmless_conditions(conditions, config.harmless_for)
        run.run_many(
            [Job(c, eval_set, "eval") for c in conditions[1:]]
            + [Job(c, harmless, "harmless", keep_first_token=True) for c in on_harmless]
        )
        kl = run.step("kl", lambda: pc.harmless_kl(run, harmless, on_harmless, config))
        run.first_token_logprobs.clear()  # ~0.6 MB per prompt and condition: free it now
        judged = pc.judge(run, config, conditions, on_harmless) if config.judge_url else {}
        evaluation = Evaluation(eval_set, harmless, conditions, on_harmless, early, late,
                                steering.refusal_layer)
        results = build_results(lm, run, config, evaluation, selection, kl, judged)
        results["readd_selection"] = readd
        results["refusal_direction"] = _refusal_used(refusal, analysis, results, config)
        cost = record_cost(out, run.timings, len(eval_set), time.perf_counter() - started)
        if cost is not None:
            results["cost"] = cost
        write_json(out / "results.json", results)
    write_persona_report(out, results, run.store, analysis, config)
    return results


def _prompts(config: PersonaGatingConfig) -> tuple[PromptSet, PromptSet, PromptSet]:
    """(evaluation, validation, harmless) prompts; the evaluation ones checked held out."""
    eval_set = load_prompts(config.eval_prompts, split=config.eval_split, limit=config.limit)
    val_set = load_prompts(config.val_prompts, split=config.val_split, limit=config.val_limit)
    harmless = harmless_prompts(config)
    check_held_out(eval_set, [
        ("validation", val_set),
        ("extraction", load_prompts("paired", split="train")),
        ("layer-selection", load_prompts("paired", split="val")),
    ])
    return eval_set, val_set, harmless


def _directions(
    run: Runner, config: PersonaGatingConfig, given: Direction | None
) -> tuple[Direction, Direction, dict[str, Direction]]:
    lm, limit, position = run.lm, config.extraction_limit, config.position
    refusal = given if given is not None else run.direction("refusal", lambda: refusal_direction(
        lm, split="train", position=position, limit=limit))
    persona = run.direction("persona", lambda: persona_direction(
        lm, axis="compliance", split="train", position=position, limit=limit))
    caps = [n for n in (limit, config.trait_questions) if n is not None]
    traits = {
        axis: run.direction(
            axis,
            lambda a=axis: trait_direction(  # type: ignore[misc]
                lm, a, split="train", position=position, limit=min(caps) if caps else None,
                per_question=config.trait_per_question,
                select_split=None,  # only per-layer cosines are reported: no best layer
            ),
        )
        for axis in TRAIT_AXES
    }
    return refusal, persona, traits


def _refusal_used(refusal: Direction, analysis: Results, results: Results,
                  config: PersonaGatingConfig) -> dict[str, object]:
    """Which refusal direction was ablated and re-added, and the refusal its ablation
    leaves (the refusal_ablate condition's rate on the evaluation prompts)."""
    given = config.refusal_direction
    return {
        "source": "given" if given else "selected",
        "folder": given,
        "name": refusal.meta.name,
        "layer": int(analysis["refusal_source_layer"]),
        "rule": analysis["refusal_source_rule"],
        "ablated_refusal_rate": results["conditions"]["refusal_ablate"]["refusal_rate"],
    }


def given_refusal(lm: LoadedModel, path: str) -> Direction:
    """The refusal direction saved in ``path``: an extract folder, or an abliterate run
    (its ``direction/``), checked to belong to ``lm`` and to have a best layer."""
    folder = Path(path)
    if (folder / "direction").is_dir() and (folder / "spec.json").is_file():
        folder = folder / "direction"
    try:
        direction = Direction.load(folder, lm)
    except SteerlabError as exc:
        raise SteerlabError(f"refusal_direction {path}: {exc}") from exc
    if direction.meta.best_layer is None:
        raise SteerlabError(
            f"refusal_direction {path}: the direction {direction.meta.name!r} has no best layer "
            "to ablate at; extract it with layer selection (`steerlab extract` does by default) "
            "or give an abliterate run folder."
        )
    return direction


def _analysis(lm: LoadedModel, refusal: Direction, persona: Direction,
              traits: dict[str, Direction], config: PersonaGatingConfig) -> Results:
    """Per-layer separability, cosines, and the layer whose refusal vector is ablated.

    Cohen's d on held-out prompts was measured at extraction (it chose each direction's
    best layer), so it is read from the metadata. The ablation layer is chosen as in
    Arditi et al. (lowest validation refusal score with the direction ablated, among
    every ``selection_stride``-th layer of the middle 20-80%, keeping layers that still
    induce refusal and keep KL small; else the relaxed rule of
    :meth:`SelectionResult.choice`, recorded beside the layer).
    """
    if config.refusal_direction is not None:
        source, rule = refusal.meta.best_layer, (
            f"given: {config.refusal_direction} ({refusal.meta.name!r}, its best layer "
            f"{refusal.meta.best_layer}); no selection was run")
        return {**_cosines(refusal, persona, traits), "refusal_source_layer": source,
                "refusal_source_rule": rule, "refusal_selection": None}
    n = lm.n_layers
    selection = select_direction(
        lm,
        refusal,
        load_prompts("paired:harmful", split="val", limit=config.selection_limit),
        load_prompts("paired:harmless", split="val", limit=config.selection_limit),
        layers=list(range(int(0.2 * n), int(0.8 * n), config.selection_stride)),
        batch_size=config.batch_size,
    )
    source, rule = selection.choice()
    return {
        **_cosines(refusal, persona, traits),
        "refusal_source_layer": int(source),
        "refusal_source_rule": rule,
        "refusal_selection": selection.to_dict(),
    }


def _cosines(refusal: Direction, persona: Direction, traits: dict[str, Direction]) -> Results:
    """Separability, cosines and norms of the directions (selection aside)."""
    return {
        "refusal_cohens_d": cohens_d_of(refusal),
        "persona_cohens_d": cohens_d_of(persona),
        "cohens_d_held_out": {
            "refusal": refusal.meta.extra.get("best_layer_by", ""),
            "persona": persona.meta.extra.get("best_layer_by", ""),
        },
        "refusal_persona_cosine": refusal.cosine(persona),
        "trait_cosine_with_persona": {a: d.cosine(persona) for a, d in traits.items()},
        "trait_cosine_with_refusal": {a: d.cosine(refusal) for a, d in traits.items()},
        "persona_best_layer": persona.meta.best_layer,
        "refusal_norms": refusal.norms,
        "persona_norms": persona.norms,
    }


EXPERIMENT = Experiment("persona-gating", PersonaGatingConfig, run_persona_gating)
