"""Where the benchmarks find what lies outside the repository: the public prompt sets
(``../shared/data`` beside it, overridable with ``--data``) and the peers' interpreter
(``$STEERLAB_PEERS_PYTHON``, overridable with ``--peers-python``)."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
PEERS_PYTHON = os.environ.get("STEERLAB_PEERS_PYTHON")
