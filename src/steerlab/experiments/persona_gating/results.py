"""results.json of a persona-gating run: per-condition rates with paired tests, the
random seeds pooled, re-add layers by third, harmless prompts, and the findings."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from steerlab.evaluate.stats import bootstrap_ci, holm, restored_share
from steerlab.experiments.config import PersonaGatingConfig
from steerlab.experiments.framework import Results, span
from steerlab.experiments.measure import rows_of, summarise
from steerlab.experiments.persona_gating.findings import findings
from steerlab.experiments.persona_gating.select import Selection
from steerlab.experiments.runner import Condition, Runner
from steerlab.experiments.summary import ALPHA_SIG, Entry, Row, condition_summary, paired_p
from steerlab.model.loading import LoadedModel
from steerlab.prompts.sets import PromptSet
from steerlab.store.provenance import provenance

# Conditions whose restoration of the persona-induced drop is reported (1 = baseline).
RESTORING = ("refusal_readd/", "persona_project_", "random_project_late/")


@dataclass(frozen=True)
class Evaluation:
    """The evaluation a run made: prompts, conditions and the windows they act on."""

    eval_set: PromptSet
    harmless: PromptSet
    conditions: Sequence[Condition]
    harmless_conditions: Sequence[Condition]
    early: list[int]
    late: list[int]
    refusal_layer: int


def build_results(lm: LoadedModel, run: Runner, config: PersonaGatingConfig, ev: Evaluation,
                  selection: Selection, kl: dict[str, Entry],
                  judged: dict[str, Any]) -> Results:
    rows = {c.name: rows_of(run, c.name, ev.eval_set) for c in ev.conditions}
    cond_out = summarise(run, ev.conditions, ev.eval_set, "baseline")
    for name, entry in cond_out.items():  # against persona_steer too, and what each restores
        if name not in ("baseline", "persona_steer"):
            entry["vs_persona_steer_p"] = paired_p(rows[name], rows["persona_steer"])
        if name.startswith(RESTORING):
            entry.update(_restored(rows["baseline"], rows["persona_steer"], [rows[name]],
                                   config.seed))
    for group in ("random_steer", "random_project_late"):
        cond_out[group] = _pooled(group, cond_out, rows, config.seed)
    cond_out.update(_thirds(cond_out, lm.n_layers))
    harmless_out = {}
    for cond in ev.harmless_conditions:
        key = cond.name.removeprefix("harmless/")
        hr = rows_of(run, cond.name, ev.harmless)
        harmless_out[key] = {**condition_summary(hr), **kl.get(key, {})}
        if key != "baseline":
            harmless_out[key]["vs_baseline_p"] = paired_p(hr, run.rows("harmless/baseline"))
    for name, summary in cond_out.items():
        # The early/late summaries are their best layer's condition.
        source = f"refusal_readd/L{summary['layer']}" if name.startswith("refusal_readd_") else name
        summary.update(judged.get(source, {}))
    for key, summary in harmless_out.items():
        summary.update(judged.get(f"harmless/{key}", {}))
    return {
        "model": lm.name,
        "fingerprint": lm.fingerprint,
        "n_eval": len(ev.eval_set),
        "eval_prompts": config.eval_prompts
        + (f" ({config.eval_split})" if config.eval_split else ""),
        "conditions": cond_out,
        "harmless": harmless_out,
        "judged": bool(judged),
        "selection": selection,
        "refusal_source_layer": ev.refusal_layer,
        "windows": {"early": ev.early, "late": ev.late},
        "findings": findings(cond_out, harmless_out),
        "provenance": provenance(lm, config=config, seed=config.seed),
    }


def _pooled(group: str, cond_out: dict[str, Entry], rows: dict[str, list[dict[str, Any]]],
            seed: int) -> Entry:
    """The random seeds of ``group`` as one control, and how the seeds spread."""
    members = [n for n in cond_out if n.startswith(group + "/")]
    rates = [cond_out[n]["refusal_rate"] for n in members]
    ref = "baseline" if group == "random_steer" else "persona_steer"
    entry: Entry = {
        **condition_summary([r for n in members for r in rows[n]]),
        "description": f"pooled over {len(members)} random seeds",
        "seeds": {n.split("/")[1]: cond_out[n]["refusal_rate"] for n in members},
        "seed_mean": statistics.fmean(rates),
        "seed_sd": statistics.pstdev(rates),
        "seed_min": min(rates),
        "seed_max": max(rates),
        "seed_mean_ci95": list(bootstrap_ci(rates, seed=seed)),
        f"n_seeds_p_lt_0.05_vs_{ref}": sum(cond_out[n][f"vs_{ref}_p"] < ALPHA_SIG
                                           for n in members),
        # The seeds are one family of controls: Holm-correct before counting them.
        f"seeds_holm_p_vs_{ref}": dict(zip([n.split("/")[1] for n in members],
                                           holm([cond_out[n][f"vs_{ref}_p"] for n in members]),
                                           strict=True)),
    }
    if group == "random_project_late":  # the seeds' restoration, pooled
        entry.update(_restored(rows["baseline"], rows["persona_steer"],
                               [rows[n] for n in members], seed))
    return entry


def _thirds(cond_out: dict[str, Entry], n_layers: int) -> dict[str, Entry]:
    """``refusal_readd_early`` / ``_late``: every re-add layer of the third tested against
    persona_steer, Holm-corrected as one family (no layer is picked on the evaluation)."""
    readd = {int(n.split("/L")[1]): cond_out[n] for n in cond_out
             if n.startswith("refusal_readd/")}
    third = n_layers / 3
    thirds = {"early": {k: v for k, v in readd.items() if k < third},
              "late": {k: v for k, v in readd.items() if k >= 2 * third}}
    steer_rate = cond_out["persona_steer"]["refusal_rate"]
    out = {}
    for part, by_layer in thirds.items():
        if not by_layer:
            continue
        layers = sorted(by_layer)
        adjusted = holm([by_layer[k]["vs_persona_steer_p"] for k in layers])
        restoring = [k for k, p in zip(layers, adjusted, strict=True)
                     if p < ALPHA_SIG and by_layer[k]["refusal_rate"] > steer_rate]
        best = max(by_layer, key=lambda k: by_layer[k]["refusal_rate"])
        out[f"refusal_readd_{part}"] = {
            **by_layer[best],
            "layer": best,
            "layers": layers,
            "holm_p_vs_persona_steer": dict(zip(layers, adjusted, strict=True)),
            "restoring_layers": restoring,
            "description": f"highest re-add rate in the {part} third (layers "
            f"{span(layers)}): layer {best}; {len(restoring)}/{len(layers)} layers "
            "restore refusal (Holm-corrected p < 0.05)",
        }
    return out


def _restored(base: Sequence[Row], steer: Sequence[Row], restored: Sequence[Sequence[Row]],
              seed: int) -> dict[str, Any]:
    """``restored_share`` and its ``_ci95`` of the baseline → persona_steer drop, prompts
    aligned by id; several restoring runs (random seeds) pool as more aligned prompts."""
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
