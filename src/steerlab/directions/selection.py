"""Which layer's direction mediates refusal: Arditi et al.'s selection. For each candidate
layer, the refusal score with the direction ablated (harmful prompts), the refusal induced
by adding it (harmless prompts) and the KL on harmless prompts, then filters and a ranking.
The refusal score is their logit-based one: the log-odds of refusal-opening tokens at the
first response position, so each prompt costs one forward, no generation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from steerlab.activations.record import Progress, iter_batches, last_logits, prompt_texts
from steerlab.directions.artifact import Direction
from steerlab.errors import DataError, DirectionError
from steerlab.evaluate.kl import kl_from_logprobs
from steerlab.interventions.layer_spec import resolve_layers
from steerlab.interventions.spec_types import Ablate, Add
from steerlab.interventions.steering import steer
from steerlab.model.loading import LoadedModel

DEFAULT_REFUSAL_TOKENS = ("I", "As", "Sorry", "Unfortunately")
"""Strings whose first token opens most refusals (Arditi et al. use "I" and "As" for Qwen)."""


def refusal_token_ids(tokenizer: Any, words: Sequence[str] = DEFAULT_REFUSAL_TOKENS) -> list[int]:
    """First token id of each refusal-opening word (deduplicated, order kept)."""
    ids: list[int] = []
    for word in words:
        toks = tokenizer(word, add_special_tokens=False)["input_ids"]
        if toks and toks[0] not in ids:
            ids.append(int(toks[0]))
    if not ids:
        raise DataError(f"None of the refusal words {list(words)} tokenizes; pass others.")
    return ids


def refusal_scores(logprobs: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
    """Log-odds that the response opens with a refusal token: log p - log(1 - p)."""
    log_p = torch.logsumexp(logprobs[:, list(token_ids)], dim=-1)
    return log_p - torch.log1p(-log_p.exp().clamp(max=1 - 1e-7))


def first_token_logprobs(
    lm: LoadedModel, prompts: Sequence[str], *, batch_size: int = 16,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Log-probabilities ``[n, vocab]`` (float32, CPU) of the first response token."""
    out: torch.Tensor | None = None
    for idx, batch in iter_batches(lm, prompts, batch_size=batch_size):
        logits = last_logits(lm, batch).float()
        logprobs = torch.log_softmax(logits, dim=-1).cpu()
        if out is None:
            out = torch.empty(len(prompts), logprobs.shape[-1])
        out[idx] = logprobs
        if progress is not None:
            progress(len(idx))
    assert out is not None
    return out


@dataclass
class SelectionRow:
    """One candidate layer's scores (means over the validation prompts)."""

    layer: int
    bypass_score: float
    induce_score: float
    kl: float
    passed: bool
    reason: str = ""


@dataclass
class SelectionResult:
    """Ranked candidates (passing first, lowest bypass score first) and the chosen layer."""

    rows: list[SelectionRow]
    best_layer: int | None
    baseline_harmful: float
    baseline_harmless: float
    refusal_tokens: list[str]
    n_harmful: int
    n_harmless: int
    filters: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def choice(self) -> tuple[int, str]:
        """The layer to use and the rule that chose it, saying when the filters were relaxed.

        When no candidate passes every filter (common on small models, which rarely reach
        positive refusal log-odds from one added vector), the induce filter is dropped
        first, then the KL filter; the last-layers prune is never dropped. A layer must
        at least lower the refusal score below the unablated one; only when none does is
        the least bad taken, and the rule says no refusal-mediating layer was found.
        """
        kl_max = self.filters["kl_threshold"]
        if self.best_layer is not None:
            return self.best_layer, (
                "lowest held-out refusal score with the direction ablated, among middle "
                f"layers that induce refusal when added and keep first-token KL < {kl_max:g}"
            )
        if not self.rows:
            raise DirectionError("No candidate layers were scored; pass at least one layer.")
        kept = [r for r in self.rows if "in last" not in r.reason] or self.rows
        lowering = [r for r in kept if r.bypass_score < self.baseline_harmful]
        clean = [r for r in lowering if r.kl < kl_max]
        if clean:
            best = min(clean, key=lambda r: r.bypass_score)
            return best.layer, (
                "lowest held-out refusal score with the direction ablated among middle layers "
                f"with first-token KL < {kl_max:g} (no layer passed the induce filter)"
            )
        if lowering:
            best = min(lowering, key=lambda r: r.kl)
            return best.layer, (
                "smallest first-token KL among middle layers whose ablation lowers the "
                f"held-out refusal score (none both lowers it and keeps KL < {kl_max:g})"
            )
        best = min(kept, key=lambda r: r.bypass_score)
        return best.layer, (
            "lowest held-out refusal score with the direction ablated, though no middle "
            "layer's ablation lowers it below the unablated score: no refusal-mediating "
            "layer found"
        )

    def markdown(self) -> str:
        """The ranked table as Markdown."""
        lines = ["| rank | layer | refusal score, ablated (harmful) | refusal score, added "
                 "(harmless) | KL (harmless) | passed |", "|---:|---:|---:|---:|---:|---|"]
        for rank, row in enumerate(self.rows, 1):
            verdict = "yes" if row.passed else f"no: {row.reason}"
            lines.append(f"| {rank} | {row.layer} | {row.bypass_score:.3f} | "
                         f"{row.induce_score:.3f} | {row.kl:.4f} | {verdict} |")
        return "\n".join(lines)


def select_direction(
    lm: LoadedModel,
    direction: Direction,
    harmful_val: Any,
    harmless_val: Any,
    *,
    layers: Sequence[int] | None = None,
    kl_threshold: float = 0.1,
    induce_threshold: float = 0.0,
    prune_last_fraction: float = 0.2,
    refusal_words: Sequence[str] = DEFAULT_REFUSAL_TOKENS,
    batch_size: int = 16,
    progress: Progress | None = None,
) -> SelectionResult:
    """Rank the direction's layers as refusal directions (Arditi et al., section 2.4 / C).

    For each candidate layer ``l`` with vector ``r_l``: bypass score = mean
    refusal score on ``harmful_val`` with ``r_l`` ablated at every layer
    (lower is better); induce score = mean refusal score on ``harmless_val``
    with ``r_l`` added to layer ``l``'s output (must exceed
    ``induce_threshold``); KL on ``harmless_val`` with ``r_l`` ablated (must
    stay under ``kl_threshold``); layers in the last ``prune_last_fraction``
    of the model are filtered out. Cost: 3 forwards per prompt and layer.
    """
    harmful, harmless = prompt_texts(harmful_val), prompt_texts(harmless_val)
    candidates = resolve_layers(layers if layers is not None else direction.layers, lm.n_layers)
    missing = [layer for layer in candidates if layer not in direction.layers]
    if missing:
        raise DirectionError(f"Direction {direction.meta.name!r} has no vectors for layers "
                             f"{missing}; choose among {list(direction.layers)}.")
    token_ids = refusal_token_ids(lm.tokenizer, refusal_words)
    kw: dict[str, Any] = dict(batch_size=batch_size, progress=progress)
    base_harmful = refusal_scores(first_token_logprobs(lm, harmful, **kw), token_ids)
    base_harmless_lp = first_token_logprobs(lm, harmless, **kw)
    base_harmless = refusal_scores(base_harmless_lp, token_ids)
    cutoff = lm.n_layers * (1 - prune_last_fraction)
    rows = []
    for layer in candidates:
        with steer(lm, [Ablate(direction, layers="all", source_layer=layer)]):
            bypass = refusal_scores(first_token_logprobs(lm, harmful, **kw), token_ids).mean()
            kl = kl_from_logprobs(base_harmless_lp, first_token_logprobs(lm, harmless, **kw)).mean()
        with steer(lm, [Add(direction, 1.0, layers=[layer], source_layer=layer)]):
            induce = refusal_scores(first_token_logprobs(lm, harmless, **kw), token_ids).mean()
        reasons = []
        if layer >= cutoff:
            reasons.append(f"in last {prune_last_fraction:.0%} of layers")
        if float(induce) <= induce_threshold:
            reasons.append(f"induce {float(induce):.2f} <= {induce_threshold}")
        if float(kl) >= kl_threshold:
            reasons.append(f"KL {float(kl):.3f} >= {kl_threshold}")
        rows.append(SelectionRow(layer, float(bypass), float(induce), float(kl),
                                 passed=not reasons, reason="; ".join(reasons)))
    rows.sort(key=lambda r: (not r.passed, r.bypass_score))
    best = rows[0].layer if rows and rows[0].passed else None
    return SelectionResult(
        rows=rows, best_layer=best, baseline_harmful=float(base_harmful.mean()),
        baseline_harmless=float(base_harmless.mean()),
        refusal_tokens=lm.tokenizer.convert_ids_to_tokens(token_ids),
        n_harmful=len(harmful), n_harmless=len(harmless),
        filters={"kl_threshold": kl_threshold, "induce_threshold": induce_threshold,
                 "prune_last_fraction": prune_last_fraction},
    )

