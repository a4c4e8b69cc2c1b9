"""How good a direction is, layer by layer, on one contrast: :func:`scan` extracts it on
training prompts and measures it on held-out ones (Cohen's d, probe accuracy, cross-layer
cosine, refusal–persona cosine). The measures live in :mod:`steerlab.directions.separability`, layer
selection in :mod:`steerlab.directions.selection`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from steerlab.activations.record import Progress, mean_activations, prompt_texts
from steerlab.directions.artifact import Direction
from steerlab.directions.extraction import (
    direction_from_stats,
    get_method,
    paired_split,
    persona_direction,
    set_name,
)
from steerlab.directions.separability import (
    cosine_matrix,
    effect_sizes,
    probe_accuracies,
    with_best_layer,
)
from steerlab.errors import DataError
from steerlab.interventions.layer_spec import resolve_layers
from steerlab.model.loading import LoadedModel
from steerlab.store.atomic import write_json


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
        datasets = {"positive": set_name(positive), "negative": set_name(negative),
                    "positive_test": set_name(positive_test, "held out of positive"),
                    "negative_test": set_name(negative_test, "held out of negative")}
    get_method(method)
    chosen = resolve_layers(layers, lm.n_layers)
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
    direction = with_best_layer(direction, d, "largest Cohen's d on held-out set")
    best = direction.meta.best_layer
    assert best is not None
    persona_cos = None
    if persona is not False:
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

