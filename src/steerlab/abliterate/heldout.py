"""Held-out evaluation of a search's result, against the unedited model and against the
direction plain selection picks (Arditi et al.'s layer selection, ablated everywhere).

Each condition is measured under its hooks by :func:`steerlab.evaluate.compare.evaluate_model`:
refusal on held-out harmful prompts, over-refusal on held-out harmless prompts (the
XSTest-style ones among them too), first-token KL, the built-in capability items and
perplexity, each with n and a 95% interval, and a paired test (McNemar, paired
bootstrap) against the unedited model on the same prompts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import steerlab.evaluate.compare as compare
from steerlab.abliterate.config import AbliterateConfig
from steerlab.evaluate.compare import CompareConfig, evaluate_model
from steerlab.interventions.specs import Spec
from steerlab.interventions.steering import steer
from steerlab.model.loading import LoadedModel
from steerlab.store.atomic import atomic_open, write_json

UNEDITED = "unedited"


def evaluate_heldout(lm: LoadedModel, conditions: Mapping[str, Sequence[Spec]],
                     cfg: CompareConfig) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``{"config", "baseline", "results": {condition: measures + vs_baseline}}`` and the
    rows; the unedited model is measured first and is the reference of every test."""
    prompts = compare.compare_prompts(cfg)
    results: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    reference = None
    for name, specs in {UNEDITED: (), **conditions}.items():
        with steer(lm, list(specs)):
            measures, found, mine = evaluate_model(lm, cfg, prompts, reference)
        reference = reference or mine
        results[name] = measures
        rows += [{"condition": name, **row} for row in found]
    compare.add_paired_tests(results, UNEDITED, cfg.seed)
    return {"config": asdict(cfg), "baseline": UNEDITED, "results": results}, rows


HELDOUT_JSON = "heldout.json"
HELDOUT_ROWS = "heldout_rows.jsonl"


def heldout_config(config: AbliterateConfig) -> CompareConfig:
    """The held-out prompts and budget the settings ask for."""
    return CompareConfig(harmful=config.heldout_harmful, harmless=config.heldout_harmless,
                         split=config.heldout_split, limit=config.heldout_limit,
                         capability_limit=config.capability_limit,
                         max_new_tokens=config.max_new_tokens, kl_tokens=4,
                         batch_size=config.batch_size, seed=config.seed)


def run_heldout(lm: LoadedModel, run_dir: Path, config: AbliterateConfig, chosen: Spec,
                chosen_trial: int, plain: Spec, selection: Mapping[str, Any]) -> dict[str, Any]:
    """Evaluate the chosen trial and plain selection's direction on held-out prompts and
    write ``heldout.json`` / ``heldout_rows.jsonl`` (reused when the choice and settings
    are unchanged)."""
    cfg = heldout_config(config)
    path = run_dir / HELDOUT_JSON
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("chosen_trial") == chosen_trial and old.get("config") == asdict(cfg):
            return dict(old)
    result, rows = evaluate_heldout(lm, {"abliterate": [chosen], "plain selection": [plain]},
                                    cfg)
    result.update(chosen_trial=chosen_trial, plain_selection=dict(selection))
    with atomic_open(run_dir / HELDOUT_ROWS, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    write_json(path, result)
    return result


__all__ = ["HELDOUT_JSON", "HELDOUT_ROWS", "UNEDITED", "evaluate_heldout", "heldout_config",
           "run_heldout"]
