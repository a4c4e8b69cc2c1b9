"""Perplexity of a model (optionally under interventions) on plain text.

A cheap check that an edit has not broken language modelling: compare the
perplexity on the same texts with and without the intervention.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from steerlab.errors import EvaluationError
from steerlab.interventions.steering import steer

if TYPE_CHECKING:
    from steerlab.model.loading import LoadedModel


@torch.no_grad()
def nll_report(lm: LoadedModel, texts: Sequence[str], specs: Sequence[Any] = (), *,
               batch_size: int = 8, max_length: int = 1024) -> dict[str, Any]:
    """Token-weighted mean negative log-likelihood and perplexity over ``texts``.

    Texts are tokenized as raw text (no chat template, the tokenizer's own
    special tokens); each text needs at least two tokens.
    """
    if not texts:
        raise EvaluationError("perplexity needs at least one text.")
    tok = lm.tokenizer
    per_text: list[dict[str, float]] = []
    total_nll, total_tokens = 0.0, 0
    with steer(lm, list(specs)):  # no specs: no hooks
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start : start + batch_size])
            enc = tok(chunk, return_tensors="pt", padding=True, truncation=True,
                      max_length=max_length)
            ids = enc["input_ids"].to(lm.device)
            mask = enc["attention_mask"].to(lm.device)
            pos = (mask.cumsum(-1) - 1).clamp_min(0)
            logits = lm.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
            logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            target = ids[:, 1:]
            nll = -logprobs.gather(-1, target[..., None]).squeeze(-1)
            valid = (mask[:, 1:] * mask[:, :-1]).bool()
            for b, text in enumerate(chunk):
                n = int(valid[b].sum())
                if n == 0:
                    raise EvaluationError(
                        f"Text {start + b} ({text[:40]!r}) has fewer than two tokens; "
                        "perplexity needs at least one predicted token."
                    )
                s = float(nll[b][valid[b]].sum())
                per_text.append({"tokens": n, "nll": s / n})
                total_nll += s
                total_tokens += n
    mean = total_nll / total_tokens
    return {"n_texts": len(per_text), "n_tokens": total_tokens, "nll": mean,
            "perplexity": math.exp(mean), "per_text": per_text}


def perplexity(lm: LoadedModel, texts: Sequence[str], specs: Sequence[Any] = (), *,
               batch_size: int = 8, max_length: int = 1024) -> float:
    """exp(token-weighted mean NLL) of ``texts`` under ``lm`` (with ``specs`` applied).

    Example:
        >>> perplexity(lm, ["The cat sat on the mat."])  # doctest: +SKIP
        84.2
    """
    return float(nll_report(lm, texts, specs, batch_size=batch_size,
                            max_length=max_length)["perplexity"])
