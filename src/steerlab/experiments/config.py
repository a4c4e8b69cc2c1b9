"""Typed, documented experiment settings: one base every experiment's config extends.

Each field's docstring is its description; ``--config FILE`` (YAML or JSON)
overrides any of them, and the resolved config is written into results.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Self

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
)

from steerlab.errors import SteerlabError


class FileConfig(BaseModel):
    """A settings model that loads from a YAML/JSON file with command-line overrides."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        """Each field's docstring is its description; a wrapped docstring still reads as one
        line, and the schema is rebuilt to show it."""
        super().__pydantic_init_subclass__(**kwargs)
        for field in cls.model_fields.values():
            if field.description:
                field.description = " ".join(field.description.split())
        cls.model_rebuild(force=True)

    @classmethod
    def from_file(cls, path: str | Path | None, **overrides: Any) -> Self:
        """Load a YAML/JSON config (or none), then apply non-None ``overrides``."""
        data: dict[str, Any] = {}
        if path is not None:
            file = Path(path)
            if not file.is_file():
                raise SteerlabError(f"Config file {file} does not exist; check the path.")
            try:
                loaded = yaml.safe_load(file.read_text())
            except yaml.YAMLError as exc:
                raise SteerlabError(f"Config file {file} is not valid YAML/JSON: {exc}") from exc
            if not isinstance(loaded, dict):
                raise SteerlabError(f"Config file {file} must hold a mapping of settings.")
            data.update(loaded)
        data.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**data)
        except ValidationError as exc:
            fields = ", ".join(
                ".".join(map(str, e["loc"])) + f" ({e['msg']})" for e in exc.errors()
            )
            raise SteerlabError(f"Invalid {cls.__name__} settings: {fields}.") from exc


class ExperimentConfig(FileConfig):
    """Settings every experiment shares; each experiment's config extends it."""

    selection_limit: int = Field(default=16, ge=2)
    """Validation prompts per side for the ablation layer selection."""
    selection_stride: int = Field(default=2, ge=1)
    """Ablation selection tries every k-th layer of the middle 20-80%."""
    seed: int = 0
    """Seed for random controls and any sampling."""
    max_new_tokens: int = Field(default=32, ge=1)
    """Greedy tokens generated per prompt."""
    batch_size: int = Field(default=128, ge=1)
    """Rows per generation batch; an experiment's conditions share batches, and a decode step's
    cost grows slowly with its rows, so large batches pay."""
    eval_prompts: str = "paired:harmful"
    """Evaluation prompts: built-in or file."""
    eval_split: str | None = "test"
    """Split of eval_prompts (None for files)."""
    limit: int | None = Field(default=None, ge=1)
    """Use only the first N evaluation prompts."""
    harmless_prompts: str = "harmless"
    """Harmless prompts for KL (and more)."""
    harmless_split: str = "test"
    """Split of harmless_prompts."""
    harmless_limit: int = Field(default=32, ge=2)
    """Harmless prompts used for KL."""
    position: str = "last"
    """Token position the directions are read at."""
    extraction_limit: int | None = Field(default=None, ge=2)
    """Cap on prompt pairs when extracting directions (None: all)."""
    kl_tokens: int = Field(default=4, ge=1)
    """KL averaged over this many baseline tokens."""
    judge_url: str | None = None
    """OpenAI-compatible judge endpoint (optional)."""
    judge_model: str = "judge"
    """Model name sent to the judge endpoint."""
    n_samples: int = Field(default=2, ge=0)
    """Sample generations per condition in the report."""


class RefusalExperimentConfig(ExperimentConfig):
    """Settings of the refusal-structure experiments (layer transfer, subspace, ...)."""

    layer_selection: Literal["ablation", "cohens_d"] = "ablation"
    """How a direction's layer is chosen on the validation split: 'ablation' (Arditi et al.:
    lowest refusal score with it ablated, induce and KL filters) or 'cohens_d' (largest held-out
    Cohen's d; cheaper)."""


class PersonaGatingConfig(ExperimentConfig):
    """Settings of ``steerlab reproduce persona-gating``."""

    val_prompts: str = "paired:harmful"
    """Prompts for choosing layer and strength."""
    val_split: str = "val"
    """Split of val_prompts; never the evaluation split."""
    val_limit: int = Field(default=24, ge=2)
    """Validation prompts per grid cell."""
    harmless_limit: int = Field(default=48, ge=2)
    """Harmless prompts for over-refusal and KL."""
    harmless_for: Literal["all", "steering"] = "all"
    """Which evaluation conditions also run on the harmless prompts: all (each re-add layer and
    projection too: does re-added refusal land on harmless prompts as well?) or steering
    (baseline, persona_steer, random_steer, refusal_ablate)."""
    steer_layer_fractions: list[float] = [0.33, 0.5, 0.67]
    """Candidate persona-steering layers, as fractions of depth."""
    alphas: list[float] = [4.0, 8.0, 12.0]
    """Candidate persona strengths, in multiples of the raw diff-in-means vector."""
    max_degenerate_rate: float = Field(default=0.25, ge=0, le=1)
    """Grid cells whose validation degenerate rate exceeds this are not chosen."""
    val_tolerance: int = Field(default=1, ge=0)
    """Grid cells whose validation refusal count is within this many prompts of the lowest count
    as tied, and the smallest strength among them is chosen (then the earlier layer): one
    validation prompt flips with rounding, and the smallest strength that works is the fair one
    to hold random directions of the same norm to."""
    readd_alpha: float | None = None
    """Refusal re-add strength, in multiples of the raw refusal vector (None: chosen on the
    validation split from readd_alphas)."""
    readd_alphas: list[float] = Field(default=[2.0, 4.0, 8.0], min_length=1)
    """Re-add strengths tried on the validation split, at the layer at 75% of depth, while
    persona-steered: the smallest that restores the validation baseline's refusal rate
    (coherently) is used at every re-add layer."""
    readd_every: int = Field(default=1, ge=1)
    """Re-add the refusal direction at every k-th layer (1: every layer, the paper's by-layer
    curve; 2 halves those conditions on deep models)."""
    early_window: list[int] | None = None
    """Layers of the early projection window (default: first third)."""
    late_window: list[int] | None = None
    """Layers of the late projection window (default: layers ≥ 58% of depth)."""
    random_seeds: list[int] = Field(default=[0, 1, 2, 3, 4], min_length=5)
    """Seeds of the random-direction controls (≥5)."""
    kl_tokens: int = Field(default=1, ge=1)
    """Harmless-prompt KL: 1 reads the first-token KL off the harmless generations (no extra
    pass); k > 1 also averages it over the first k baseline tokens (teacher-forced, one extra
    pass per steered condition)."""
    trait_per_question: int = Field(default=1, ge=1)
    """Persona pairs each neutral question is read under for the four trait directions (the
    compliant-persona direction uses 2). Traits only feed per-layer cosines, so they skip the
    held-out Cohen's d pass too."""
    trait_questions: int | None = Field(default=50, ge=2)
    """Neutral training questions the four trait directions read (None: all 75). On the
    embedded model 50 move the reported trait cosines by at most 0.03 at layers 1-23 (0.08 at
    layer 0) against all 75, for two thirds of the cost."""

    refusal_direction: str | None = None
    """Folder of a saved refusal direction (from `steerlab extract` or a `steerlab abliterate`
    run) to ablate and re-add, at its best layer, instead of extracting one and selecting its
    layer (None: extract and select)."""

    @model_serializer(mode="wrap")
    def _drop_unset_direction(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Leave refusal_direction out while unset, so a run's settings identity (and the
        resolved config in results.json) stays what it was before the field existed."""
        data: dict[str, Any] = handler(self)
        if data.get("refusal_direction") is None:
            data.pop("refusal_direction", None)
        return data

    def windows(self, n_layers: int) -> tuple[list[int], list[int]]:
        """(early, late) projection windows for a model with ``n_layers`` layers."""
        early = self.early_window or list(range(0, max(1, n_layers // 3)))
        late = self.late_window or list(range(round(0.58 * n_layers), n_layers))
        for name, window in (("early_window", early), ("late_window", late)):
            if not window or min(window) < 0 or max(window) >= n_layers:
                raise SteerlabError(
                    f"{name}={window} is outside the model's layers 0..{n_layers - 1}."
                )
        return early, late
