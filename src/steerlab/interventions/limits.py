"""Numeric bounds on what a user may ask for: steering strengths and random-control seeds.

A strength of ``1e300`` is a finite float64 but overflows to ``inf`` in float32 and bfloat16
activations, and a seed of hundreds of digits overflows torch's generator; both are refused
here, with one message, by the library, the CLI and the server alike.
"""

from __future__ import annotations

import math
import numbers

from steerlab.errors import InterventionError

MAX_ALPHA = 1e6
"""Largest ``|alpha|`` of an ``add``: far beyond any useful strength (useful ones are below
~100 times a layer's mean norm), far below float32/bfloat16 overflow (~3.4e38)."""
MAX_SEED = 2**32 - 1
"""Seeds of ``random_like`` controls lie in ``[0, MAX_SEED]``."""


def check_alpha(alpha: object, what: str = "add alpha") -> float:
    """``alpha`` as a float, or an InterventionError saying what range is allowed."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise InterventionError(f"The {what} must be a number; got {alpha!r}.")
    value = float(alpha)
    if not math.isfinite(value) or abs(value) > MAX_ALPHA:
        raise InterventionError(
            f"The {what} must be finite with |alpha| <= {MAX_ALPHA:g}; got {alpha!r} (larger "
            "strengths overflow float32 and bfloat16 activations to inf)."
        )
    return value


def check_seed(seed: object, what: str = "random_like seed") -> int:
    """``seed`` (an int or a string of digits) as an int in ``[0, MAX_SEED]``."""
    text = str(seed).strip()
    ok = isinstance(seed, int | str) and not isinstance(seed, bool) and len(text) <= 12
    value = int(text) if ok and text.lstrip("-").isdigit() else None
    if value is None or not 0 <= value <= MAX_SEED:
        shown = text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"
        raise InterventionError(
            f"The {what} must be an integer from 0 to {MAX_SEED} (2^32 - 1); got {shown}."
        )
    return value
