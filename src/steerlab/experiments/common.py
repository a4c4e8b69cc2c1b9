"""Refusal directions as the refusal-structure experiments extract them: read on the model
*as it is under an intervention*, with a held-out layer choice."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from steerlab.directions.artifact import Direction
from steerlab.directions.extraction import paired_split, refusal_direction
from steerlab.directions.selection import select_direction
from steerlab.directions.separability import cohens_d, with_best_layer
from steerlab.errors import DataError
from steerlab.experiments.summary import KL_THRESHOLD
from steerlab.interventions.steering import steer

if TYPE_CHECKING:
    from steerlab.experiments.config import RefusalExperimentConfig
    from steerlab.model.loading import LoadedModel


def refusal_direction_of(
    lm: LoadedModel,
    source: str = "paired",
    *,
    split: str = "train",
    select_split: str = "val",
    position: str = "last",
    limit: int | None = None,
    name: str = "refusal",
    under: Sequence[Any] = (),
    under_note: str = "",
    batch_size: int = 32,
    selection: str = "ablation",
    selection_limit: int = 16,
    selection_stride: int = 2,
) -> Direction:
    """Harmful-minus-harmless direction of a built-in paired set on every layer, with
    held-out Cohen's d per layer and ``meta.best_layer`` chosen on ``select_split``.

    ``selection="ablation"`` picks the layer as Arditi et al. do (their section 2.4):
    among the middle layers, the one whose direction, ablated at every layer, most
    lowers the first-token refusal score of held-out harmful prompts, while adding it
    induces refusal and ablating it keeps KL on harmless prompts small
    (:func:`steerlab.directions.selection.select_direction` on ``selection_limit`` prompts per
    side, every ``selection_stride``-th layer). ``"cohens_d"`` takes the layer of
    largest held-out Cohen's d (cheaper, but separability peaks at late layers whose
    direction is often not the one that mediates refusal).

    With ``under`` (intervention specs) the activations are read, Cohen's d measured
    and the layer selected while those interventions are active: the direction of the
    model as it is after them (what hydra re-extraction needs).
    """
    if selection not in ("ablation", "cohens_d"):
        raise DataError(f"Unknown layer selection {selection!r}; use 'ablation' or 'cohens_d'.")
    paired_split(split, limit, source, min_pairs=2)  # refuse a tiny set before any pass
    val_harmful, val_harmless = paired_split(select_split, limit, source, min_pairs=2)
    with steer(lm, list(under)):  # no specs: the unhooked model
        direction = refusal_direction(lm, split=split, position=position, limit=limit,
                                      select_split=None, batch_size=batch_size, source=source,
                                      name=name)
        d = cohens_d(
            lm, direction, val_harmful, val_harmless, position=position, batch_size=batch_size
        )
        chosen: dict[str, Any] = {}
        if selection == "ablation":
            chosen = _select_by_ablation(
                lm,
                direction,
                val_harmful[:selection_limit],
                val_harmless[:selection_limit],
                selection_stride,
                batch_size,
            )
    how = chosen.get("rule", f"largest Cohen's d on held-out {source}:{select_split}")
    more = {"selection": chosen["table"]} if chosen else {}
    return with_best_layer(
        direction, d, f"{how} ({source}:{select_split})", best=chosen.get("layer"),
        extracted_under=under_note or ("nothing" if not under else f"{len(under)} specs"), **more,
    )


def _select_by_ablation(
    lm: LoadedModel,
    direction: Direction,
    harmful: list[str],
    harmless: list[str],
    stride: int,
    batch_size: int,
) -> dict[str, Any]:
    """Arditi et al.'s causal layer choice on held-out prompts (see refusal_direction_of)."""
    n = lm.n_layers
    lo, hi = int(0.2 * n), max(int(0.2 * n) + 1, int(0.8 * n))
    result = select_direction(
        lm,
        direction,
        harmful,
        harmless,
        layers=list(range(lo, hi, max(1, stride))),
        kl_threshold=KL_THRESHOLD,
        batch_size=batch_size,
    )
    layer, rule = result.choice()
    return {"layer": int(layer), "rule": rule, "table": result.to_dict()}


def configured_refusal_direction(
    lm: LoadedModel, config: RefusalExperimentConfig, source: str = "paired", **overrides: Any
) -> Direction:
    """:func:`refusal_direction_of` with the config's read position, extraction limit and
    layer selection; ``overrides`` (e.g. ``name``, ``split``, ``under``) take precedence.

    One place, so every experiment extracts its reference direction the same way.
    """
    settings: dict[str, Any] = {
        "position": config.position,
        "limit": config.extraction_limit,
        "selection": config.layer_selection,
        "selection_limit": config.selection_limit,
        "selection_stride": config.selection_stride,
        **overrides,
    }
    return refusal_direction_of(lm, source, **settings)


def cohens_d_of(direction: Direction) -> dict[int, float]:
    """The held-out per-layer Cohen's d stored by :func:`refusal_direction_of`."""
    return {int(k): float(v) for k, v in direction.meta.extra.get("cohens_d", {}).items()}


def best_layer(direction: Direction) -> int:
    if direction.meta.best_layer is None:
        raise DataError(
            f"Direction {direction.meta.name!r} has no best layer; extract it with "
            "refusal_direction_of (held-out Cohen's d picks one)."
        )
    return int(direction.meta.best_layer)


def effective_rank(gram: Any, share: float = 0.9) -> dict[str, float]:
    """Participation ratio and the number of components holding ``share`` of the energy of
    a set of unit vectors, from their Gram (cosine) matrix: 1 when they are one direction."""
    eig = torch.linalg.eigvalsh(torch.as_tensor(gram, dtype=torch.float64)).clamp_min(0)
    eig = eig.flip(0)
    total = float(eig.sum())
    key = f"k{int(share * 100)}"
    if total == 0:
        return {"participation_ratio": 0.0, key: 0}
    cum = torch.cumsum(eig, 0) / total
    k = int((cum < share - 1e-12).sum()) + 1
    return {"participation_ratio": total**2 / float((eig**2).sum()), key: k}
