"""Exceptions that tell the user what was wrong and how to fix it.

The CLI prints a ``SteerlabError`` as one line and exits with code 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


class SteerlabError(Exception):
    """A user-facing error: the message names the problem and the fix."""


class ModelLoadError(SteerlabError):
    """The model could not be found or loaded."""


class EmbeddedModelError(ModelLoadError):
    """The embedded default model's parts are missing or corrupt."""


class ArchitectureError(SteerlabError):
    """The model's layout is not one steerlab knows, or the override is wrong."""


class DataError(SteerlabError):
    """A prompt file or built-in set is missing, malformed or empty."""


class DirectionError(SteerlabError):
    """A direction file is malformed or does not fit the model."""


class InterventionError(SteerlabError):
    """An intervention spec is malformed or does not fit the model."""


class EvaluationError(SteerlabError):
    """An evaluation backend, judge or scorer failed in a way the user can fix."""


class LayerError(InterventionError, DataError):
    """A layer spec that cannot be read, or names layers the model does not have."""
