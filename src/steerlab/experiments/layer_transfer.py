"""``steerlab experiment layer-transfer``: is refusal one direction or a low-rank subspace?

The refusal direction read at each source layer is ablated at every layer
(Arditi et al.'s directional ablation with ``source_layer``), or subtracted at
a fixed strength at its own layer. Per source layer: refusal rate on harmful
prompts (Wilson 95% CI, McNemar against the baseline), KL on harmless prompts,
judged compliance and coherence when a judge is given; plus held-out Cohen's d
per layer and the cross-layer cosine matrix of the directions.

If one layer's direction removes (nearly) all refusal, and the directions of
the layers that work point the same way, refusal is one direction shared
across depth; if no single direction removes it, or several dissimilar ones
each remove part, it spans a low-rank subspace (test that directly with
``steerlab experiment subspace``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypedDict

import torch
from pydantic import Field

import steerlab.reporting.plots as plots
from steerlab.directions.separability import cosine_matrix
from steerlab.errors import SteerlabError
from steerlab.evaluate.stats import holm
from steerlab.experiments import common, measure
from steerlab.experiments import framework as fw
from steerlab.experiments import reporting as rp
from steerlab.experiments import summary as sm
from steerlab.experiments.config import RefusalExperimentConfig
from steerlab.experiments.runner import Condition, Job, Runner
from steerlab.interventions.specs import Ablate, Add, parse_layers
from steerlab.reporting.report import Figure, Table

if TYPE_CHECKING:
    from steerlab.directions.artifact import Direction
    from steerlab.model.loading import LoadedModel


class LayerTransferConfig(RefusalExperimentConfig):
    """Settings of ``steerlab experiment layer-transfer``."""

    source_layers: str | None = None
    """Source layers to test, e.g. '4-20' or '2,6,10' (default: every layer_stride-th
    layer)."""
    layer_stride: int = Field(default=1, ge=1)
    """Test every k-th layer when source_layers is not given."""
    mode: Literal["ablate", "subtract"] = "ablate"
    """ablate: project the source layer's unit vector out at every layer; subtract: add -alpha
    x the raw vector at the source layer."""
    subtract_alpha: float = Field(default=1.0, gt=0)
    """Strength of mode=subtract, in multiples of the raw vector."""
    removal_share: float = Field(default=0.8, gt=0, le=1)
    """A single direction 'removes refusal' when it removes at least this share of the
    baseline refusal rate."""
    similar_cosine: float = Field(default=0.5, ge=0, le=1)
    """Directions this cosine-similar count as the same direction."""


def source_layers(config: LayerTransferConfig, n_layers: int) -> list[int]:
    if config.source_layers is None:
        return list(range(0, n_layers, config.layer_stride))
    return list(parse_layers(config.source_layers, n_layers))


def run_layer_transfer(
    lm: LoadedModel, out_dir: str | Path, config: LayerTransferConfig, show_progress: bool = True
) -> fw.Results:
    """Run every step (resuming from ``out_dir``); write results, responses and report."""
    started = time.perf_counter()
    eval_set, harmless = fw.eval_prompts(config), fw.harmless_prompts(config)
    layers = source_layers(config, lm.n_layers)
    with fw.open_runner(lm, out_dir, config, show_progress) as run:
        run.plan((len(layers) + 1) * len(eval_set))
        refusal = run.direction("refusal", lambda: common.configured_refusal_direction(lm, config))
        analysis = run.step("analysis", lambda: _analysis(refusal, layers))
        conditions = [Condition("baseline", description="no intervention")]
        conditions += [_condition(refusal, s, config) for s in layers]
        run.run_many([Job(cond, eval_set, "eval") for cond in conditions])
        table = measure.summarise(run, conditions, eval_set, "baseline")
        kl = measure.kl_conditions(run, harmless, conditions, k=config.kl_tokens, seed=config.seed)
        judged = measure.add_judge(run, config, [table])
        results = fw.base_results(lm, "layer-transfer", eval_set, config)
        per_layer = [
            {"source_layer": s, **table[f"source/L{s}"],
             "cohens_d": analysis["cohens_d"].get(str(s)), **kl.get(f"source/L{s}", {})}
            for s in layers
        ]
        verdict = _verdict(table, per_layer, analysis, config)
        for entry in per_layer:  # the tables show the corrected p beside the raw one
            held = verdict["holm_p"][entry["source_layer"]]
            entry["vs_baseline_holm_p"] = table[f"source/L{entry['source_layer']}"][
                "vs_baseline_holm_p"] = held
        results.update(
            conditions=table, per_layer=per_layer, analysis=analysis, mode=config.mode,
            judged=judged, answer=verdict["answer"],
            best_source_layer=verdict["best_source_layer"],
            working_layers=verdict["working_layers"],
            rank_of_working=verdict["rank_of_working"], findings=verdict["findings"],
        )
        results["summary"] = (
            f"{rp.setup_sentence(results, config)} with a degeneracy check. Baseline refusal "
            f"{sm.rate(table['baseline'])}. Mode: {config.mode}. Answer on this model: "
            f"{verdict['answer']}."
        )
        fw.finish(run, lm, config, results, started)
    _report(Path(out_dir), results, run, config)
    return results


def _condition(refusal: Direction, source: int, config: LayerTransferConfig) -> Condition:
    if config.mode == "ablate":
        return Condition(
            f"source/L{source}",
            (Ablate(refusal, layers="all", source_layer=source),),
            description=f"layer {source}'s refusal direction ablated at every layer",
        )
    return Condition(
        f"source/L{source}",
        (Add(refusal, alpha=-config.subtract_alpha, layers=[source]),),
        description=f"{config.subtract_alpha:g} x layer {source}'s raw refusal "
        f"vector subtracted at layer {source}",
    )


def _analysis(refusal: Direction, layers: list[int]) -> dict[str, Any]:
    """Held-out Cohen's d per layer and the cross-layer cosine matrix of the directions."""
    cos = cosine_matrix(refusal.select(layers))
    d = common.cohens_d_of(refusal)
    return {
        "cohens_d": {str(k): v for k, v in d.items()},
        "best_layer_by_cohens_d": max(d, key=lambda k: d[k]),
        "selected_layer": common.best_layer(refusal),
        "selected_by": refusal.meta.extra.get("best_layer_by", ""),
        "selection": refusal.meta.extra.get("selection"),
        "layers": layers,
        "cosine_matrix": [[float(x) for x in row] for row in cos],
        "norms": {str(k): v for k, v in refusal.norms.items()},
    }


class TransferVerdict(TypedDict):
    """The answer to "one direction or a low-rank subspace?" and what it rests on."""

    answer: str
    findings: list[sm.Finding]
    working_layers: list[int]
    disruptive_layers: list[int]
    best_source_layer: int
    rank_of_working: dict[str, float]
    holm_p: dict[int, float]


@dataclass(frozen=True)
class _Scan:
    """What the verdict reads off the source-layer scan."""

    base: sm.Entry
    best: sm.Entry
    holm_p: dict[int, float]
    n_layers: int
    clean: bool
    works: list[int]
    disruptive: list[int]
    removed: float | None
    rank: dict[str, float]
    min_cos: float | None
    same_as_best: bool


def _verdict(
    table: dict[str, sm.Entry],
    per_layer: list[sm.Entry],
    analysis: dict[str, Any],
    config: LayerTransferConfig,
) -> TransferVerdict:
    """Answer "one direction or a low-rank subspace?" from the measured numbers.

    Every tested source layer is one test against baseline; a layer counts as lowering
    refusal only at Holm-corrected p < 0.05 over all of them, so scanning many layers
    and keeping the best cannot manufacture a finding. (Its rate is still the best of
    several and so optimistic; the evidence says so.)
    """
    scan = _scan(table["baseline"], per_layer, analysis, config)
    findings = [
        sm.Finding(
            claim="Ablating one refusal direction removes refusal (Arditi et al.)",
            verdict=_answer(scan, config)[1],
            evidence=_evidence(scan, per_layer, analysis, config),
        ),
        _same_direction_finding(scan, config),
    ]
    return TransferVerdict(
        answer=_answer(scan, config)[0], findings=findings, working_layers=scan.works,
        disruptive_layers=scan.disruptive, best_source_layer=scan.best["source_layer"],
        rank_of_working=scan.rank, holm_p=scan.holm_p,
    )


def _scan(base: sm.Entry, per_layer: list[sm.Entry], analysis: dict[str, Any],
          config: LayerTransferConfig) -> _Scan:
    if not per_layer:
        raise SteerlabError("No source layers were tested; give --source-layers.")
    layers = [e["source_layer"] for e in per_layer]
    holm_p = dict(zip(layers, holm([e["vs_baseline_p"] for e in per_layer]), strict=True))
    # A direction whose removal also rewrites harmless answers (first-token KL >= 0.1, the
    # Arditi et al. filter) is not a refusal direction, however much refusal it removes.
    clean = [e for e in per_layer if e.get("kl_first_token", 0.0) < sm.KL_THRESHOLD]

    def lowers(e: sm.Entry) -> bool:
        return bool(holm_p[e["source_layer"]] < sm.ALPHA_SIG
                    and e["refusal_rate"] < base["refusal_rate"])

    disruptive = [e["source_layer"] for e in per_layer if e not in clean and lowers(e)]
    best = min(clean or per_layer, key=lambda e: (e["refusal_rate"], -(e["cohens_d"] or 0.0)))
    works = [e["source_layer"] for e in clean if lowers(e)]
    cos = torch.tensor(analysis["cosine_matrix"])
    idx = [analysis["layers"].index(s) for s in works]
    units_cos = cos[idx][:, idx] if idx else torch.zeros(0, 0)
    best_i = analysis["layers"].index(best["source_layer"])
    return _Scan(
        base=base, best=best, holm_p=holm_p, n_layers=len(per_layer), clean=bool(clean),
        works=works, disruptive=disruptive,
        removed=(1 - best["refusal_rate"] / base["refusal_rate"]) if base["refusal_rate"]
        else None,
        rank=common.effective_rank(units_cos) if len(idx) > 1
        else {"participation_ratio": float(len(idx)), "k90": len(idx)},
        min_cos=float(units_cos.min()) if len(idx) > 1 else None,
        same_as_best=all(float(cos[best_i, i]) >= config.similar_cosine for i in idx),
    )


def _evidence(scan: _Scan, per_layer: list[sm.Entry], analysis: dict[str, Any],
              config: LayerTransferConfig) -> str:
    best, removed, kl = scan.best, scan.removed, f"{sm.KL_THRESHOLD:g}"
    evidence = (
        f"baseline {sm.rate(scan.base)}; best single source layer {best['source_layer']}: "
        f"{sm.rate(best)}, McNemar p={best['vs_baseline_p']:.3g} "
        f"(Holm-corrected over the {scan.n_layers} source layers: "
        f"{scan.holm_p[best['source_layer']]:.3g})"
        + (f", removes {removed:.0%} of baseline refusal" if removed is not None else "")
        + ". The best layer is picked on the evaluation prompts, so its rate is "
        "optimistic; its significance is corrected for the pick"
    )
    selected = next(
        (e for e in per_layer if e["source_layer"] == analysis.get("selected_layer")), None
    )
    if selected is not None:
        evidence += (
            f"; the layer chosen on the validation split beforehand ({selected['source_layer']})"
            f" gives {sm.rate(selected)}, McNemar p={selected['vs_baseline_p']:.3g}."
        )
    else:
        evidence += "."
    if scan.disruptive:
        evidence += (
            f" Not counted: source layer(s) {fw.span(scan.disruptive)} lower refusal only while "
            f"disturbing harmless prompts (first-token KL >= {kl})."
        )
    if not scan.clean:
        evidence += f" No source layer keeps first-token KL < {kl}."
    lo, hi = scan.base["refusal_rate_ci95"]
    return (f"{evidence} Removal criterion: at least {config.removal_share:.0%} of the "
            f"baseline rate (baseline CI [{lo:.0%}, {hi:.0%}]).")


def _answer(scan: _Scan, config: LayerTransferConfig) -> tuple[str, str]:
    """The answer sentence and the verdict of the one-direction claim."""
    best, removed, works, rank = scan.best, scan.removed, scan.works, scan.rank
    if not scan.base["refusal_rate"]:
        return "undetermined: the model does not refuse these prompts at baseline", "inconclusive"
    if scan.holm_p[best["source_layer"]] >= sm.ALPHA_SIG or not scan.clean:
        return (
            "no single direction measurably lowers refusal here without disturbing harmless "
            "prompts; the direction is not the mechanism on this model, or n is too small"
            + (f" (layer(s) {fw.span(scan.disruptive)} lower it only with first-token KL >= "
               f"{sm.KL_THRESHOLD:g})" if scan.disruptive else ""),
            "not reproduced",
        )
    if removed is not None and removed >= config.removal_share:
        return (
            f"one direction: ablating layer {best['source_layer']}'s direction removes "
            f"{removed:.0%} of refusal"
            + (f", and the {len(works)} source layers whose direction works point the same "
               f"way (cosine with the best ≥ {config.similar_cosine:g})"
               if scan.same_as_best
               else f"; the {len(works)} working source layers include dissimilar directions "
               f"(effective rank {rank['k90']} by 90% energy), so several near-equivalent "
               "readouts exist"),
            "reproduced",
        )
    return (
        f"low-rank subspace (or partial mediation): the best single direction removes "
        f"only {removed:.0%} of refusal; {len(works)} source layers help, effective "
        f"rank {rank['k90']} by 90% energy. Test the subspace with "
        "`steerlab experiment subspace`",
        "not reproduced",
    )


def _same_direction_finding(scan: _Scan, config: LayerTransferConfig) -> sm.Finding:
    claim = ("The directions that remove refusal at different source layers are one "
             "direction (high cross-layer cosine)")
    kl = f"first-token KL < {sm.KL_THRESHOLD:g}"
    if len(scan.works) <= 1:
        return sm.Finding(
            claim=claim, verdict="inconclusive",
            evidence=f"only {len(scan.works)} source layer(s) lower refusal at Holm-corrected "
            f"p<0.05 with {kl}, too few to compare.",
        )
    return sm.Finding(
        claim=claim,
        verdict="reproduced" if scan.min_cos is not None and scan.min_cos >= config.similar_cosine
        else "not reproduced",
        evidence=f"{len(scan.works)} source layers ({fw.span(scan.works)}) lower refusal at "
        f"Holm-corrected p<0.05 with {kl}; smallest pairwise cosine among them "
        f"{scan.min_cos:.2f}; participation ratio {scan.rank['participation_ratio']:.2f}, "
        f"{scan.rank['k90']} component(s) hold 90% of their energy.",
    )


def _report(out: Path, results: fw.Results, run: Runner, config: LayerTransferConfig) -> Path:
    return rp.write_experiment_report(
        out, results, run.store, config,
        title="steerlab: refusal direction transfer across layers",
        tables=_tables(results, config), figures=_figures(out / "figures", results, config),
        show=["baseline", f"source/L{results['best_source_layer']}",
              f"source/L{results['analysis']['selected_layer']}"],
    )


def _figures(figs: Path, results: fw.Results, config: LayerTransferConfig) -> list[Figure]:
    per = results["per_layer"]
    base = results["conditions"]["baseline"]
    analysis = results["analysis"]
    layers = [e["source_layer"] for e in per]
    kl_key = "kl_first_token"
    fig_list = [
        Figure(
            plots.rate_by_layer(
                figs / "refusal_by_source_layer.png",
                layers,
                [e["refusal_rate"] for e in per],
                [e["refusal_rate_ci95"] for e in per],
                title=f"Refusal with each source layer's direction {config.mode}d",
                ylabel="refusal rate",
                references={"baseline": (base["refusal_rate"], base["refusal_rate_ci95"])},
            ),
            "Refusal rate (95% Wilson CI) on harmful prompts when the refusal direction read at "
            "each source layer is removed; dashed: no intervention.",
        ),
        rp.cohens_d_lines(
            figs,
            {"Cohen's d (held-out harmful vs harmless)": analysis["cohens_d"]},
            "Held-out Cohen's d of the projection on each layer's refusal direction.",
            title="Separability of the projection on each layer's direction",
        ),
        Figure(
            plots.matrix_heatmap(
                figs / "cosine_matrix.png",
                [str(x) for x in layers],
                [str(x) for x in layers],
                analysis["cosine_matrix"],
                title="Cosine between the refusal directions of layers",
                row_label="layer",
                col_label="layer",
                value_label="cosine",
            ),
            "Cross-layer cosine similarity of the per-layer refusal directions.",
        ),
    ]
    if all(kl_key in e for e in per):
        fig_list.append(rp.layer_lines(
            figs / "kl_by_source_layer.png",
            {
                "first-token KL": {e["source_layer"]: e[kl_key] for e in per},
                f"mean KL, first {config.kl_tokens} tokens": {
                    e["source_layer"]: e[f"kl_first_{config.kl_tokens}"] for e in per
                },
            },
            "How much removing each source layer's direction changes harmless next-token "
            "distributions.",
            title="KL(base ‖ ablated) on harmless prompts",
            ylabel="KL (nats)",
        ))
    return fig_list


def _tables(results: fw.Results, config: LayerTransferConfig) -> list[Table]:
    per = results["per_layer"]
    return [
        rp.condition_table(
            "Refusal by source layer",
            results["conditions"],
            judged=bool(results["judged"]),
            extra=["vs_baseline_holm_p"],
            note="p: exact McNemar test against the baseline on the same prompts; Holm p: "
            "corrected over all source layers tested (what the verdicts use); intervals: "
            "Wilson 95%.",
        ),
        rp.kl_table(
            "Harmless prompts: KL by source layer",
            {
                f"source/L{e['source_layer']}": {k: v for k, v in e.items() if k.startswith("kl_")}
                for e in per
                if "kl_n" in e
            },
            config.kl_tokens,
        ),
    ]


EXPERIMENT = fw.Experiment("layer-transfer", LayerTransferConfig, run_layer_transfer)
