"""The persona-gating conditions (steer, random controls, ablate, re-add by layer,
project early/late), their harmless-prompt copies, KL and judging on them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from steerlab.directions.artifact import Direction
from steerlab.evaluate.kl import kl_from_logprobs, kl_per_prompt_many
from steerlab.experiments.config import PersonaGatingConfig
from steerlab.experiments.framework import span
from steerlab.experiments.measure import judge_conditions, kl_columns
from steerlab.experiments.runner import Condition, Runner
from steerlab.experiments.summary import Entry, JudgeEntry
from steerlab.interventions.specs import Ablate, Add, Project, random_like
from steerlab.prompts.sets import PromptSet

# The conditions ``harmless_for: steering`` runs on the harmless prompts, beside the random seeds.
STEERING_ON_HARMLESS = ("baseline", "persona_steer", "refusal_ablate")


@dataclass(frozen=True)
class Steering:
    """What the selection steps chose: the directions and where and how hard to act."""

    refusal: Direction
    persona: Direction
    refusal_layer: int
    layer: int
    alpha: float
    early: list[int]
    late: list[int]


def readd_layers(n_layers: int, config: PersonaGatingConfig) -> list[int]:
    return list(range(0, n_layers, config.readd_every))


def n_eval_conditions(n_layers: int, config: PersonaGatingConfig) -> int:
    return 6 + 2 * len(config.random_seeds) + len(readd_layers(n_layers, config))


def n_harmless_conditions(n_layers: int, config: PersonaGatingConfig) -> int:
    """How many conditions :func:`harmless_conditions` keeps, before they are built."""
    if config.harmless_for == "all":
        return n_eval_conditions(n_layers, config)
    return len(STEERING_ON_HARMLESS) + len(config.random_seeds)


def eval_conditions(n_layers: int, config: PersonaGatingConfig, s: Steering,
                    test_personas: Sequence[tuple[str, str]]) -> list[Condition]:
    if config.readd_alpha is None:
        raise ValueError("readd_alpha must be chosen (run_persona_gating's readd_selection step).")
    readd_alpha, layer, alpha = config.readd_alpha, s.layer, s.alpha
    steer = Add(s.persona, alpha=alpha, layers=[layer])
    conds = [
        Condition("baseline", description="no intervention"),
        Condition("persona_system_prompt", system=test_personas[0][0],
                  description="held-out compliant persona as the system prompt"),
        Condition("persona_steer", (steer,),
                  description=f"persona direction x{alpha:g} added at layer {layer}"),
    ]
    conds += [
        Condition(f"random_steer/s{seed}",
                  (Add(random_like(s.persona, seed=config.seed * 1000 + seed), alpha=alpha,
                       layers=[layer]),),
                  description=f"random direction, same norm, layer {layer}")
        for seed in config.random_seeds
    ]
    conds.append(Condition(
        "refusal_ablate", (Ablate(s.refusal, source_layer=s.refusal_layer),),
        description=f"refusal direction (layer {s.refusal_layer}) ablated at every layer"))
    conds += [
        Condition(f"refusal_readd/L{readd}",
                  (steer, Add(s.refusal, alpha=readd_alpha, layers=[readd])),
                  description=f"persona-steered, refusal x{readd_alpha:g} re-added at {readd}")
        for readd in readd_layers(n_layers, config)
    ]
    conds += [
        Condition(f"persona_project_{part}", (steer, Project(s.persona, layers=window)),
                  description=f"persona-steered, persona projected out of {span(window)}")
        for part, window in (("late", s.late), ("early", s.early))
    ]
    conds += [
        Condition(f"random_project_late/s{seed}",
                  (steer, Project(random_like(s.persona, seed=config.seed * 1000 + 100 + seed),
                                  layers=s.late)),
                  description=f"persona-steered, random projected out of {span(s.late)}")
        for seed in config.random_seeds
    ]
    return conds


def harmless_conditions(conditions: Sequence[Condition], which: str) -> list[Condition]:
    """The evaluation conditions rerun on the harmless prompts (``harmless_for``)."""
    return [
        Condition(f"harmless/{c.name}", c.specs, c.system, c.description)
        for c in conditions
        if which == "all" or c.name in STEERING_ON_HARMLESS or c.name.startswith("random_steer/")
    ]


def harmless_kl(run: Runner, harmless: PromptSet, conditions: Sequence[Condition],
                config: PersonaGatingConfig) -> dict[str, Entry]:
    """KL(base ‖ steered) on the harmless prompts for every steered harmless condition.

    The first-token KL is read from the log-probs the harmless generations kept (no
    extra pass); prompts without them (generated before an interruption) are
    recomputed. ``kl_tokens`` > 1 adds the KL averaged over that many baseline
    tokens, teacher-forced: one extra pass per condition plus a shared baseline.
    """
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
    per: dict[str, Any] = (
        kl_per_prompt_many(run.lm, harmless.texts(), todo, k=k, batch_size=config.batch_size)
        if todo else {}
    )
    return {name: kl_columns(first.get(name) or [v[0] for v in per[name]],
                             per[name] if k > 1 else None, k, config.seed,
                             kl_first_token_from="generation" if name in first else "extra pass")
            for name in steered}


def judge(run: Runner, config: PersonaGatingConfig, conditions: Sequence[Condition],
          harmless: Sequence[Condition]) -> dict[str, JudgeEntry]:
    """Judged compliance and coherence of every evaluation and harmless condition (not the
    validation cells), the random seeds also pooled as one control each."""
    names = [c.name for c in [*conditions, *harmless]]
    pools = {group: [n for n in names if n.startswith(group + "/")]
             for group in ("random_steer", "random_project_late")}
    return judge_conditions(run, names, config, pools)
