"""Which trial becomes the result: a rule stated in words and applied to the study.

Rule: among trials whose first-token KL is at most the cap, the fewest
validation refusals; ties go to fewer over-refusals, then the lower KL, then
the earlier trial. When no trial is under the cap, the lowest-KL trial is
taken and the rule says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from optuna.trial import FrozenTrial

from steerlab.abliterate.objective import TrialScore
from steerlab.abliterate.study import score_of
from steerlab.errors import SteerlabError


@dataclass(frozen=True)
class Choice:
    """The chosen trial, its measurements and the rule that picked it."""

    trial: FrozenTrial
    score: TrialScore
    rule: str


def choose(trials: Sequence[FrozenTrial], kl_cap: float) -> Choice:
    """Apply the rule (module docstring) to finished trials."""
    if not trials:
        raise SteerlabError("The study has no finished trial to choose from; run more trials.")
    scored = [(t, score_of(t)) for t in trials]
    under = [(t, s) for t, s in scored if s.kl <= kl_cap]
    if under:
        trial, score = min(under, key=lambda ts: (ts[1].refusals, ts[1].over_refusals,
                                                  ts[1].kl, ts[0].number))
        return Choice(trial, score, f"fewest validation refusals among trials with first-token "
                      f"KL ≤ {kl_cap:g} (ties: fewer over-refusals, then lower KL)")
    trial, score = min(scored, key=lambda ts: (ts[1].kl, ts[1].refusals, ts[0].number))
    return Choice(trial, score, f"no trial kept first-token KL ≤ {kl_cap:g}; the lowest-KL "
                  "trial was taken")


def pareto_numbers(trials: Sequence[FrozenTrial]) -> list[int]:
    """Trial numbers on the refusal/KL Pareto front (no other trial is at least as good on
    both and better on one)."""
    scored = [(t.number, score_of(t)) for t in trials]
    front = []
    for number, s in scored:
        dominated = any(o.refusals <= s.refusals and o.kl <= s.kl
                        and (o.refusals < s.refusals or o.kl < s.kl) for _n, o in scored)
        if not dominated:
            front.append(number)
    return front


__all__ = ["Choice", "choose", "pareto_numbers"]
