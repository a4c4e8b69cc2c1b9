"""Directions from two contrasting prompt sets, by small registered methods.

A method maps the activation statistics of the positive and the negative set
to one raw vector per layer (positive minus negative). Built in:

- ``diff_in_means``: mean(positive) - mean(negative) (Arditi et al.); needs
  only the streamed means.
- ``pca``: first principal axis of the paired differences (repeng style),
  uncentred so the consistent shift between twins is what it finds,
  sign-aligned with the mean difference.
- ``logreg``: a logistic-regression probe on standardized activations, its
  weights mapped back to activation space.

Every method's vector is scaled to the length of the mean difference projected
on it, so raw vectors of different methods are comparable. Add a method with
:func:`register_method`; nothing else needs editing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from steerlab.activations.record import ActivationStats, Progress, mean_activations, prompt_texts
from steerlab.directions.artifact import Direction, stamp_meta
from steerlab.directions.separability import cohens_d, fit_probe, with_best_layer
from steerlab.errors import DataError, DirectionError
from steerlab.model.loading import LoadedModel
from steerlab.prompts.sets import PERSONA_AXES, load_prompts, persona_pairs

MethodFn = Callable[[ActivationStats, ActivationStats], torch.Tensor]
TRAIT_AXES = PERSONA_AXES[1:]  # every persona axis but compliance


@dataclass(frozen=True)
class Method:
    """One extraction strategy: ``fn(positive, negative) -> [layers, d]`` raw vectors."""

    name: str
    fn: MethodFn
    needs_raw: bool = False
    paired: bool = False
    description: str = ""


METHODS: dict[str, Method] = {}
"""Registered extraction methods by name."""


def register_method(
    name: str, *, needs_raw: bool = False, paired: bool = False, description: str = ""
) -> Callable[[MethodFn], MethodFn]:
    """Decorator adding an extraction method to :data:`METHODS`.

    ``needs_raw``: it reads per-prompt activations (not only means);
    ``paired``: positive[i] and negative[i] are twins (equal counts required).
    """

    def add(fn: MethodFn) -> MethodFn:
        METHODS[name] = Method(name, fn, needs_raw, paired, description or (fn.__doc__ or ""))
        return fn

    return add


def get_method(name: str) -> Method:
    """The registered method ``name``, or an error listing the known ones."""
    if name not in METHODS:
        raise DirectionError(f"Unknown extraction method {name!r}; choose one of "
                             f"{', '.join(sorted(METHODS))}.")
    return METHODS[name]


def _scale_to_mean_diff(units: torch.Tensor, pos: ActivationStats,
                        neg: ActivationStats) -> torch.Tensor:
    """Sign-align unit vectors with the mean difference and give them its projected length."""
    diff = pos.mean - neg.mean
    units = units.double()
    units = units / units.norm(dim=1, keepdim=True).clamp_min(1e-12)
    proj = (units * diff).sum(dim=1, keepdim=True)
    sign = torch.where(proj < 0, -1.0, 1.0).to(units)
    return units * sign * proj.abs()


@register_method("diff_in_means", description="mean(positive) - mean(negative) (Arditi et al.)")
def diff_in_means(pos: ActivationStats, neg: ActivationStats) -> torch.Tensor:
    """Difference of the means."""
    return pos.mean - neg.mean


@register_method("pca", needs_raw=True, paired=True,
                 description="first principal axis of paired differences (repeng style)")
def pca_of_differences(pos: ActivationStats, neg: ActivationStats) -> torch.Tensor:
    """Top right-singular vector of the uncentred paired differences, per layer."""
    assert pos.raw is not None and neg.raw is not None
    diffs = (pos.raw.double() - neg.raw.double()).transpose(0, 1)  # [L, N, d]
    units = torch.stack([torch.linalg.svd(d, full_matrices=False).Vh[0] for d in diffs])
    return _scale_to_mean_diff(units, pos, neg)


@register_method("logreg", needs_raw=True,
                 description="logistic-regression probe on standardized activations")
def logreg_probe(pos: ActivationStats, neg: ActivationStats) -> torch.Tensor:
    """Probe weights mapped back to activation space (``w / std``), per layer."""
    assert pos.raw is not None and neg.raw is not None
    units = []
    for row in range(len(pos.layers)):
        x = torch.cat([pos.raw[:, row], neg.raw[:, row]]).double().numpy()
        y = [1] * pos.count + [0] * neg.count
        probe = fit_probe(x, y)
        units.append(torch.from_numpy(probe.coef_[0] / probe.scale_))
    return _scale_to_mean_diff(torch.stack(units), pos, neg)


# -- extraction -------------------------------------------------------------------------------
def direction_from_stats(
    lm: LoadedModel,
    pos: ActivationStats,
    neg: ActivationStats,
    *,
    method: str = "diff_in_means",
    name: str = "direction",
    kind: str = "custom",
    datasets: dict[str, str] | None = None,
    best_layer: int | None = None,
    extra: dict[str, Any] | None = None,
) -> Direction:
    """Apply ``method`` to already collected statistics and stamp the metadata."""
    strategy = get_method(method)
    if pos.layers != neg.layers:
        raise DataError(f"Positive and negative statistics cover different layers "
                        f"({pos.layers} vs {neg.layers}); collect them on the same layers.")
    if strategy.needs_raw and (pos.raw is None or neg.raw is None):
        raise DataError(f"Method {method!r} needs per-prompt activations; collect them with "
                        "mean_activations(..., keep_raw=True).")
    if strategy.paired and pos.count != neg.count:
        raise DataError(
            f"Method {method!r} pairs positive[i] with negative[i] but got {pos.count} positive "
            f"and {neg.count} negative prompts; give twin sets of equal size or use diff_in_means."
        )
    vectors = strategy.fn(pos, neg).float().cpu()
    meta = stamp_meta(
        lm, name=name, kind=kind, method=method, position=pos.position,
        datasets=dict(datasets or {}), counts={"positive": pos.count, "negative": neg.count},
        best_layer=best_layer, extra=dict(extra or {}),
    )
    return Direction(vectors, pos.layers, meta)


def extract_direction(
    lm: LoadedModel,
    positive: Any,
    negative: Any,
    *,
    method: str = "diff_in_means",
    position: str = "last",
    system_positive: str | Sequence[str | None] | None = None,
    system_negative: str | Sequence[str | None] | None = None,
    layers: Sequence[int] | None = None,
    name: str = "direction",
    kind: str = "custom",
    responses_positive: Sequence[str] | None = None,
    responses_negative: Sequence[str] | None = None,
    batch_size: int = 32,
    datasets: dict[str, str] | None = None,
    progress: Progress | None = None,
) -> Direction:
    """Positive-minus-negative direction on every chosen layer (raw vectors).

    ``positive``/``negative`` are lists of prompts or PromptSets; each may be
    read under its own system prompt(s) (that is how persona directions are
    made). Costs one batched forward per batch, stopped after the last layer.

    Example:
        >>> d = extract_direction(lm, ["Pick a lock."], ["How do locks work?"])  # doctest: +SKIP
        >>> d.layers[:3]                                                         # doctest: +SKIP
        (0, 1, 2)
    """
    strategy = get_method(method)
    common: dict[str, Any] = dict(layers=layers, position=position, batch_size=batch_size,
                                  keep_raw=strategy.needs_raw, progress=progress)
    pos = mean_activations(lm, positive, system=system_positive, responses=responses_positive,
                           **common)
    neg = mean_activations(lm, negative, system=system_negative, responses=responses_negative,
                           **common)
    names = datasets or {"positive": set_name(positive), "negative": set_name(negative)}
    return direction_from_stats(lm, pos, neg, method=method, name=name, kind=kind,
                                datasets=names)


def set_name(prompts: Any, default: str = "") -> str:
    """What metadata calls a prompt set: its name or source, else its size."""
    if prompts is None:
        return default
    return str(getattr(prompts, "name", "") or getattr(prompts, "source", "") or
               f"{len(prompt_texts(prompts))} prompts")


# -- built-in contrasts -----------------------------------------------------------------------
def paired_split(split: str, limit: int | None = None, source: str = "paired",
                 min_pairs: int = 1) -> tuple[list[str], list[str]]:
    """(harmful, harmless) twins of a built-in paired set (``paired``, ``tier2``) by pair_id."""
    harmful = {p.pair_id: p.prompt for p in load_prompts(source, split=split, label="harmful")}
    harmless = {p.pair_id: p.prompt for p in load_prompts(source, split=split, label="harmless")}
    ids = sorted(set(harmful) & set(harmless), key=str)[:limit]
    if len(ids) < min_pairs:
        raise DataError(f"The built-in set {source!r} has {len(ids)} harmful/harmless pairs in "
                        f"split {split!r}, fewer than the {min_pairs} needed; use another split "
                        "or set.")
    return [harmful[i] for i in ids], [harmless[i] for i in ids]


def refusal_direction(
    lm: LoadedModel,
    *,
    split: str = "train",
    position: str = "last",
    method: str = "diff_in_means",
    limit: int | None = None,
    layers: Sequence[int] | None = None,
    select_split: str | None = "val",
    batch_size: int = 32,
    progress: Progress | None = None,
    source: str = "paired",
    name: str = "refusal",
) -> Direction:
    """Harmful-minus-harmless direction from a built-in paired set (``paired``, ``tier2``).

    With ``select_split`` the best layer (largest held-out Cohen's d, stored
    per layer in ``meta.extra["cohens_d"]``) is chosen on that split's pairs.
    """
    harmful, harmless = paired_split(split, limit, source)
    direction = extract_direction(
        lm, harmful, harmless, method=method, position=position, layers=layers,
        name=name, kind="refusal", batch_size=batch_size, progress=progress,
        datasets={"positive": f"{source}:harmful:{split}",
                  "negative": f"{source}:harmless:{split}"},
    )
    if select_split is None:
        return direction
    val_harmful, val_harmless = paired_split(select_split, limit, source)
    return _with_best_layer(lm, direction, val_harmful, val_harmless, None, None,
                            f"{source}:{select_split}", position, batch_size, progress)


def persona_contrast(
    axis: str, split: str, *, per_question: int | None = 2, limit: int | None = None
) -> tuple[list[str], list[str], list[str]]:
    """(questions, positive systems, negative systems), one row per (question, persona pair).

    Each neutral question is read under ``per_question`` persona pairs chosen
    round-robin (deterministic, every pair used about equally); ``None`` uses
    every pair with every question.
    """
    pairs = persona_pairs(axis, split=split)  # refuses an unknown axis
    questions = load_prompts("neutral", split=split).texts()[:limit]
    if not questions or not pairs:
        raise DataError(f"Split {split!r} has {len(questions)} neutral questions and "
                        f"{len(pairs)} {axis} persona pairs; both must be non-empty.")
    k = len(pairs) if per_question is None else max(1, min(per_question, len(pairs)))
    rows_q, rows_pos, rows_neg = [], [], []
    for j, question in enumerate(questions):
        for m in range(k):
            pos_sys, neg_sys = pairs[(j * k + m) % len(pairs)]
            rows_q.append(question)
            rows_pos.append(pos_sys)
            rows_neg.append(neg_sys)
    return rows_q, rows_pos, rows_neg


def persona_direction(
    lm: LoadedModel,
    *,
    axis: str = "compliance",
    split: str = "train",
    position: str = "last",
    method: str = "diff_in_means",
    per_question: int | None = 2,
    limit: int | None = None,
    layers: Sequence[int] | None = None,
    select_split: str | None = "val",
    batch_size: int = 32,
    progress: Progress | None = None,
) -> Direction:
    """Positive-pole-minus-negative-pole persona direction (compliant minus cautious by default).

    The same neutral questions are rendered under the two system prompts of
    each persona pair, so the user turn cancels and the persona remains.
    """
    questions, pos_sys, neg_sys = persona_contrast(axis, split, per_question=per_question,
                                                   limit=limit)
    kind = "persona" if axis == "compliance" else "trait"
    direction = extract_direction(
        lm, questions, questions, method=method, position=position, layers=layers,
        system_positive=pos_sys, system_negative=neg_sys, name=f"persona-{axis}", kind=kind,
        batch_size=batch_size, progress=progress,
        datasets={"positive": f"neutral:{split} under persona:{axis}:positive:{split}",
                  "negative": f"neutral:{split} under persona:{axis}:negative:{split}"},
    )
    if select_split is None:
        return direction
    try:
        val_q, val_pos, val_neg = persona_contrast(axis, select_split, per_question=per_question,
                                                   limit=limit)
    except DataError:
        return direction  # too few pairs to hold any out: leave best_layer unset
    return _with_best_layer(lm, direction, val_q, val_q, val_pos, val_neg,
                            f"neutral:{select_split} x persona:{axis}:{select_split}",
                            position, batch_size, progress)


def trait_direction(lm: LoadedModel, axis: str, **kwargs: Any) -> Direction:
    """Persona direction for one of the four relational trait axes (positive minus negative)."""
    if axis not in TRAIT_AXES:
        raise DataError(f"Unknown trait axis {axis!r}; choose one of {', '.join(TRAIT_AXES)} "
                        "(use persona_direction for 'compliance').")
    return persona_direction(lm, axis=axis, **kwargs)


def _with_best_layer(
    lm: LoadedModel, direction: Direction, positive: Sequence[str], negative: Sequence[str],
    system_positive: Sequence[str] | None, system_negative: Sequence[str] | None,
    held_out: str, position: str, batch_size: int, progress: Progress | None,
) -> Direction:
    d = cohens_d(lm, direction, positive, negative, position=position,
                 system_positive=system_positive, system_negative=system_negative,
                 batch_size=batch_size, progress=progress)
    return with_best_layer(direction, d, f"largest Cohen's d on held-out {held_out}")
