"""Turn pydantic/FastAPI validation errors into one message that names the field.

``steer[0].alpha: Input should be a valid number`` instead of a list of
location tuples; malformed JSON and non-object bodies are 400, field errors 422.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_TYPE_LABELS = {"str", "int", "float", "bool", "list", "dict", "none"}
_OP_TAGS = {"add", "ablate", "project", "subspace_ablate", "kernel_ablate"}
"""The ``op`` discriminator values of ``schemas.SteerItem`` (pydantic puts them in locations)."""


def field_path(loc: Sequence[Any]) -> str:
    """``('body', 'steer', 0, 'add', 'alpha')`` -> ``steer[0].alpha``."""
    parts: list[str] = []
    prev: Any = None
    for item in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif (not str(item).isidentifier() or str(item) in _TYPE_LABELS
              or str(item)[:1].isupper() or (isinstance(prev, int) and item in _OP_TAGS)):
            pass  # a union branch label, not a field
        else:
            parts.append(f".{item}" if parts else str(item))
        prev = item
    return "".join(parts) or "body"


def format_validation_error(errors: Sequence[dict[str, Any]]) -> tuple[int, str, str]:
    """(HTTP status, field path, message) for a list of validation errors."""
    if not errors:
        return 422, "body", "The request body is invalid."
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return 400, "body", f"The request body is not valid JSON ({detail})."
    loc = tuple(first.get("loc") or ())
    if loc in (("body",), ()) and first.get("type") in ("missing", "model_attributes_type",
                                                        "dict_type", "model_type"):
        return 400, "body", "The request body must be a JSON object."
    param = field_path(loc)
    same = [e for e in errors if field_path(tuple(e.get("loc") or ())) == param]
    messages = list(dict.fromkeys(str(e.get("msg", "invalid")) for e in same))
    message = f"{param}: {' or '.join(messages)}"
    others = len({field_path(tuple(e.get("loc") or ())) for e in errors}) - 1
    if others:
        message += f" (and {others} more invalid field{'s' if others > 1 else ''})"
    return 422, param, message
