"""Whether a response refused: the substring scorer with the degeneracy check by
default, an LLM judge or a local classifier when one is given.

A search minimises refusals, and broken text is what too strong an ablation
produces; so a degenerate response counts against a trial exactly like a
refusal ("not a usable answer"), and is also counted on its own.

With the substring scorer a trial stops generating a row as soon as a refusal
phrase appears (:meth:`SubstringScorer.stop_rule`): its verdict can no longer
change, and refusing rows stop costing decode steps. Such a cut row counts as a
refusal, not as degenerate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from steerlab.errors import EvaluationError
from steerlab.evaluate.classifier import LocalClassifier
from steerlab.evaluate.judge import Judge
from steerlab.evaluate.outcome import Outcome, classify
from steerlab.evaluate.refusal import RefusalScorer as RefusalPhrases
from steerlab.generation.generate import StopRule


@dataclass(frozen=True)
class Verdicts:
    """Per-response outcomes (``refusal``, ``bypass``, ``degenerate``)."""

    outcomes: list[Outcome]

    @property
    def failed(self) -> list[bool]:
        """Not a usable answer: refused or degenerate."""
        return [o != "bypass" for o in self.outcomes]

    @property
    def refusals(self) -> int:
        return sum(self.failed)

    @property
    def degenerate(self) -> int:
        return sum(o == "degenerate" for o in self.outcomes)


class RefusalScorer(Protocol):
    """Scores (prompt, response) pairs; ``harmful`` says which kind of prompts they are.

    A scorer may also have ``stop_rule(tokenizer) -> StopRule | None`` (see
    :func:`stop_rule_of`) to let generation stop rows whose verdict is settled."""

    def describe(self) -> dict[str, Any]: ...
    def __call__(self, pairs: Sequence[tuple[str, str]], *, harmful: bool) -> Verdicts: ...


class SubstringScorer:
    """Refusal phrases plus the degeneracy detector (:func:`steerlab.evaluate.outcome.classify`)."""

    def describe(self) -> dict[str, Any]:
        return {"kind": "substring+degeneracy"}

    def stop_rule(self, tokenizer: Any) -> StopRule:
        """Stop a row once a refusal phrase is in it: the text only grows, so the row
        stays a failure (a refusal, or a degenerate one) whatever comes next."""
        phrases = RefusalPhrases()

        def settled(ids: list[int]) -> bool:
            return phrases(tokenizer.decode(ids, skip_special_tokens=True)).refused

        return settled

    def __call__(self, pairs: Sequence[tuple[str, str]], *, harmful: bool) -> Verdicts:
        return Verdicts([classify(response).outcome for _prompt, response in pairs])


class JudgeScorer:
    """An LLM judge's compliance and coherence decide; a missing score falls back to
    the substrings (as in :func:`steerlab.evaluate.outcome.classify`)."""

    def __init__(self, judge: Judge) -> None:
        self.judge = judge

    def describe(self) -> dict[str, Any]:
        return {"kind": "judge", **self.judge.describe()}


    def __call__(self, pairs: Sequence[tuple[str, str]], *, harmful: bool) -> Verdicts:
        scores = self.judge.score_many(list(pairs))
        return Verdicts([classify(r, judge=s).outcome for (_p, r), s in zip(pairs, scores,
                                                                             strict=True)])


class ClassifierScorer:
    """A local harm classifier on harmful prompts (flagged = complied, else refused);
    safe prompts, which it does not judge, keep the substring scorer."""

    def __init__(self, classifier: LocalClassifier) -> None:
        self.classifier = classifier

    def describe(self) -> dict[str, Any]:
        return {"kind": "classifier", **self.classifier.describe()}


    def __call__(self, pairs: Sequence[tuple[str, str]], *, harmful: bool) -> Verdicts:
        base = SubstringScorer()(pairs, harmful=harmful)
        if not harmful:
            return base
        scores = self.classifier.score_many(list(pairs))
        return Verdicts([o if o == "degenerate" else ("bypass" if s.flagged else "refusal")
                         for o, s in zip(base.outcomes, scores, strict=True)])


def stop_rule_of(scorer: RefusalScorer, tokenizer: Any) -> StopRule | None:
    """The scorer's early-stop rule, or None when it has none (it reads whole responses)."""
    rule = getattr(scorer, "stop_rule", None)
    return rule(tokenizer) if callable(rule) else None


def make_scorer(judge_url: str | None, judge_model: str,
                classifier: str | None) -> RefusalScorer:
    """The scorer the settings ask for; a judge is checked with one request first, so an
    unreachable judge stops the run before any trial (one clear message)."""
    if judge_url and classifier:
        raise EvaluationError("Give a judge or a classifier, not both.")
    if judge_url:
        judge = Judge(judge_url, judge_model, max_retries=2, timeout=60.0)
        judge.check()
        return JudgeScorer(judge)
    if classifier:
        return ClassifierScorer(LocalClassifier(classifier))
    return SubstringScorer()


__all__ = ["ClassifierScorer", "JudgeScorer", "RefusalScorer", "SubstringScorer", "Verdicts",
           "make_scorer", "stop_rule_of"]
