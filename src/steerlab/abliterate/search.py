"""``abliterate(lm, out)``: search the refusal/KL trade-off and write an ordinary artifact.

Steps (each resumable from the run folder ``out``):

1. load the prompts and check the folder's identity (``study.json``);
2. measure the unedited model on the validation prompts (``baseline.json``);
   a model that refuses nothing there stops here, before anything is searched;
3. extract the candidate directions (``candidates/POSITION/``);
4. run the Optuna study (``study.db``) up to the trial budget;
5. choose a trial by the stated rule and write ``direction/``, ``spec.json``
   (accepted by every ``--steer``), ``trials.json``, ``choice.json`` and
   ``manifest.json`` (config, seed, sampler, budget, versions, model
   fingerprint, hashes of the prompts and prompt files).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from steerlab.abliterate.candidates import extract_candidates
from steerlab.abliterate.choice import Choice, choose, pareto_numbers
from steerlab.abliterate.config import AbliterateConfig
from steerlab.abliterate.heldout import run_heldout
from steerlab.abliterate.objective import Objective, TrialScore
from steerlab.abliterate.priors import enqueue_priors, plain_ablation, selections
from steerlab.abliterate.progress import SearchDisplay, search_progress
from steerlab.abliterate.report import write_report
from steerlab.abliterate.scoring import RefusalScorer, make_scorer
from steerlab.abliterate.space import to_spec
from steerlab.abliterate.study import (
    STUDY_JSON,
    check_identity,
    finished,
    open_study,
    run_trials,
    score_of,
    text_hash,
)
from steerlab.directions.artifact import Direction
from steerlab.errors import SteerlabError
from steerlab.interventions.specs import KernelAblate, specs_to_json
from steerlab.model.loading import LoadedModel
from steerlab.prompts.sets import load_prompts
from steerlab.store.atomic import write_json, write_text
from steerlab.store.outputs import output_dir
from steerlab.store.provenance import provenance, versions

BASELINE_JSON = "baseline.json"
SPEC_JSON = "spec.json"
DIRECTION_DIR = "direction"


class NothingToRemoveError(SteerlabError):
    """The unedited model refuses none of the harmful validation prompts."""


@dataclass(frozen=True)
class AbliterateResult:
    """What a finished search produced (paths are inside the run folder)."""

    out: Path
    baseline: TrialScore
    choice: Choice
    spec: KernelAblate
    n_trials: int
    heldout: dict[str, Any] | None = None


def load_texts(source: str, split: str | None, limit: int | None) -> list[str]:
    """A prompt file (no split) or a built-in set (``split``), first ``limit`` prompts."""
    if limit == 0:
        return []
    is_file = Path(source).expanduser().exists()
    return load_prompts(source, split=None if is_file else split, limit=limit).texts()


def prompt_sets(config: AbliterateConfig) -> dict[str, list[str]]:
    """Every prompt set the search reads, by role."""
    c = config
    return {
        "harmful_train": load_texts(c.harmful_train, c.train_split, c.train_limit),
        "harmless_train": load_texts(c.harmless_train, c.train_split, c.train_limit),
        "harmful_val": load_texts(c.harmful_val, c.val_split, c.harmful_val_limit),
        "harmless_val": load_texts(c.harmless_val, c.val_split, c.harmless_val_limit),
        "over_refusal": load_texts(c.over_refusal, c.over_refusal_split, c.over_refusal_limit),
    }


def file_hashes(config: AbliterateConfig) -> dict[str, str]:
    """SHA-256 of each prompt file the settings name (built-in sets: their name)."""
    out = {}
    for role in ("harmful_train", "harmless_train", "harmful_val", "harmless_val",
                 "over_refusal"):
        source = getattr(config, role)
        path = Path(source).expanduser()
        out[role] = (hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file()
                     else f"built-in {source}")
    return out


def identity(lm: LoadedModel, config: AbliterateConfig, prompts: dict[str, list[str]],
             scorer: RefusalScorer) -> dict[str, Any]:
    """What every trial depends on (see :func:`steerlab.abliterate.study.check_identity`)."""
    return {"model_fingerprint": lm.fingerprint, "model_name": lm.name,
            "settings": config.identity(), "scorer": scorer.describe(),
            "prompts": {role: {"n": len(t), "sha256": text_hash(t)}
                        for role, t in prompts.items()}}


def baseline(out: Path, objective: Objective) -> TrialScore:
    """The unedited model's validation scores (``baseline.json``, reused on resume)."""
    path = out / BASELINE_JSON
    if path.is_file():
        return TrialScore(**json.loads(path.read_text())["score"])
    score = objective([])
    if score.refusals == 0:
        raise NothingToRemoveError(
            f"The unedited model refuses none of the {score.n_harmful} harmful validation "
            "prompts: there is no refusal to remove. Check the harmful prompt set "
            "(harmful_val in --config) or the scorer; nothing was searched."
        )
    return score


def abliterate(lm: LoadedModel, out: str | Path, config: AbliterateConfig | None = None, *,
               scorer: RefusalScorer | None = None, progress: bool = False) -> AbliterateResult:
    """Search per-layer ablation kernels for ``lm`` and write the chosen spec to ``out``.

    Resumes from ``out``: finished trials are kept; a folder made with another
    model or other settings is refused.

    Example:
        >>> result = abliterate(lm, "runs/abl", AbliterateConfig(trials=40))  # doctest: +SKIP
        >>> result.choice.score.refusals, result.choice.score.kl              # doctest: +SKIP
        (1, 0.026)
    """
    config = config or AbliterateConfig()
    run_dir = Path(out)
    prompts = prompt_sets(config)
    scorer = scorer or make_scorer(config.judge_url, config.judge_model, config.classifier)
    ident = identity(lm, config, prompts, scorer)
    if run_dir.exists():  # a file, or a folder of something else, is refused before any compute
        output_dir(run_dir, what="steerlab abliterate",
                   ours=lambda folder: (folder / STUDY_JSON).is_file())
    if (run_dir / STUDY_JSON).is_file():
        check_identity(run_dir, ident)  # refuses a foreign folder before any compute
    objective = Objective(lm, prompts["harmful_val"], prompts["harmless_val"],
                          prompts["over_refusal"], scorer, config.max_new_tokens,
                          config.batch_size)
    base = baseline(run_dir, objective)
    run_dir.mkdir(parents=True, exist_ok=True)
    check_identity(run_dir, ident)
    write_json(run_dir / BASELINE_JSON, {"score": base.to_dict(), "scorer": scorer.describe()})
    candidates = extract_candidates(
        lm, run_dir, prompts["harmful_train"], prompts["harmless_train"], config.positions,
        batch_size=config.batch_size,
        datasets={"positive": config.harmful_train, "negative": config.harmless_train})
    val = {"harmful": prompts["harmful_val"], "harmless": prompts["harmless_val"]}
    study = open_study(run_dir, sampler=config.sampler, seed=config.seed,
                       startup_trials=config.startup_trials)
    if config.prior_trials:
        enqueue_priors(study, selections(lm, run_dir, candidates, **val, kl_cap=config.kl_cap,
                                         batch_size=config.batch_size), lm.n_layers)
    done = finished(study)
    with search_progress(progress) as bar:
        display = SearchDisplay(bar, config.trials, min(len(done), config.trials), config.kl_cap)
        for trial in done:
            display.offer(score_of(trial))
        run_trials(study, objective, candidates, config.trials, max_rank=config.max_rank,
                   on_trial=display)
    trials = finished(study)
    choice = choose(trials, config.kl_cap)
    spec = write_result(lm, run_dir, config, choice, candidates, trials)
    heldout = None
    if config.evaluate:
        position = choice.trial.params["position"]
        selection = selections(lm, run_dir, {position: candidates[position]}, **val,
                               kl_cap=config.kl_cap, batch_size=config.batch_size)[position]
        heldout = run_heldout(lm, run_dir, config, spec, choice.trial.number,
                              plain_ablation(candidates[position], selection), selection)
    write_report(run_dir)
    return AbliterateResult(run_dir, base, choice, spec, len(trials), heldout)


def chosen_spec(choice: Choice, candidates: dict[str, Direction]) -> tuple[KernelAblate,
                                                                           Direction]:
    """The chosen trial's spec with its direction inlined (cut to the layers it reads), and
    the full candidate direction it came from."""
    full = candidates[choice.trial.params["position"]]
    spec = to_spec(choice.trial.params, full)
    lo, hi, extra = spec.layers_used(full)
    small = full.select(sorted({lo, hi, *extra}))
    return dataclasses.replace(spec, direction=small), full


def write_result(lm: LoadedModel, run_dir: Path, config: AbliterateConfig, choice: Choice,
                 candidates: dict[str, Direction], trials: list[FrozenTrial]) -> KernelAblate:
    """Write direction/, spec.json, trials.json, choice.json and manifest.json."""
    spec, full = chosen_spec(choice, candidates)
    best = round(spec.source)
    meta = dataclasses.replace(full.meta, name="abliterate", best_layer=best,
                               extra={**full.meta.extra, "abliterate_source": spec.source})
    Direction(full.vectors, full.layers, meta).save(run_dir / DIRECTION_DIR)
    write_text(run_dir / SPEC_JSON, specs_to_json([spec]))
    front = set(pareto_numbers(trials))
    write_json(run_dir / "trials.json", [
        {"number": t.number, "params": t.params, "score": score_of(t).to_dict(),
         "seconds": t.user_attrs.get("seconds"), "prior": t.user_attrs.get("prior"),
         "pareto": t.number in front} for t in trials])
    write_json(run_dir / "choice.json", {
        "trial": choice.trial.number, "rule": choice.rule, "params": choice.trial.params,
        "score": choice.score.to_dict(),
        "weights": spec.site_weights(lm.n_layers)})
    write_json(run_dir / "manifest.json", provenance(lm, config=config, seed=config.seed, extra={
        "sampler": {"kind": config.sampler, "startup_trials": config.startup_trials,
                    "seed": config.seed},
        "budget": config.trials, "finished_trials": len(trials),
        "optuna": versions_with_optuna(), "prompt_files": file_hashes(config),
        "study": json.loads((run_dir / "study.json").read_text()),
    }))
    return spec


def versions_with_optuna() -> dict[str, str]:
    """Library versions including Optuna's."""
    return {**versions(), "optuna": optuna.__version__}


__all__ = ["AbliterateResult", "NothingToRemoveError", "abliterate", "load_texts",
           "prompt_sets"]
