"""``steerlab abliterate``: search the refusal/KL trade-off with Optuna.

One job per module: :mod:`config` (settings), :mod:`candidates` (per-layer
directions), :mod:`space` (what a trial chooses), :mod:`scoring` (refused or
not), :mod:`objective` (one trial's measurements), :mod:`study` (the
resumable Optuna study), :mod:`choice` (the stated rule), :mod:`search` (the
library call writing the artifact).
"""

from __future__ import annotations

from steerlab.abliterate.choice import Choice, choose, pareto_numbers
from steerlab.abliterate.config import AbliterateConfig
from steerlab.abliterate.objective import Objective, TrialScore
from steerlab.abliterate.scoring import (
    JudgeScorer,
    RefusalScorer,
    SubstringScorer,
    Verdicts,
    make_scorer,
)
from steerlab.abliterate.search import AbliterateResult, NothingToRemoveError, abliterate
from steerlab.abliterate.study import StudyMismatchError

__all__ = [
    "AbliterateConfig",
    "AbliterateResult",
    "Choice",
    "JudgeScorer",
    "NothingToRemoveError",
    "Objective",
    "RefusalScorer",
    "StudyMismatchError",
    "SubstringScorer",
    "TrialScore",
    "Verdicts",
    "abliterate",
    "choose",
    "make_scorer",
    "pareto_numbers",
]
