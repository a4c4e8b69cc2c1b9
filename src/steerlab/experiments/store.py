"""``responses.jsonl``: the append-only record of every generation of an experiment run.

One row per (condition, prompt id), in the layout of :mod:`steerlab.store.rowstore`: its
header holds the run identity (model fingerprint, dtype, and the settings that change
what is generated), checked before anything in the run folder changes. The runner
appends and fsyncs finished rows at most a second after they finish, so an interrupted
run loses only rows still generating (or finished in its last second); on reopen a torn
last line is dropped and finished rows are never generated again. Rows are in the order
they finished: read a condition's rows by prompt id, not by position.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import steerlab.store.rowstore as rowstore
from steerlab.errors import SteerlabError
from steerlab.store.outputs import output_dir
from steerlab.store.rowstore import RowStore, dict_codec, jsonable, model_identity

if TYPE_CHECKING:
    from steerlab.model.loading import LoadedModel

ROWS = "responses.jsonl"
# Settings that change only how results are reported, never what is generated.
REPORT_ONLY_SETTINGS = frozenset({"n_samples", "judge_url", "judge_model"})
# Settings that change only how fast rows are generated (a resumed run may lower the
# batch size after running out of memory, or raise it on a larger machine).
SPEED_ONLY_SETTINGS = frozenset({"batch_size"})
RESUMABLE_ACROSS = REPORT_ONLY_SETTINGS | SPEED_ONLY_SETTINGS
ROW_CODEC = dict_codec("condition", "prompt_id")


def run_identity(lm: LoadedModel, settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """What an experiment run folder is a run of: the model, its dtype, and the settings
    that change a row (report-only and speed-only settings may change on resume)."""
    identity: dict[str, Any] = model_identity(lm)
    if settings is not None:
        identity["settings"] = jsonable({k: v for k, v in settings.items()
                                         if k not in RESUMABLE_ACROSS})
        files = prompt_file_hashes(settings)
        if files:
            identity["prompt_files"] = files
    return identity


def prompt_file_hashes(settings: Mapping[str, Any]) -> dict[str, str]:
    """SHA-256 of each prompt file a ``*_prompts`` setting names (built-in sets are fixed
    by the version): an edited file under the same path never resumes rows generated from
    its old texts."""
    return {key: hashlib.sha256(Path(value).read_bytes()).hexdigest()[:16]
            for key, value in sorted(settings.items())
            if key.endswith("_prompts") and isinstance(value, str) and Path(value).is_file()}


class ResponseStore:
    """Resumable store of generation rows keyed by ``(condition, prompt_id)``.

    With an ``identity`` it opens ``path`` for writing (checked, repaired, resumable);
    without one it only reads what is there (a report, a test).
    """

    def __init__(self, path: str | Path, identity: Mapping[str, Any] | None = None) -> None:
        self.path = Path(path)
        self._store: RowStore[dict[str, Any]] | None = None
        if identity is None:
            self._rows = {ROW_CODEC.key(r): r for r in rowstore.read_rows(self.path)}
        else:
            self._store = RowStore(self.path, "experiment", identity, ROW_CODEC)

    @classmethod
    def open_run(cls, out_dir: str | Path, identity: Mapping[str, Any]) -> ResponseStore:
        """The store of run folder ``out_dir``, which must be empty or hold a run of this
        identity (``--overwrite`` empties it first, with ``clear_run_dir``)."""
        out = output_dir(out_dir, what="steerlab experiment",
                         ours=lambda p: rowstore.is_store(p / ROWS, "experiment"))
        return cls(out / ROWS, identity)

    def _all(self) -> list[dict[str, Any]]:
        return self._store.rows() if self._store is not None else list(self._rows.values())

    def has(self, condition: str, prompt_id: str) -> bool:
        key = (condition, str(prompt_id))
        return key in self._store if self._store is not None else key in self._rows

    def rows(self, condition: str | None = None) -> list[dict[str, Any]]:
        """Rows of one condition (or all), in insertion order."""
        return [r for r in self._all() if condition is None or r["condition"] == condition]

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        if self._store is None:
            raise SteerlabError(f"{self.path} was opened for reading only.")
        self._store.append(rows)
