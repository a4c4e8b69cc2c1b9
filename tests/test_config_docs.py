"""Every settings field is documented: config fields take their description from the
attribute docstring under them, so a field written without one would silently lose its
help text."""

from __future__ import annotations

from pydantic import BaseModel

import steerlab.abliterate.config
import steerlab.experiments.hydra
import steerlab.experiments.layer_transfer
import steerlab.experiments.positions
import steerlab.experiments.subspace  # noqa: F401  (the imports define the config classes)
from steerlab.experiments.config import FileConfig


def _configs(base: type[BaseModel]) -> list[type[BaseModel]]:
    subs = base.__subclasses__()
    return subs + [c for s in subs for c in _configs(s)]


def test_every_config_field_has_a_one_line_description() -> None:
    configs = {c.__name__: c for c in _configs(FileConfig)}
    assert {"ExperimentConfig", "RefusalExperimentConfig", "PersonaGatingConfig",
            "AbliterateConfig", "HydraConfig", "LayerTransferConfig", "PositionsConfig",
            "SubspaceConfig"} <= set(configs)
    for name, config in configs.items():
        schema = config.model_json_schema()["properties"]
        for field, info in config.model_fields.items():
            text = info.description
            assert text and text.strip(), f"{name}.{field} has no docstring"
            assert text == " ".join(text.split()), f"{name}.{field}: {text!r} is not one line"
            assert schema[field]["description"] == text, f"{name}.{field}"
