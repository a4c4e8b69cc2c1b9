"""How good is a direction, layer by layer, and which layer to use.

- :func:`cohens_d`: separation of the projections of two held-out sets;
- :func:`probe_accuracies`: held-out accuracy of a per-layer linear probe;
- :func:`cosine_matrix`: how similar a direction is to itself across layers;
- :func:`scan`: all of the above on one contrast (plus refusal–persona cosine);
- :func:`select_direction`: Arditi et al.'s selection — for each candidate
  layer, refusal score with the direction ablated (harmful prompts), refusal
  induced by adding it (harmless prompts), and KL on harmless prompts, then
  filters and a ranking. The refusal score is their logit-based one: the
  log-odds of refusal-opening tokens at the first response position, so each
  prompt costs one forward, no generation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from steerlab._atomic import write_json
from steerlab.activations import (
    ActivationStats,
    Progress,
    iter_batches,
    last_logits,
    mean_activations,
    project_activations,
    prompt_texts,
    resolve_layers,
)
from steerlab.directions import Direction
from steerlab.errors import DataError, DirectionError
from steerlab.extraction import direction_from_stats, fit_probe, get_method, paired_split
from steerlab.interventions import Ablate, Add
from steerlab.model import LoadedModel
from steerlab.steering import steer

Z95 = 1.959963984540054


# -- separability -----------------------------------------------------------------------------
def effect_sizes(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Cohen's d per column of projections ``[n, L]`` vs ``[m, L]`` (pooled SD)."""
    n, m = pos.shape[0], neg.shape[0]
    if n < 2 or m < 2:
        raise DataError(f"Cohen's d needs at least 2 prompts per side; got {n} and {m}.")
    pooled = ((n - 1) * pos.var(dim=0) + (m - 1) * neg.var(dim=0)) / (n + m - 2)
    return (pos.mean(dim=0) - neg.mean(dim=0)) / pooled.sqrt().clamp_min(1e-12)


def cohens_d(
    lm: LoadedModel,
    direction: Direction,
    positive: Any,
    negative: Any,
    *,
    position: str = "last",
    system_positive: str | Sequence[str | None] | None = None,
    system_negative: str | Sequence[str | None] | None = None,
    batch_size: int = 32,
    progress: Progress | None = None,
) -> dict[int, float]:
    """Per-layer Cohen's d of the projection on the direction's unit vectors.

    Use held-out prompts: on the extraction prompts d is optimistic.
    """
    common: dict[str, Any] = dict(position=position, batch_size=batch_size, progress=progress)
    pos = project_activations(lm, positive, direction, system=system_positive, **common)
    neg = project_activations(lm, negative, direction, system=system_negative, **common)
    d = effect_sizes(pos, neg)
    return {layer: float(d[i]) for i, layer in enumerate(direction.layers)}


def wilson(k: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval for k successes in n trials."""
    if n == 0:
        return 0.0, 1.0
    p, z2 = k / n, Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def probe_accuracies(
    train_pos: ActivationStats, train_neg: ActivationStats,
    test_pos: ActivationStats, test_neg: ActivationStats,
) -> dict[int, dict[str, Any]]:
    """Held-out accuracy of a logistic probe per layer: ``{layer: {accuracy, n, ci95}}``."""
    for stats in (train_pos, train_neg, test_pos, test_neg):
        if stats.raw is None:
            raise DataError("Probe accuracy needs per-prompt activations (keep_raw=True).")
    out = {}
    for row, layer in enumerate(train_pos.layers):
        x = torch.cat([train_pos.raw[:, row], train_neg.raw[:, row]]).double().numpy()  # type: ignore[index]
        probe = fit_probe(x, [1] * train_pos.count + [0] * train_neg.count)
        x_test = torch.cat([test_pos.raw[:, row], test_neg.raw[:, row]]).double().numpy()  # type: ignore[index]
        y_test = [1] * test_pos.count + [0] * test_neg.count
        correct = int(sum(int(a == b) for a, b in zip(probe.predict(x_test), y_test, strict=True)))
        n = len(y_test)
        lo, hi = wilson(correct, n)
        out[layer] = {"accuracy": correct / n, "n": n, "k": correct, "ci95": [lo, hi]}
    return out


def cosine_matrix(direction: Direction) -> torch.Tensor:
    """``[L, L]`` cosine similarity between the direction's vectors on every pair of layers."""
    units = direction.unit().vectors.double()
    return (units @ units.T).clamp(-1.0, 1.0)


# -- scan -------------------------------------------------------------------------------------
@dataclass
class ScanResult:
    """Layer-by-layer report on one contrast; ``to_json`` writes ``scan.json``."""

    model: dict[str, Any]
    method: str
    position: str
    layers: list[int]
    datasets: dict[str, str]
    counts: dict[str, int]
    cohens_d: dict[int, float]
    probe_accuracy: dict[int, dict[str, Any]]
    cosine_matrix: list[list[float]]
    best_layer: int
    refusal_persona_cosine: dict[int, float] | None = None
    direction: Direction | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("direction")
        for key in ("cohens_d", "probe_accuracy", "refusal_persona_cosine"):
            if out[key] is not None:
                out[key] = {str(k): v for k, v in out[key].items()}
        return out

    def to_json(self, path: str | Path) -> Path:
        """Write the result atomically (the direction itself is saved separately)."""
        target = Path(path)
        write_json(target, self.to_dict())
        return target


def holdout(texts: Sequence[str], every: int = 5) -> tuple[list[str], list[str]]:
    """Deterministic (train, held-out) split: every ``every``-th prompt is held out.

    Applied to both sides with the same indices, so aligned twin files stay paired.
    """
    train = [t for i, t in enumerate(texts) if i % every != every - 1]
    test = [t for i, t in enumerate(texts) if i % every == every - 1]
    if len(train) < 2 or len(test) < 2:
        raise DataError(f"Need at least {2 * every} prompts per side to hold some out; "
                        f"got {len(texts)}. Pass explicit held-out sets.")
    return train, test


def scan(
    lm: LoadedModel,
    *,
    positive: Any = None,
    negative: Any = None,
    positive_test: Any = None,
    negative_test: Any = None,
    system_positive: str | None = None,
    system_negative: str | None = None,
    method: str = "diff_in_means",
    position: str = "last",
    layers: Sequence[int] | None = None,
    persona: bool | Direction = False,
    limit: int | None = None,
    batch_size: int = 32,
    progress: Progress | None = None,
) -> ScanResult:
    """Extract a direction on training prompts and measure it on held-out prompts.

    With no prompt sets, the built-in ``paired`` set: harmful vs harmless twins,
    ``train`` split to extract, ``test`` split held out. With sets but no
    held-out sets, every fifth prompt is held out. ``persona=True`` (or a
    Direction) adds the refusal–persona cosine per layer.
    """
    datasets: dict[str, str]
    if positive is None and negative is None:
        pos_train, neg_train = paired_split("train", limit)
        pos_test, neg_test = paired_split("test", limit)
        datasets = {"positive": "paired:harmful:train", "negative": "paired:harmless:train",
                    "positive_test": "paired:harmful:test", "negative_test": "paired:harmless:test"}
    elif positive is None or negative is None:
        raise DataError("Give both positive and negative prompt sets, or neither (built-in "
                        "paired set).")
    else:
        pos_all, neg_all = prompt_texts(positive)[:limit], prompt_texts(negative)[:limit]
        if positive_test is None or negative_test is None:
            (pos_train, pos_test), (neg_train, neg_test) = holdout(pos_all), holdout(neg_all)
        else:
            pos_train, neg_train = pos_all, neg_all
            pos_test = prompt_texts(positive_test)[:limit]
            neg_test = prompt_texts(negative_test)[:limit]
        datasets = {"positive": _name(positive), "negative": _name(negative),
                    "positive_test": _name(positive_test, "held out of positive"),
                    "negative_test": _name(negative_test, "held out of negative")}
    get_method(method)
    chosen = resolve_layers(lm, layers)
    collect: dict[str, Any] = dict(layers=chosen, position=position, batch_size=batch_size,
                                   keep_raw=True, progress=progress)
    stats = {
        "train_pos": mean_activations(lm, pos_train, system=system_positive, **collect),
        "train_neg": mean_activations(lm, neg_train, system=system_negative, **collect),
        "test_pos": mean_activations(lm, pos_test, system=system_positive, **collect),
        "test_neg": mean_activations(lm, neg_test, system=system_negative, **collect),
    }
    direction = direction_from_stats(lm, stats["train_pos"], stats["train_neg"], method=method,
                                     name="scan", kind="refusal" if positive is None else "custom",
                                     datasets=datasets)
    units = direction.unit().vectors.double()
    d_values = effect_sizes(
        torch.einsum("nld,ld->nl", stats["test_pos"].raw.double(), units),  # type: ignore[union-attr]
        torch.einsum("nld,ld->nl", stats["test_neg"].raw.double(), units),  # type: ignore[union-attr]
    )
    d = {layer: float(d_values[i]) for i, layer in enumerate(chosen)}
    best = max(d, key=lambda layer: d[layer])
    direction = Direction(direction.vectors, direction.layers,
                          _replace_meta(direction, best, d, "largest Cohen's d on held-out set"))
    persona_cos = None
    if persona is not False:
        from steerlab.extraction import persona_direction

        persona_dir = (persona if isinstance(persona, Direction) else
                       persona_direction(lm, position=position, layers=chosen, select_split=None,
                                         limit=limit, batch_size=batch_size, progress=progress))
        persona_cos = direction.cosine(persona_dir)
    return ScanResult(
        model=lm.info(), method=method, position=position, layers=list(chosen),
        datasets=datasets, counts={k: v.count for k, v in stats.items()}, cohens_d=d,
        probe_accuracy=probe_accuracies(*stats.values()),
        cosine_matrix=cosine_matrix(direction).tolist(), best_layer=best,
        refusal_persona_cosine=persona_cos, direction=direction,
    )


def _name(prompts: Any, default: str = "") -> str:
    if prompts is None:
        return default
    return str(getattr(prompts, "name", "") or getattr(prompts, "source", "") or
               f"{len(prompt_texts(prompts))} prompts")


def _replace_meta(direction: Direction, best: int, d: dict[int, float], how: str) -> Any:
    import dataclasses

    extra = {**direction.meta.extra, "cohens_d": {str(k): v for k, v in d.items()},
             "best_layer_by": how}
    return dataclasses.replace(direction.meta, best_layer=best, extra=extra)


# -- selection (Arditi et al.) ----------------------------------------------------------------
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


def _kl(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(base || other) per row, from log-probabilities."""
    return (base.exp() * (base - other)).sum(dim=-1)


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
    candidates = resolve_layers(lm, layers if layers is not None else direction.layers)
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
            kl = _kl(base_harmless_lp, first_token_logprobs(lm, harmless, **kw)).mean()
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

