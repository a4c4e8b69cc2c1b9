"""The shape every experiment has: a config, a resumable runner over its output folder,
held-out prompts, and a results.json stamped with provenance.

Each experiment module declares ``EXPERIMENT = Experiment(...)``; the CLI runs every
one through the same path (``steerlab experiment NAME``, ``steerlab reproduce ...``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steerlab.experiments.config import ExperimentConfig
from steerlab.experiments.measure import check_judge
from steerlab.experiments.runner import Runner
from steerlab.prompts.sets import PromptSet, check_held_out, load_prompts
from steerlab.store.atomic import write_json
from steerlab.store.provenance import provenance

if TYPE_CHECKING:
    from steerlab.model.loading import LoadedModel

Results = dict[str, Any]


@dataclass(frozen=True)
class Experiment:
    """An experiment as the CLI sees it: a name, its settings and its run function
    ``run(lm, out_dir, config, show_progress=True) -> results``."""

    name: str
    config: type[ExperimentConfig]
    run: Callable[..., Results]


def open_runner(lm: LoadedModel, out_dir: str | Path, config: ExperimentConfig,
                show_progress: bool = True) -> Runner:
    """The experiment's resumable :class:`Runner` (a configured judge is checked first)."""
    check_judge(config)
    return Runner(
        lm,
        out_dir,
        max_new_tokens=config.max_new_tokens,
        batch_size=config.batch_size,
        show_progress=show_progress,
        settings=config.model_dump(mode="json"),
    )


def eval_prompts(config: ExperimentConfig) -> PromptSet:
    """The evaluation prompts, checked to share none with the built-in sets' train and
    validation splits, where the experiments extract directions and choose layers."""
    prompts = load_prompts(config.eval_prompts, split=config.eval_split, limit=config.limit)
    check_held_out(prompts, [(role, load_prompts(name, split=split))
                             for name in ("paired", "tier2")
                             for role, split in (("extraction", "train"),
                                                 ("validation", "val"))])
    return prompts


def harmless_prompts(config: ExperimentConfig) -> PromptSet:
    return load_prompts(
        config.harmless_prompts, split=config.harmless_split, limit=config.harmless_limit
    )


def base_results(lm: LoadedModel, experiment: str, eval_set: PromptSet,
                 config: ExperimentConfig) -> Results:
    return {
        "experiment": experiment,
        "model": lm.name,
        "fingerprint": lm.fingerprint,
        "n_eval": len(eval_set),
        "eval_prompts": f"{config.eval_prompts} ({config.eval_split or 'all'})",
        "max_new_tokens": config.max_new_tokens,
    }


def finish(run: Runner, lm: LoadedModel, config: ExperimentConfig, results: Results,
           started: float) -> Results:
    """Stamp provenance and timings, then write ``results.json`` atomically."""
    results["provenance"] = provenance(lm, config=config, seed=config.seed)
    results["timings"] = {
        **run.timings.as_dict(),
        "wall_seconds_this_run": time.perf_counter() - started,
    }
    write_json(Path(run.out) / "results.json", results)
    return results


def span(layers: Sequence[int]) -> str:
    """``4-7`` for a run of consecutive layers, else ``2,6,10``."""
    items = sorted(layers)
    if len(items) > 1 and items == list(range(items[0], items[-1] + 1)):
        return f"{items[0]}-{items[-1]}"
    return ",".join(map(str, items))
