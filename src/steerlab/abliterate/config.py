"""Settings of ``steerlab abliterate``: which prompts, how big a search, which rule picks.

Each field's docstring is its description; ``--config FILE`` (YAML or JSON) sets
any of them and the command line's ``--trials`` overrides ``trials``. The settings
that change what a trial measures are part of the study's identity
(:func:`AbliterateConfig.identity`): a run folder made with other values is
refused rather than mixed.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from steerlab.experiments.config import FileConfig

CANDIDATE_POSITIONS = ("last", "t_inst", "post_inst")


class AbliterateConfig(FileConfig):
    """What to search, on which prompts, and how the final trial is chosen."""

    harmful_train: str = "paired:harmful"
    """Harmful prompts the candidate directions are extracted from (file or built-in set)."""
    harmless_train: str = "paired:harmless"
    """Harmless twins for extraction."""
    harmful_val: str = "paired:harmful"
    """Harmful validation prompts: the refusal objective of every trial."""
    harmless_val: str = "harmless"
    """Harmless validation prompts: the first-token KL objective of every trial."""
    over_refusal: str = "harmless:xstest_style"
    """Safe prompts that sound alarming: the over-refusal objective of every trial."""
    train_split: str | None = "train"
    """Split of built-in sets used for extraction (ignored for files)."""
    val_split: str | None = "val"
    """Split of built-in sets used for the per-trial objectives (ignored for files)."""
    over_refusal_split: str | None = "train"
    """Split of the built-in over-refusal set used during the search."""
    train_limit: int | None = Field(default=128, ge=2)
    """First N prompts per training side."""
    harmful_val_limit: int | None = Field(default=32, ge=1)
    """First N harmful validation prompts."""
    harmless_val_limit: int | None = Field(default=32, ge=1)
    """First N harmless validation prompts."""
    over_refusal_limit: int | None = Field(default=16, ge=0)
    """First N over-refusal prompts per trial (0 turns the objective off)."""
    trials: int = 40
    """Trial budget (the study stops at this many finished trials, resumed ones included)."""
    startup_trials: int = Field(default=12, ge=1)
    """Random trials before TPE takes over."""
    seed: int = 0
    """Seed of the sampler."""
    positions: list[str] = Field(default=["last", "post_inst"], min_length=1)
    """Token positions the candidate directions are read at."""
    max_rank: int = Field(default=1, ge=1, le=8)
    """Largest subspace rank searched (1: a single direction)."""
    max_new_tokens: int = Field(default=32, ge=1)
    """Tokens generated per validation prompt."""
    batch_size: int = Field(default=16, ge=1)
    """Prompts per forward pass."""
    kl_cap: float = Field(default=0.1, gt=0)
    """The choice: fewest validation refusals among trials whose first-token KL is at most
    this."""
    judge_url: str | None = None
    """OpenAI-compatible judge endpoint; the substring scorer with the degeneracy check when
    unset."""
    judge_model: str = "judge"
    """Model name the judge endpoint serves."""
    classifier: str | None = None
    """Local HF classifier folder (Llama-Guard style) deciding refusal instead of substrings."""
    heldout_harmful: str = "paired:harmful"
    """Held-out harmful prompts (refusal), never seen by the search."""
    heldout_harmless: str = "harmless"
    """Held-out harmless prompts (over-refusal and KL)."""
    heldout_split: str | None = "test"
    """Split of the held-out sets (built-in sets; None for whole files)."""
    heldout_limit: int | None = Field(default=48, ge=1)
    """Held-out prompts per set."""
    capability_limit: int = Field(default=40, ge=1)
    """Built-in capability items in the held-out evaluation."""
    evaluate: bool = True
    """Run the held-out evaluation after the search."""
    prior_trials: bool = True
    """Start a fresh study with trials built from plain selection's layer (see
    steerlab.abliterate.priors); they count toward the budget."""
    sampler: Literal["tpe", "nsga2"] = "tpe"
    """Optuna multi-objective sampler."""

    @field_validator("trials")
    @classmethod
    def _positive_budget(cls, value: int) -> int:
        if value <= 0:
            raise ValueError(f"the trial budget must be at least 1 (got {value}); give "
                             "--trials N with N ≥ 1")
        return value

    @field_validator("positions")
    @classmethod
    def _known_positions(cls, value: list[str]) -> list[str]:
        bad = [p for p in value if p not in CANDIDATE_POSITIONS]
        if bad:
            raise ValueError(f"unknown position(s) {bad}; choose from "
                             f"{', '.join(CANDIDATE_POSITIONS)}")
        return list(dict.fromkeys(value))

    def identity(self) -> dict[str, Any]:
        """The settings a finished trial depends on (the budget, the rule and the held-out
        evaluation may change between resumes)."""
        loose = {"trials", "kl_cap", "evaluate", "heldout_harmful", "heldout_harmless",
                 "heldout_split", "heldout_limit", "capability_limit"}
        return {k: v for k, v in self.model_dump().items() if k not in loose}


__all__ = ["CANDIDATE_POSITIONS", "AbliterateConfig"]
