"""What one trial costs and measures, on validation prompts only.

- refusals on harmful validation prompts (a refused or degenerate answer);
- first-token KL(base ‖ trial) on harmless validation prompts, against
  baseline log-probabilities computed once;
- over-refusals on safe prompts that sound alarming.

The harmful and safe prompts are generated in one batched call; the KL needs
only one prefill per harmless prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from steerlab.abliterate.scoring import RefusalScorer, Verdicts, stop_rule_of
from steerlab.evaluate.kl import kl_from_logprobs, step_logprobs
from steerlab.generation.generate import generate
from steerlab.interventions.specs import Spec
from steerlab.interventions.steering import steer
from steerlab.model.loading import LoadedModel

SAMPLES_KEPT = 4
"""Responses kept per trial (the first harmful validation prompts), for the report."""


@dataclass(frozen=True)
class TrialScore:
    """One trial's measurements (counts, with their denominators)."""

    refusals: int
    n_harmful: int
    over_refusals: int
    n_over: int
    kl: float
    degenerate: int = 0
    samples: list[str] = field(default_factory=list)

    def objectives(self) -> tuple[float, float, float]:
        """What the sampler minimises: refusal rate, KL, over-refusal rate."""
        over = self.over_refusals / self.n_over if self.n_over else 0.0
        return self.refusals / self.n_harmful, self.kl, over

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Objective:
    """Validation prompts, the scorer, and the baseline log-probs every trial compares to."""

    lm: LoadedModel
    harmful: list[str]
    harmless: list[str]
    over_refusal: list[str]
    scorer: RefusalScorer
    max_new_tokens: int = 32
    batch_size: int = 16
    _base_logprobs: torch.Tensor | None = None

    def first_token_logprobs(self) -> torch.Tensor:
        """``[n_harmless, V]`` first-response-token log-probs under whatever hooks are on."""
        chunks = [step_logprobs(self.lm, self.harmless[i:i + self.batch_size], None, 1, None)[0]
                  for i in range(0, len(self.harmless), self.batch_size)]
        return torch.cat(chunks)[:, 0]

    def base_logprobs(self) -> torch.Tensor:
        if self._base_logprobs is None:
            self._base_logprobs = self.first_token_logprobs()
        return self._base_logprobs

    def responses(self, specs: Sequence[Spec]) -> tuple[list[str], list[str]]:
        """(harmful responses, over-refusal responses) under ``specs``, in one batched call."""
        texts = generate(self.lm, self.harmful + self.over_refusal, steer=list(specs),
                         max_new_tokens=self.max_new_tokens, batch_size=self.batch_size,
                         stop_when=stop_rule_of(self.scorer, self.lm.tokenizer))
        out = [g.response for g in texts]
        return out[:len(self.harmful)], out[len(self.harmful):]

    def verdicts(self, harmful_out: list[str],
                 over_out: list[str]) -> tuple[Verdicts, Verdicts]:
        harm = self.scorer(list(zip(self.harmful, harmful_out, strict=True)), harmful=True)
        over = self.scorer(list(zip(self.over_refusal, over_out, strict=True)), harmful=False)
        return harm, over

    def __call__(self, specs: Sequence[Spec]) -> TrialScore:
        """Measure one intervention (``[]`` measures the unedited model)."""
        base = self.base_logprobs()
        harmful_out, over_out = self.responses(specs)
        harm, over = self.verdicts(harmful_out, over_out)
        if specs:
            with steer(self.lm, list(specs)):
                trial = self.first_token_logprobs()
            kl = float(kl_from_logprobs(base, trial).mean())
        else:
            kl = 0.0
        return TrialScore(refusals=harm.refusals, n_harmful=len(self.harmful),
                          over_refusals=over.refusals, n_over=len(self.over_refusal), kl=kl,
                          degenerate=harm.degenerate, samples=harmful_out[:SAMPLES_KEPT])


__all__ = ["SAMPLES_KEPT", "Objective", "TrialScore"]
