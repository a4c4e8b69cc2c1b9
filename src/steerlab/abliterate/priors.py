"""Where a fresh study starts: plain selection's layer, turned into trials.

A search that starts from random draws can end worse than the single
direction the field already knows how to pick. So before the sampler's own
start-up draws, a fresh study is given a few trials built from plain
selection (Arditi et al.'s layer choice, :func:`plain_selection`) at each
candidate position:

- ``everywhere``: that layer's direction removed at weight 1 from every
  attention and MLP output (plain directional ablation, as a kernel);
- ``local``: full weight around the layer, none far from it;
- ``late``: a stronger tent over the later half with a small floor.

They count toward the budget and the start-up trials like any other trial,
and the choice rule treats them alike: the search keeps plain selection's
result when nothing it finds is better on the validation prompts.
The layers plain selection picked are kept in ``selection.json`` and reused
by the held-out evaluation.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna

from steerlab.abliterate.space import SOURCE_RANGE
from steerlab.directions.artifact import Direction
from steerlab.directions.selection import select_direction
from steerlab.interventions.specs import Ablate
from steerlab.model.loading import LoadedModel
from steerlab.store.atomic import write_json

SELECTION_JSON = "selection.json"


def plain_selection(lm: LoadedModel, direction: Direction, harmful: Sequence[str],
                    harmless: Sequence[str], *, kl_cap: float, batch_size: int = 16
                    ) -> dict[str, Any]:
    """The layer Arditi-style selection picks among every 2nd layer of the middle 20–80% of
    the model (on the validation prompts), with its rule."""
    n = lm.n_layers
    layers = list(range(int(0.2 * n), int(0.8 * n) + 1, 2))
    result = select_direction(lm, direction, list(harmful), list(harmless), layers=layers,
                              kl_threshold=kl_cap, batch_size=batch_size)
    layer, rule = result.choice()
    return {"layer": layer, "rule": rule, "layers_tried": layers, "kl_cap": kl_cap}


def plain_ablation(direction: Direction, selection: Mapping[str, Any]) -> Ablate:
    """Plain selection's result: its layer's direction ablated at every layer."""
    return Ablate(direction, layers="all", source_layer=int(selection["layer"]))


def selections(lm: LoadedModel, run_dir: Path, candidates: Mapping[str, Direction],
               harmful: Sequence[str], harmless: Sequence[str], *, kl_cap: float,
               batch_size: int = 16) -> dict[str, dict[str, Any]]:
    """Plain selection per candidate position, computed once per run folder (again when the
    KL cap, which its filter uses, has changed since)."""
    path = run_dir / SELECTION_JSON
    done: dict[str, dict[str, Any]] = json.loads(path.read_text()) if path.is_file() else {}
    missing = [p for p in candidates if done.get(p, {}).get("kl_cap") != kl_cap]
    for position in missing:
        done[position] = plain_selection(lm, candidates[position], harmful, harmless,
                                         kl_cap=kl_cap, batch_size=batch_size)
    if missing:
        write_json(path, done)
    return done


def prior_params(layer: int, position: str, n_layers: int) -> dict[str, dict[str, Any]]:
    """The named prior trials for a selected ``layer`` (kept inside the search space)."""
    last = n_layers - 1
    source = min(max(float(layer), SOURCE_RANGE[0] * last), SOURCE_RANGE[1] * last)

    def both(peak: float, center: float, width: float, floor: float) -> dict[str, Any]:
        out: dict[str, Any] = {"position": position, "source": source}
        for site in ("attn", "mlp"):
            out.update({f"{site}_peak": peak, f"{site}_center": center,
                        f"{site}_width": width, f"{site}_floor": floor})
        return out

    return {
        "everywhere": both(1.0, source, max(1.0, 0.7 * last), 1.0),
        "local": both(1.0, source, max(1.0, 0.25 * last), 0.0),
        "late": both(1.2, max(source, 0.75 * last), max(1.0, 0.5 * last), 0.2),
    }


def enqueue_priors(study: optuna.Study, chosen: Mapping[str, Mapping[str, Any]],
                   n_layers: int) -> list[str]:
    """Queue the prior trials on a study with no trials yet; returns their names."""
    if study.get_trials(deepcopy=False):
        return []
    names = []
    for position, selection in sorted(chosen.items()):
        for name, params in prior_params(int(selection["layer"]), position, n_layers).items():
            study.enqueue_trial(params, user_attrs={"prior": f"{name}@{position}"})
            names.append(f"{name}@{position}")
    return names


__all__ = ["SELECTION_JSON", "enqueue_priors", "plain_ablation", "plain_selection",
           "prior_params", "selections"]
