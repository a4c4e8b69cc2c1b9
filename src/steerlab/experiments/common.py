"""What the refusal-structure experiments share (layer transfer, subspace,
positions, hydra): contrast sets, directions extracted on the model *as it is
under an intervention*, condition tables with paired tests, and the pieces of
their reports and results.json that are the same everywhere.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steerlab import plots
from steerlab._atomic import write_json
from steerlab.directions import Direction
from steerlab.errors import DataError
from steerlab.experiments.runner import (
    Condition,
    Runner,
    check_judge,
    condition_summary,
    judge_conditions,
    paired_p,
)
from steerlab.report import Figure, Finding, Report, Sample, Table

if TYPE_CHECKING:
    from steerlab.experiments.config import ExperimentConfig
    from steerlab.experiments.store import ResponseStore
    from steerlab.model import LoadedModel
    from steerlab.prompts import PromptSet

ALPHA_SIG = 0.05
KL_THRESHOLD = 0.1  # select_direction's default KL filter


def damage_note(name: str, kl_entry: Mapping[str, Any] | None) -> str:
    """Evidence text when ``name`` moves harmless prompts (first-token KL ≥ KL_THRESHOLD).

    Empty when its KL is below the threshold or was not measured. Verdicts use it to
    keep a refusal drop that comes with damage from counting as removal.
    """
    value = (kl_entry or {}).get("kl_first_token")
    if value is None or value < KL_THRESHOLD:
        return ""
    return (
        f" But {name} also moves harmless prompts (first-token KL {value:.2f} ≥ "
        f"{KL_THRESHOLD:g}), so part of the drop may be damage, not removal."
    )


RATE_KEYS = (
    "n",
    "refusal_rate",
    "refusal_rate_ci95",
    "bypass_rate",
    "degenerate_rate",
    "vs_baseline_p",
)
COND_COLUMNS = ["condition", *RATE_KEYS]
JUDGE_COLUMNS = [
    "judge_compliance",
    "judge_compliance_ci95",
    "judge_coherence",
    "judge_coherence_ci95",
]


# -- prompts and directions -------------------------------------------------------------------
def contrast_pairs(
    source: str, split: str, limit: int | None = None
) -> tuple[list[str], list[str]]:
    """(harmful, harmless) twins of a built-in paired set (``paired``, ``tier2``) by pair_id."""
    from steerlab.prompts import load_prompts

    harmful = {p.pair_id: p.prompt for p in load_prompts(source, split=split, label="harmful")}
    harmless = {p.pair_id: p.prompt for p in load_prompts(source, split=split, label="harmless")}
    ids = sorted(set(harmful) & set(harmless), key=str)[:limit]
    if len(ids) < 2:
        raise DataError(
            f"The built-in set {source!r} has {len(ids)} harmful/harmless pairs in "
            f"split {split!r}; at least 2 are needed. Use another split or set."
        )
    return [harmful[i] for i in ids], [harmless[i] for i in ids]


@contextmanager
def steered(lm: LoadedModel, specs: Sequence[Any]) -> Iterator[None]:
    """``steer(lm, specs)`` when there are specs, else nothing (the unhooked model)."""
    if not specs:
        yield
        return
    from steerlab.steering import steer

    with steer(lm, list(specs)):
        yield


def refusal_direction_of(
    lm: LoadedModel,
    source: str = "paired",
    *,
    split: str = "train",
    select_split: str = "val",
    position: str = "last",
    limit: int | None = None,
    name: str = "refusal",
    under: Sequence[Any] = (),
    under_note: str = "",
    batch_size: int = 32,
    selection: str = "ablation",
    selection_limit: int = 16,
    selection_stride: int = 2,
) -> Direction:
    """Harmful-minus-harmless direction of a built-in paired set on every layer, with
    held-out Cohen's d per layer and ``meta.best_layer`` chosen on ``select_split``.

    ``selection="ablation"`` picks the layer as Arditi et al. do (their section 2.4):
    among the middle layers, the one whose direction, ablated at every layer, most
    lowers the first-token refusal score of held-out harmful prompts, while adding it
    induces refusal and ablating it keeps KL on harmless prompts small
    (:func:`steerlab.analysis.select_direction` on ``selection_limit`` prompts per
    side, every ``selection_stride``-th layer). ``"cohens_d"`` takes the layer of
    largest held-out Cohen's d (cheaper, but separability peaks at late layers whose
    direction is often not the one that mediates refusal).

    With ``under`` (intervention specs) the activations are read, Cohen's d measured
    and the layer selected while those interventions are active: the direction of the
    model as it is after them (what hydra re-extraction needs).
    """
    from steerlab.analysis import cohens_d
    from steerlab.extraction import extract_direction

    if selection not in ("ablation", "cohens_d"):
        raise DataError(f"Unknown layer selection {selection!r}; use 'ablation' or 'cohens_d'.")
    harmful, harmless = contrast_pairs(source, split, limit)
    val_harmful, val_harmless = contrast_pairs(source, select_split, limit)
    with steered(lm, under):
        direction = extract_direction(
            lm,
            harmful,
            harmless,
            position=position,
            name=name,
            kind="refusal",
            batch_size=batch_size,
            datasets={
                "positive": f"{source}:harmful:{split}",
                "negative": f"{source}:harmless:{split}",
            },
        )
        d = cohens_d(
            lm, direction, val_harmful, val_harmless, position=position, batch_size=batch_size
        )
        chosen: dict[str, Any] = {}
        if selection == "ablation":
            chosen = _select_by_ablation(
                lm,
                direction,
                val_harmful[:selection_limit],
                val_harmless[:selection_limit],
                selection_stride,
                batch_size,
            )
    best = chosen.get("layer", max(d, key=lambda layer: d[layer]))
    how = chosen.get("rule", f"largest Cohen's d on held-out {source}:{select_split}")
    extra = {
        **direction.meta.extra,
        "cohens_d": {str(k): v for k, v in d.items()},
        "best_layer_by": f"{how} ({source}:{select_split})",
        "extracted_under": under_note or ("nothing" if not under else f"{len(under)} specs"),
    }
    if chosen:
        extra["selection"] = chosen["table"]
    meta = dataclasses.replace(direction.meta, best_layer=best, extra=extra)
    return Direction(direction.vectors, direction.layers, meta)


def _select_by_ablation(
    lm: LoadedModel,
    direction: Direction,
    harmful: list[str],
    harmless: list[str],
    stride: int,
    batch_size: int,
) -> dict[str, Any]:
    """Arditi et al.'s causal layer choice on held-out prompts (see refusal_direction_of)."""
    from steerlab.analysis import select_direction

    n = lm.n_layers
    lo, hi = int(0.2 * n), max(int(0.2 * n) + 1, int(0.8 * n))
    result = select_direction(
        lm,
        direction,
        harmful,
        harmless,
        layers=list(range(lo, hi, max(1, stride))),
        kl_threshold=KL_THRESHOLD,
        batch_size=batch_size,
    )
    layer, rule = result.choice()
    return {"layer": int(layer), "rule": rule, "table": result.to_dict()}


def configured_refusal_direction(
    lm: LoadedModel, config: ExperimentConfig, source: str = "paired", **overrides: Any
) -> Direction:
    """:func:`refusal_direction_of` with the config's read position, extraction limit and
    layer selection; ``overrides`` (e.g. ``name``, ``split``, ``under``) take precedence.

    One place, so every experiment extracts its reference direction the same way.
    """
    settings: dict[str, Any] = {
        "position": config.position,
        "limit": config.extraction_limit,
        **selection_of(config),
        **overrides,
    }
    return refusal_direction_of(lm, source, **settings)


def selection_of(config: ExperimentConfig) -> dict[str, Any]:
    """The layer-selection keywords of :func:`refusal_direction_of` from a config."""
    return {
        "selection": config.layer_selection,
        "selection_limit": config.selection_limit,
        "selection_stride": config.selection_stride,
    }


def cohens_d_of(direction: Direction) -> dict[int, float]:
    """The held-out per-layer Cohen's d stored by :func:`refusal_direction_of`."""
    return {int(k): float(v) for k, v in direction.meta.extra.get("cohens_d", {}).items()}


def best_layer(direction: Direction) -> int:
    if direction.meta.best_layer is None:
        raise DataError(
            f"Direction {direction.meta.name!r} has no best layer; extract it with "
            "refusal_direction_of (held-out Cohen's d picks one)."
        )
    return int(direction.meta.best_layer)


def effective_rank(gram: Any, share: float = 0.9) -> dict[str, float]:
    """Participation ratio and the number of components holding ``share`` of the energy of
    a set of unit vectors, from their Gram (cosine) matrix: 1 when they are one direction."""
    import torch

    eig = torch.linalg.eigvalsh(torch.as_tensor(gram, dtype=torch.float64)).clamp_min(0)
    eig = eig.flip(0)
    total = float(eig.sum())
    key = f"k{int(share * 100)}"
    if total == 0:
        return {"participation_ratio": 0.0, key: 0}
    cum = torch.cumsum(eig, 0) / total
    k = int((cum < share - 1e-12).sum()) + 1
    return {"participation_ratio": total**2 / float((eig**2).sum()), key: k}


# -- running ----------------------------------------------------------------------------------
def open_runner(
    lm: LoadedModel, out_dir: str | Path, config: ExperimentConfig, show_progress: bool = True
) -> Runner:
    """The experiment's resumable :class:`Runner`, generating as the config says (the
    judge, when one is set, is checked first)."""
    if config.judge_url:
        check_judge(config.judge_url, config.judge_model)
    return Runner(
        lm,
        out_dir,
        max_new_tokens=config.max_new_tokens,
        batch_size=config.batch_size,
        show_progress=show_progress,
        settings=config.model_dump(mode="json"),
    )


# -- conditions and tables --------------------------------------------------------------------
def rows_of(run: Runner, name: str, prompts: PromptSet) -> list[dict[str, Any]]:
    ids = {p.id for p in prompts}
    return [r for r in run.rows(name) if r["prompt_id"] in ids]


def summarise(
    run: Runner, conditions: Sequence[Condition], prompts: PromptSet, reference: str
) -> dict[str, dict[str, Any]]:
    """Rates with Wilson intervals per condition and the McNemar p against ``reference``."""
    ref = rows_of(run, reference, prompts)
    out = {}
    for cond in conditions:
        rows = rows_of(run, cond.name, prompts)
        entry = {**condition_summary(rows), "description": cond.description}
        entry["vs_baseline_p"] = None if cond.name == reference else paired_p(rows, ref)
        out[cond.name] = entry
    return out


def add_judge(
    run: Runner, config: ExperimentConfig, tables: Sequence[dict[str, dict[str, Any]]]
) -> bool:
    """Merge judged compliance/coherence into each condition entry when a judge is set."""
    if not config.judge_url:
        return False
    names = [name for table in tables for name in table]
    judged = judge_conditions(run, names, config.judge_url, config.judge_model, seed=config.seed)
    for table in tables:
        for name, entry in table.items():
            entry.update(judged.get(name, {}))
    return True


def newcombe_diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Difference of two independent rates (``a - b``) with Newcombe's hybrid-score 95% CI,
    built from each rate's Wilson interval (for rates on different prompt sets)."""
    p1, (l1, u1) = a["refusal_rate"], a["refusal_rate_ci95"]
    p2, (l2, u2) = b["refusal_rate"], b["refusal_rate_ci95"]
    diff = p1 - p2
    lo = diff - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    hi = diff + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return {"diff": diff, "ci95": [max(-1.0, lo), min(1.0, hi)]}


def random_control_finding(
    random: Mapping[str, Any], baseline: Mapping[str, Any]
) -> dict[str, str]:
    """The random same-rank subspace control: reproduced when it leaves refusal unchanged
    (McNemar p against the baseline at least :data:`ALPHA_SIG`)."""
    return {
        "claim": "A random subspace of the same rank does nothing",
        "verdict": "reproduced" if random["vs_baseline_p"] >= ALPHA_SIG else "not reproduced",
        "evidence": f"{rate(random, 'random_subspace')} vs {rate(baseline, 'baseline')}, "
        f"McNemar p={random['vs_baseline_p']:.3g}.",
    }


def setup_sentence(results: Mapping[str, Any], config: ExperimentConfig) -> str:
    """The opening of a summary: model, evaluation prompts, decoding and scoring."""
    return (
        f"Model {results['model']} (fingerprint {results['fingerprint']}), "
        f"{results['n_eval']} harmful evaluation prompts from {results['eval_prompts']}, "
        f"greedy {config.max_new_tokens} new tokens, substring refusal scoring"
    )


def rate(entry: Mapping[str, Any], name: str = "") -> str:
    """``name 45% [30%, 61%] (n=32)`` for findings and summaries."""
    lo, hi = entry["refusal_rate_ci95"]
    head = f"{name} " if name else ""
    return f"{head}{entry['refusal_rate']:.0%} [{lo:.0%}, {hi:.0%}] (n={entry['n']})"


def condition_table(
    title: str,
    entries: Mapping[str, dict[str, Any]],
    *,
    names: Sequence[str] | None = None,
    judged: bool = False,
    extra: Sequence[str] = (),
    note: str = "",
) -> Table:
    chosen = list(names) if names is not None else list(entries)
    columns = [*COND_COLUMNS, *extra, *(JUDGE_COLUMNS if judged else []), "description"]
    rows = [{"condition": n, **entries[n]} for n in chosen if n in entries]
    return Table(
        title,
        columns,
        rows,
        note=note
        or "p: exact McNemar test against the baseline on the same prompts; intervals: Wilson 95%.",
    )


def kl_table(title: str, kl: Mapping[str, dict[str, Any]], k: int, note: str = "") -> Table:
    columns = [
        "condition",
        "kl_n",
        "kl_first_token",
        "kl_first_token_ci95",
        f"kl_first_{k}",
        f"kl_first_{k}_ci95",
    ]
    return Table(
        title,
        columns,
        [{"condition": n, **v} for n, v in kl.items()],
        note=note
        or f"KL(base ‖ steered) in nats on harmless prompts: at the first "
        f"response token and averaged over the first {k} baseline tokens "
        "(teacher-forced); bootstrap 95% intervals.",
    )


def selection_table(title: str, selection: dict[str, Any] | None) -> list[Table]:
    """The layer-selection scores (Arditi et al.) as a table, when a selection ran."""
    if not selection:
        return []
    return [
        Table(
            title,
            ["layer", "bypass_score", "induce_score", "kl", "passed", "reason"],
            selection["rows"],
            note=f"First-token refusal score (log-odds of refusal tokens "
            f"{', '.join(selection['refusal_tokens'])}) on {selection['n_harmful']} held-out "
            f"harmful prompts with the direction ablated (bypass, lower is better; baseline "
            f"{selection['baseline_harmful']:.2f}) and on {selection['n_harmless']} harmless "
            f"prompts with it added (induce; baseline {selection['baseline_harmless']:.2f}); "
            "KL on harmless prompts with it ablated. Ranked: passing layers first.",
        )
    ]


def refusal_bars(
    path: Path, entries: Mapping[str, Mapping[str, Any]], names: Sequence[str], *, title: str
) -> Path:
    """Bar chart of the refusal rate (95% Wilson CI) of the conditions ``names``."""
    return plots.bars_with_ci(
        path,
        list(names),
        [entries[n]["refusal_rate"] for n in names],
        [entries[n]["refusal_rate_ci95"] for n in names],
        title=title,
        ylabel="refusal rate",
    )


def samples(store: ResponseStore, names: Sequence[str], n: int) -> list[Sample]:
    """The first ``n`` rows of each condition by prompt id: the same prompts across
    conditions, whatever order the rows finished in."""
    out = []
    for name in names:
        for row in sorted(store.rows(name), key=lambda r: str(r["prompt_id"]))[:n]:
            out.append(Sample(name, row["prompt"], row["response"], row["outcome"]))
    return out


# -- results ----------------------------------------------------------------------------------
def base_results(
    lm: LoadedModel, experiment: str, eval_set: PromptSet, config: ExperimentConfig
) -> dict[str, Any]:
    return {
        "experiment": experiment,
        "model": lm.name,
        "fingerprint": lm.fingerprint,
        "n_eval": len(eval_set),
        "eval_prompts": f"{config.eval_prompts} ({config.eval_split or 'all'})",
        "max_new_tokens": config.max_new_tokens,
    }


def finish(
    run: Runner, lm: LoadedModel, config: ExperimentConfig, results: dict[str, Any], started: float
) -> dict[str, Any]:
    """Stamp provenance and timings, then write ``results.json`` atomically."""
    from steerlab.provenance import provenance

    results["provenance"] = provenance(lm, config=config, seed=config.seed)
    results["timings"] = {
        **run.timings.as_dict(),
        "wall_seconds_this_run": time.perf_counter() - started,
    }
    write_json(Path(run.out) / "results.json", results)
    return results


def write_report(
    out: Path,
    results: Mapping[str, Any],
    run: Runner,
    config: ExperimentConfig,
    *,
    title: str,
    tables: Sequence[Table],
    figures: Sequence[Figure],
    sample_names: Sequence[str],
) -> Path:
    """Write ``report.html`` and ``report.md``: the summary, findings and provenance from
    ``results``, the given tables and figures, and sample responses of ``sample_names``."""
    report = Report(
        title=title,
        summary=results["summary"],
        findings=[Finding(**f) for f in results["findings"]],
        tables=list(tables),
        figures=list(figures),
        samples=samples(run.store, sample_names, config.n_samples),
        provenance=results["provenance"],
    )
    html, _ = report.write(out)
    return html


def eval_prompts(config: ExperimentConfig) -> PromptSet:
    """The evaluation prompts, checked to share none with the built-in sets' train and
    validation splits, where the experiments extract directions and choose layers."""
    from steerlab.prompts import check_held_out, load_prompts

    prompts = load_prompts(config.eval_prompts, split=config.eval_split, limit=config.limit)
    check_held_out(prompts, [(role, load_prompts(name, split=split))
                             for name in ("paired", "tier2")
                             for role, split in (("extraction", "train"),
                                                 ("validation", "val"))])
    return prompts


def harmless_prompts(config: ExperimentConfig) -> PromptSet:
    from steerlab.prompts import load_prompts

    return load_prompts(
        config.harmless_prompts, split=config.harmless_split, limit=config.harmless_limit
    )


def span(layers: Sequence[int]) -> str:
    items = sorted(layers)
    if len(items) > 1 and items == list(range(items[0], items[-1] + 1)):
        return f"{items[0]}-{items[-1]}"
    return ",".join(map(str, items))
