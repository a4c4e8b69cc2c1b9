"""How far an intervention moves the model on prompts it should not affect.

KL(P_base ‖ P_steered) of next-token distributions on harmless prompts:

- at the first response token, and
- averaged over the first ``k`` tokens of the *baseline's* greedy response,
  teacher-forced (the steered model is fed the baseline's tokens, so both
  distributions are over the same context).

Both runs go token by token with a KV cache, exactly as generation does: a
prefill over the prompt, then one token per step. Interventions that act only
on ``"prompt"`` or ``"generated"`` positions therefore see the same split as
in :func:`steerlab.generation.generate.generate`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from steerlab.evaluate.stats import mean_summary
from steerlab.generation.decoding import forward_step
from steerlab.generation.generate import eos_ids
from steerlab.interventions.steering import steer
from steerlab.prompts.chat import encode

if TYPE_CHECKING:
    from steerlab.model.loading import LoadedModel
    from steerlab.prompts.sets import PromptSet


def _texts(prompts: Sequence[str] | PromptSet) -> list[str]:
    return [p if isinstance(p, str) else p.prompt for p in prompts]


def steps_until_eos(tokens: torch.Tensor, eos: Collection[int]) -> int:
    """How many response steps count: up to and including the first EOS in ``tokens``."""
    return next((step + 1 for step, tok in enumerate(tokens.tolist()) if tok in eos), len(tokens))


@torch.no_grad()
def step_logprobs(lm: LoadedModel, prompts: list[str], system: str | None, k: int,
                   forced: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs ``[B, k, V]`` at each response step, and the tokens fed ``[B, k]``.

    With ``forced`` the given tokens are fed (teacher forcing); otherwise greedy. Token
    by token with a KV cache, as generation goes; shared by the KL here and
    :mod:`steerlab.evaluate.compare`.
    """
    batch = encode(lm.tokenizer, prompts, system, max_length=lm.context_length)
    ids = batch.input_ids.to(lm.device)
    mask = batch.attention_mask.to(lm.device)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    logits, cache = forward_step(lm, ids, mask, pos, None)
    steps: list[torch.Tensor] = []
    fed: list[torch.Tensor] = []
    for step in range(k):
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        steps.append(logprobs.cpu())
        tok = forced[:, step].to(lm.device) if forced is not None else logprobs.argmax(-1)
        fed.append(tok.cpu())
        if step == k - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = pos[:, -1:] + 1
        logits, cache = forward_step(lm, tok[:, None], mask, pos, cache)
    return torch.stack(steps, 1), torch.stack(fed, 1)


def kl_from_logprobs(base: torch.Tensor, steered: torch.Tensor) -> torch.Tensor:
    """KL(base ‖ steered) in nats over the last (vocabulary) dimension of two log-prob tensors.

    Public so distributions captured elsewhere (the first-token log-probs a generation
    run keeps) are compared by the same formula as the teacher-forced passes here.
    """
    return (base.exp() * (base - steered)).sum(-1).clamp_min(0.0)


def kl_per_prompt(lm: LoadedModel, prompts: Sequence[str] | PromptSet, specs: Sequence[Any], *,
                  k: int = 1, system: str | None = None,
                  batch_size: int = 8) -> list[list[float]]:
    """Per prompt, the KL at each of the first ``k`` baseline response tokens.

    A baseline that stops (EOS) before ``k`` tokens gives a shorter list.
    """
    return kl_per_prompt_many(lm, prompts, {"steered": specs}, k=k, system=system,
                              batch_size=batch_size)["steered"]


def kl_per_prompt_many(lm: LoadedModel, prompts: Sequence[str] | PromptSet,
                       specs_by_name: Mapping[str, Sequence[Any]], *, k: int = 1,
                       system: str | None = None,
                       batch_size: int = 8) -> dict[str, list[list[float]]]:
    """:func:`kl_per_prompt` for several interventions at once.

    The unsteered baseline (its log-probs and greedy tokens) is computed once per
    batch and shared, so n interventions cost n + 1 passes instead of 2n.
    """
    if k < 1:
        raise ValueError("k must be at least 1")
    texts = _texts(prompts)
    eos = eos_ids(lm)
    result: dict[str, list[list[float]]] = {name: [] for name in specs_by_name}
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        base_lp, tokens = step_logprobs(lm, chunk, system, k, None)
        # Where the baseline stopped: steps after its EOS are not part of its response.
        stops = [steps_until_eos(tokens[b], eos) for b in range(len(chunk))]
        for name, specs in specs_by_name.items():
            with steer(lm, list(specs)):
                steer_lp, _ = step_logprobs(lm, chunk, system, k, tokens)
            kl = kl_from_logprobs(base_lp, steer_lp)  # [B, k]
            result[name].extend(
                [float(x) for x in kl[b, : stops[b]]] for b in range(len(chunk))
            )
    return result


def kl_report(lm: LoadedModel, prompts: Sequence[str] | PromptSet, specs: Sequence[Any], *,
              k: int = 8, system: str | None = None, batch_size: int = 8,
              seed: int = 0) -> dict[str, Any]:
    """First-token KL and mean KL over the first ``k`` tokens, each with n and a 95% CI."""
    per = kl_per_prompt(lm, prompts, specs, k=k, system=system, batch_size=batch_size)
    return kl_summary(per, k=k, seed=seed)


def kl_summary(per_prompt: list[list[float]], *, k: int, seed: int = 0) -> dict[str, Any]:
    """:func:`kl_report` from per-prompt KL lists (as :func:`kl_per_prompt_many` returns
    them), so callers that compute several interventions at once report them alike."""
    first = mean_summary([v[0] for v in per_prompt], seed=seed)
    mean_k = mean_summary([sum(v) / len(v) for v in per_prompt], seed=seed)
    return {"k": k, "direction": "KL(base || steered), nats", "first_token": first,
            f"mean_first_{k}": mean_k, "per_prompt": per_prompt}


def kl_divergence(lm: LoadedModel, prompts: Sequence[str] | PromptSet, specs: Sequence[Any],
                  k: int = 1, *, system: str | None = None, batch_size: int = 8) -> float:
    """Mean over prompts of KL(base ‖ steered), averaged over the first ``k`` tokens.

    ``k=1`` is the first-token KL used to pick interventions that leave
    harmless behaviour alone (heretic, Arditi et al.).

    Example:
        >>> kl_divergence(lm, load_prompts("harmless", limit=8), specs, k=4)  # doctest: +SKIP
        0.031
    """
    return mean_kl(kl_per_prompt(lm, prompts, specs, k=k, system=system, batch_size=batch_size))


def mean_kl(per_prompt: Sequence[Sequence[float]]) -> float:
    """What :func:`kl_divergence` reports, from :func:`kl_per_prompt_many`'s lists: the mean
    over prompts of each prompt's mean KL over its tokens."""
    return sum(sum(v) / len(v) for v in per_prompt) / len(per_prompt)
