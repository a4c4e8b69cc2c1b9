"""steerlab: find, measure and edit the directions inside chat LLMs that carry
refusal and persona.

The public API is re-exported here flat; importing steerlab has no side
effects (no model loads, no logging or excepthook changes).
"""

from __future__ import annotations

from steerlab.activations.record import (
    ActivationStats,
    mean_activations,
    project_activations,
    record_activations,
)
from steerlab.directions.analysis import ScanResult, scan
from steerlab.directions.artifact import Direction, DirectionMeta
from steerlab.directions.extraction import (
    extract_direction,
    persona_direction,
    refusal_direction,
    register_method,
    trait_direction,
)
from steerlab.directions.selection import SelectionResult, select_direction
from steerlab.directions.separability import cohens_d, cosine_matrix, probe_accuracies
from steerlab.errors import (
    ArchitectureError,
    DataError,
    DirectionError,
    EmbeddedModelError,
    EvaluationError,
    InterventionError,
    ModelLoadError,
    SteerlabError,
)
from steerlab.evaluate.backends import InProcessBackend, OpenAIBackend
from steerlab.evaluate.capability import capability_accuracy
from steerlab.evaluate.classifier import LocalClassifier
from steerlab.evaluate.compare import CompareConfig, compare_models
from steerlab.evaluate.degeneracy import DegeneracyDetector, is_degenerate
from steerlab.evaluate.judge import Judge, JudgeScore
from steerlab.evaluate.kl import kl_divergence
from steerlab.evaluate.outcome import outcome
from steerlab.evaluate.perplexity import perplexity
from steerlab.evaluate.refusal import RefusalScorer, is_refusal
from steerlab.evaluate.run import run_eval
from steerlab.evaluate.stats import (
    bootstrap_ci,
    cohens_kappa,
    mcnemar,
    paired_bootstrap,
    rate_summary,
    wilson_ci,
)
from steerlab.generation.generate import Generation, GenerationError, generate
from steerlab.interventions.specs import (
    Ablate,
    Add,
    DirectionRegistry,
    Project,
    SubspaceAblate,
    parse_steer,
    random_like,
    specs_from_json,
    specs_to_json,
)
from steerlab.interventions.steering import steer
from steerlab.model.architectures import ARCHITECTURES, Architecture, architecture_for
from steerlab.model.loading import LoadedModel, load_model, model_fingerprint
from steerlab.prompts.sets import Prompt, PromptSet, builtin_sets, load_prompts, persona_pairs
from steerlab.reporting.plots import save_scan_plots
from steerlab.version import __version__
from steerlab.weights.export.common import ExportError
from steerlab.weights.export.gguf_cvec import export_gguf_cvec, read_gguf_cvec
from steerlab.weights.export.hf import export_hf
from steerlab.weights.export.lora import (
    adapter_cosines,
    export_lora,
    load_edited,
    read_lora_directions,
)
from steerlab.weights.orthogonalize import OrthogonalizeResult, orthogonalize

__all__ = [
    "ARCHITECTURES",
    "Ablate",
    "ActivationStats",
    "Add",
    "Architecture",
    "ArchitectureError",
    "CompareConfig",
    "DataError",
    "DegeneracyDetector",
    "Direction",
    "DirectionError",
    "DirectionMeta",
    "DirectionRegistry",
    "EmbeddedModelError",
    "EvaluationError",
    "ExportError",
    "Generation",
    "GenerationError",
    "InProcessBackend",
    "InterventionError",
    "Judge",
    "JudgeScore",
    "LoadedModel",
    "LocalClassifier",
    "ModelLoadError",
    "OpenAIBackend",
    "OrthogonalizeResult",
    "Project",
    "Prompt",
    "PromptSet",
    "RefusalScorer",
    "ScanResult",
    "SelectionResult",
    "SteerlabError",
    "SubspaceAblate",
    "__version__",
    "adapter_cosines",
    "architecture_for",
    "bootstrap_ci",
    "builtin_sets",
    "capability_accuracy",
    "cohens_d",
    "cohens_kappa",
    "compare_models",
    "cosine_matrix",
    "create_app",
    "export_gguf_cvec",
    "export_hf",
    "export_lora",
    "extract_direction",
    "generate",
    "is_degenerate",
    "is_refusal",
    "kl_divergence",
    "load_edited",
    "load_model",
    "load_prompts",
    "mcnemar",
    "mean_activations",
    "model_fingerprint",
    "orthogonalize",
    "outcome",
    "paired_bootstrap",
    "parse_steer",
    "perplexity",
    "persona_direction",
    "persona_pairs",
    "probe_accuracies",
    "project_activations",
    "random_like",
    "rate_summary",
    "read_gguf_cvec",
    "read_lora_directions",
    "record_activations",
    "refusal_direction",
    "register_method",
    "run_eval",
    "save_scan_plots",
    "scan",
    "select_direction",
    "specs_from_json",
    "specs_to_json",
    "steer",
    "trait_direction",
    "wilson_ci",
]


def __getattr__(name: str) -> object:
    # create_app is imported lazily: FastAPI costs ~0.5 s to import and most users never serve.
    if name == "create_app":
        from steerlab.serve import create_app

        return create_app
    raise AttributeError(f"module 'steerlab' has no attribute {name!r}")
