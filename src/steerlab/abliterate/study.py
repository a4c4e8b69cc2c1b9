"""The Optuna study of a run folder: identity, resume, and the trial loop.

The study lives in ``DIR/study.db`` (SQLite). ``DIR/study.json`` records what
the trials depend on (model fingerprint, settings, hashes of the prompts); a
folder made with anything else is refused instead of mixed. A killed run
resumes: finished trials are kept (never repeated), a trial cut off mid-way is
marked failed, and the sampler is reseeded past the trials already drawn so
its random start-up draws do not repeat either.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from steerlab.abliterate.objective import Objective, TrialScore
from steerlab.abliterate.space import suggest, to_spec
from steerlab.directions.artifact import Direction
from steerlab.errors import SteerlabError
from steerlab.store.atomic import write_json

STUDY_DB = "study.db"
STUDY_JSON = "study.json"
STUDY_NAME = "abliterate"
OBJECTIVES = ("refusal_rate", "kl", "over_refusal_rate")
FORMAT_VERSION = 1


class StudyMismatchError(SteerlabError):
    """The run folder holds a study made with another model or other settings."""


def text_hash(texts: Sequence[str]) -> str:
    """SHA-256 of a prompt list (order matters), short form."""
    digest = hashlib.sha256("\x1e".join(texts).encode("utf-8")).hexdigest()
    return digest[:16]


def check_identity(run_dir: Path, identity: Mapping[str, Any]) -> None:
    """Write ``study.json`` on a fresh folder; refuse one whose identity differs."""
    path = run_dir / STUDY_JSON
    if not path.is_file():
        write_json(path, {"format_version": FORMAT_VERSION, **identity})
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise StudyMismatchError(f"{path} is unreadable ({exc}); use a fresh --out folder.") \
            from exc
    old.pop("format_version", None)
    changed = sorted(_diff(old, dict(identity)))
    if changed:
        raise StudyMismatchError(
            f"{run_dir} holds a study made with another model or other settings (differs in: "
            f"{', '.join(changed)}); use a fresh --out folder, or rerun with the settings it "
            "was made with."
        )


def _diff(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    out: list[str] = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out.extend(_diff(a, b, f"{prefix}{key}."))
        elif json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
            out.append(f"{prefix}{key}")
    return out


def open_study(run_dir: Path, *, sampler: str, seed: int, startup_trials: int) -> optuna.Study:
    """Create or load the study; a trial left RUNNING by a killed process becomes FAIL."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(f"sqlite:///{(run_dir / STUDY_DB).resolve()}")
    existing = optuna.load_study(study_name=STUDY_NAME, storage=storage) \
        if STUDY_NAME in {s.study_name for s in storage.get_all_studies()} else None
    drawn = len(existing.get_trials(deepcopy=False)) if existing is not None else 0
    study = optuna.create_study(
        study_name=STUDY_NAME, storage=storage, load_if_exists=True,
        directions=["minimize"] * len(OBJECTIVES),
        sampler=make_sampler(sampler, seed + drawn, startup_trials),
    )
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    return study


def make_sampler(kind: str, seed: int, startup_trials: int) -> optuna.samplers.BaseSampler:
    """Optuna's multi-objective TPE (default) or NSGA-II, seeded."""
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials,
                                      multivariate=True)


def finished(study: optuna.Study) -> list[FrozenTrial]:
    """Completed trials, in order."""
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def score_of(trial: FrozenTrial) -> TrialScore:
    """The measurements a finished trial recorded."""
    return TrialScore(**trial.user_attrs["score"])


OnTrial = Callable[[FrozenTrial, TrialScore, float], None]


def run_trials(study: optuna.Study, objective: Objective, candidates: Mapping[str, Direction],
               budget: int, *, max_rank: int = 1, on_trial: OnTrial | None = None) -> None:
    """Run trials until ``budget`` are complete; each is one spec, applied as hooks."""
    n_layers = objective.lm.n_layers
    positions = sorted(candidates)
    while len(finished(study)) < budget:
        trial = study.ask()
        start = time.perf_counter()
        try:
            params = suggest(trial, n_layers, positions, max_rank)
            score = objective([to_spec(params, candidates[params["position"]])])
        except BaseException:
            study.tell(trial, state=TrialState.FAIL)
            raise
        trial.set_user_attr("score", score.to_dict())
        trial.set_user_attr("seconds", time.perf_counter() - start)
        study.tell(trial, list(score.objectives()))
        if on_trial is not None:
            on_trial(study.trials[-1], score, time.perf_counter() - start)


__all__ = ["OBJECTIVES", "STUDY_DB", "STUDY_JSON", "StudyMismatchError", "check_identity",
           "finished", "make_sampler", "open_study", "run_trials", "score_of", "text_hash"]
