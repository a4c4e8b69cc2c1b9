"""Evaluation: what changed when a model was steered, with n and intervals.

Small modules, one job each:

- :mod:`refusal` substring refusal scorer (standard list + multilingual);
- :mod:`degeneracy` empty/looping/broken text detector;
- :mod:`outcome` refusal / bypass / degenerate per response;
- :mod:`judge` LLM judge (compliance, coherence) over any OpenAI-compatible API;
- :mod:`classifier` optional local HF classifier (Llama-Guard / HarmBench style);
- :mod:`kl`, :mod:`perplexity`, :mod:`capability` side-effect checks;
- :mod:`stats` Wilson / bootstrap intervals, McNemar, paired bootstrap, kappa;
- :mod:`backends` in-process or OpenAI-compatible generation;
- :mod:`run` ``run_eval``: resumable rows + summary.
"""

from __future__ import annotations

from steerlab.evaluate.backends import Backend, Completion, InProcessBackend, OpenAIBackend
from steerlab.evaluate.capability import capability_accuracy, capability_eval, grade
from steerlab.evaluate.classifier import ClassifierScore, LocalClassifier
from steerlab.evaluate.degeneracy import (
    DegeneracyConfig,
    DegeneracyDetector,
    DegeneracyScore,
    is_degenerate,
)
from steerlab.evaluate.judge import RUBRIC, RUBRIC_VERSION, Judge, JudgeCache, JudgeScore
from steerlab.evaluate.kl import kl_divergence, kl_report
from steerlab.evaluate.outcome import OUTCOMES, Outcome, OutcomeScore, classify, outcome
from steerlab.evaluate.perplexity import nll_report, perplexity
from steerlab.evaluate.refusal import (
    MULTILINGUAL_PHRASES,
    STANDARD_PHRASES,
    RefusalScore,
    RefusalScorer,
    is_refusal,
)
from steerlab.evaluate.run import compare, read_rows, run_eval, summarise
from steerlab.evaluate.stats import (
    bootstrap_ci,
    cohens_kappa,
    holm,
    mcnemar,
    mcnemar_table,
    mean_summary,
    paired_bootstrap,
    rate_summary,
    restored_share,
    wilson_ci,
)

__all__ = [
    "MULTILINGUAL_PHRASES",
    "OUTCOMES",
    "RUBRIC",
    "RUBRIC_VERSION",
    "STANDARD_PHRASES",
    "Backend",
    "ClassifierScore",
    "Completion",
    "DegeneracyConfig",
    "DegeneracyDetector",
    "DegeneracyScore",
    "InProcessBackend",
    "Judge",
    "JudgeCache",
    "JudgeScore",
    "LocalClassifier",
    "OpenAIBackend",
    "Outcome",
    "OutcomeScore",
    "RefusalScore",
    "RefusalScorer",
    "bootstrap_ci",
    "capability_accuracy",
    "capability_eval",
    "classify",
    "cohens_kappa",
    "compare",
    "grade",
    "holm",
    "is_degenerate",
    "is_refusal",
    "kl_divergence",
    "kl_report",
    "mcnemar",
    "mcnemar_table",
    "mean_summary",
    "nll_report",
    "outcome",
    "paired_bootstrap",
    "perplexity",
    "rate_summary",
    "read_rows",
    "restored_share",
    "run_eval",
    "summarise",
    "wilson_ci",
]
