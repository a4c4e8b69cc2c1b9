"""Which models have steering hooked that depends on the batch's layout: a position-dependent spec
reads its prompt/generation phase off the KV cache, a row-masked one expects the batch's own rows.
Fast paths that reshape a batch (one shared-prefix pass for all rows) must run such a model whole;
:func:`steerlab.interventions.steering.steer` marks it here."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

_HELD: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()


@contextmanager
def layout_bound(model: nn.Module) -> Iterator[None]:
    """Mark ``model`` as layout-bound inside the block (nested marks count)."""
    _HELD[model] = _HELD.get(model, 0) + 1
    try:
        yield
    finally:
        _HELD[model] -= 1
        if not _HELD[model]:
            del _HELD[model]


def is_layout_bound(model: nn.Module) -> bool:
    """Whether some active steering on ``model`` depends on the batch's layout."""
    return model in _HELD
