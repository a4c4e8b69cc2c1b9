"""Where a run's time went: per step, per generation condition, and the persona-gating
cost in units of one unhooked generation pass (what the cost budget is stated in)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypedDict

from steerlab.store.atomic import write_json

# Steps whose time is their generations, already counted under "generation".
GENERATING_STEPS = frozenset({"selection", "readd_selection"})


@dataclass
class Timings:
    """Wall time per step and per generation condition (prompt-weighted passes)."""

    steps: dict[str, float] = field(default_factory=dict)
    generation: dict[str, float] = field(default_factory=dict)
    generated_prompts: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, dict[str, float] | dict[str, int]]:
        return asdict(self)

    @classmethod
    def load(cls, path: Path) -> Timings:
        """Timings of earlier, interrupted runs: a resumed run's cost still counts them."""
        if not path.exists():
            return cls()
        data = json.loads(path.read_text())
        return cls(**{k: dict(data.get(k, {})) for k in ("steps", "generation",
                                                          "generated_prompts")})


class Cost(TypedDict):
    """A run's cost in passes: one pass = the unhooked baseline over the evaluation prompts."""

    baseline_pass_seconds: float
    generation_passes: float
    total_seconds: float
    ratio_to_baseline_pass: float
    budget_ratio: float
    within_budget: bool
    generation_in_passes: float
    extraction_in_passes: float
    analysis_and_kl_in_passes: float


def record_cost(out: Path, timings: Timings, n_eval: int, wall: float) -> Cost | None:
    """Add this run to ``timings.json`` and return the total cost (None: no baseline pass)."""
    path = out / "timings.json"
    # ``timings`` already holds the work of earlier, interrupted runs (Runner loads it).
    history = {**(json.loads(path.read_text()) if path.exists() else {}), **timings.as_dict()}
    history["wall_seconds"] = history.get("wall_seconds", 0.0) + wall
    write_json(path, history)
    base = history["generation"].get("baseline")
    if not base:
        return None
    passes = sum(history["generated_prompts"].values()) / n_eval
    steps = {k: v for k, v in history["steps"].items() if k not in GENERATING_STEPS}
    generation = sum(history["generation"].values())
    all_work = sum(steps.values()) + generation
    return Cost(
        baseline_pass_seconds=base,
        generation_passes=passes,
        total_seconds=all_work,
        ratio_to_baseline_pass=all_work / base,
        budget_ratio=passes + 2,
        within_budget=all_work / base <= passes + 2,
        generation_in_passes=generation / base,
        extraction_in_passes=sum(v for k, v in steps.items() if k.startswith("extract_")) / base,
        analysis_and_kl_in_passes=sum(v for k, v in steps.items() if not k.startswith("extract_"))
        / base,
    )


def cost_parts(cost: Cost) -> list[tuple[str, float]]:
    """(part, pass-equivalents) rows: where the time went, the total and the budget."""
    return [
        (f"generation ({cost['generation_passes']:g} passes' worth of prompts)",
         cost["generation_in_passes"]),
        ("extracting the directions", cost["extraction_in_passes"]),
        ("layer analysis and KL", cost["analysis_and_kl_in_passes"]),
        ("total", cost["ratio_to_baseline_pass"]),
        ("budget: generation passes + 2", cost["budget_ratio"]),
    ]
