"""The intervention spec API in one place (re-exported from
:mod:`steerlab.interventions.spec_types`, :mod:`steerlab.interventions.spec_syntax`,
:mod:`steerlab.interventions.spec_resolution` and :mod:`steerlab.interventions.layer_spec`)."""

from __future__ import annotations

from steerlab.interventions.kernel_ablate import Kernel, KernelAblate
from steerlab.interventions.layer_spec import (
    MAX_LAYERS,
    format_layers,
    parse_layers,
    resolve_layers,
)
from steerlab.interventions.spec_resolution import (
    DirectionRegistry,
    random_like,
    resolve_direction,
    resolve_specs,
)
from steerlab.interventions.spec_syntax import (
    load_specs,
    parse_compact,
    parse_steer,
    parse_steer_args,
    spec_from_dict,
    spec_to_dict,
    specs_from_json,
    specs_to_json,
    to_compact,
)
from steerlab.interventions.spec_types import (
    POSITIONS,
    SCALES,
    SITES,
    Ablate,
    Add,
    DirectionRef,
    Project,
    Spec,
    SubspaceAblate,
    spec_refs,
)

__all__ = [
    "MAX_LAYERS", "POSITIONS", "SCALES", "SITES", "Ablate", "Add", "DirectionRef",
    "DirectionRegistry", "Kernel", "KernelAblate",
    "Project", "Spec", "SubspaceAblate", "format_layers", "load_specs",
    "parse_compact", "parse_layers", "parse_steer", "parse_steer_args", "random_like",
    "resolve_direction", "resolve_layers", "resolve_specs", "spec_from_dict", "spec_refs",
    "spec_to_dict", "specs_from_json", "specs_to_json", "to_compact",
]
