"""steerlab: find, measure and edit the directions inside chat LLMs that carry
refusal and persona.

The public API is re-exported here flat; importing steerlab has no side
effects (no model loads, no logging or excepthook changes).
"""

from __future__ import annotations

from steerlab.architectures import ARCHITECTURES, Architecture, architecture_for
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
from steerlab.model import LoadedModel, load_model, model_fingerprint

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "ArchitectureError",
    "DataError",
    "DirectionError",
    "EmbeddedModelError",
    "EvaluationError",
    "InterventionError",
    "LoadedModel",
    "ModelLoadError",
    "SteerlabError",
    "__version__",
    "architecture_for",
    "load_model",
    "model_fingerprint",
]
