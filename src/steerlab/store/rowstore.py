"""The one resumable row store: a versioned JSONL file of typed rows.

Layout 1: a header line (format, version, kind of rows, and the run identity: all that
changes a row, e.g. model fingerprint, dtype, specs, settings), then one row a line,
appended and flushed as rows finish. Opening checks, before any byte changes: the path
policy (:mod:`steerlab.store.outputs`), the header's kind, version and identity, then every
row (it decodes; the caller's ``check`` accepts it); only then is a torn last line from
a kill cut off. New and reloaded rows both go through the codec's JSON round trip, so a
fresh run and a resumed one get the same types.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from steerlab.store.atomic import write_text
from steerlab.store.outputs import OutputError, output_file

if TYPE_CHECKING:
    from steerlab.model.loading import LoadedModel

R = TypeVar("R")
FORMAT = "steerlab.rows"
VERSION = 1


@dataclass(frozen=True)
class Codec(Generic[R]):
    """How one kind of row is keyed and turned to and from a JSON object."""

    key: Callable[[R], Hashable]
    encode: Callable[[R], dict[str, Any]]
    decode: Callable[[dict[str, Any]], R]


def dict_codec(*fields: str) -> Codec[dict[str, Any]]:
    """Rows that stay JSON objects, keyed by ``fields`` (which every row must have)."""

    def decode(data: dict[str, Any]) -> dict[str, Any]:
        missing = [f for f in fields if f not in data]
        if missing:
            raise ValueError(f"it has no {', '.join(missing)}")
        return data

    def key(row: dict[str, Any]) -> Hashable:
        return tuple(str(row[f]) for f in fields)

    return Codec(key, dict, decode)


def jsonable(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(value, ensure_ascii=False, default=str))


def model_identity(lm: LoadedModel) -> dict[str, str]:
    """The model part of a run identity: its fingerprint and the dtype it ran in."""
    return {"model_fingerprint": lm.fingerprint, "dtype": str(lm.dtype).removeprefix("torch.")}


def header(path: Path) -> dict[str, Any] | None:
    """The store header of ``path``, or None when its first line is not one."""
    try:
        with path.open("rb") as handle:
            first = handle.readline(1 << 20)
        data = json.loads(first)
    except (OSError, ValueError):
        return None
    if isinstance(data, dict) and data.get("format") == FORMAT:
        return data
    return None


def is_store(path: Path, kind: str) -> bool:
    """Whether ``path`` is a row store of ``kind`` (or an empty file: nothing to lose)."""
    try:
        if path.stat().st_size == 0:
            return True
    except OSError:
        return False
    found = header(path)
    return found is not None and found.get("kind") == kind


def identity_diffs(old: Mapping[str, Any], new: Mapping[str, Any],
                   prefix: str = "") -> list[str]:
    """``key: old -> new`` for each identity field that differs, nested fields by dotted
    path (long values shortened)."""

    def short(value: Any) -> str:
        text = json.dumps(value, ensure_ascii=False, sort_keys=True)
        return text if len(text) <= 80 else text[:77] + "..."

    out: list[str] = []
    for key in dict.fromkeys([*old, *new]):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += identity_diffs(a, b, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key.replace('_', ' ')}: {short(a)} -> {short(b)}")
    return out


class RowStore(Generic[R]):
    """Rows of one run keyed by ``codec.key``, resumable under the same identity."""

    def __init__(self, path: str | Path, kind: str, identity: Mapping[str, Any],
                 codec: Codec[R], *, overwrite: bool = False,
                 check: Callable[[R], str | None] | None = None, flag: str = "--out") -> None:
        self.kind, self.codec = kind, codec
        self.identity: dict[str, Any] = jsonable(dict(identity))
        self.path = output_file(path, overwrite=overwrite, flag=flag, what=f"steerlab {kind}",
                                ours=lambda p: is_store(p, kind))
        self._rows: dict[Hashable, R] = {}
        if overwrite or not self.path.exists() or self.path.stat().st_size == 0:
            self.replace([])
        else:
            self._resume(check)

    def _header_line(self) -> str:
        return json.dumps({"format": FORMAT, "version": VERSION, "kind": self.kind,
                           "identity": self.identity}, ensure_ascii=False) + "\n"

    def _resume(self, check: Callable[[R], str | None] | None) -> None:
        raw = self.path.read_bytes()
        found = header(self.path) or {}
        if int(found.get("version", 0)) > VERSION:
            raise OutputError(f"{self.path} was written by a newer steerlab (row layout "
                              f"{found.get('version')}); upgrade steerlab or choose another --out.")
        old = found.get("identity") or {}
        diffs = identity_diffs(old, self.identity)
        if diffs:
            labels = ", ".join(k.replace("_", " ") for k in dict.fromkeys([*old, *self.identity])
                               if old.get(k) != self.identity.get(k))
            raise OutputError(
                f"{self.path} holds rows made with other settings (a different {labels}: "
                f"{'; '.join(diffs)}); resuming would mix them with new ones. Use a new --out, "
                "or pass --overwrite to start over.")
        complete, _, torn = raw.rpartition(b"\n")
        for number, line in enumerate(complete.split(b"\n")[1:], 2):
            if not line.strip():
                continue
            try:
                row = self.codec.decode(json.loads(line))
                problem = check(row) if check is not None else None
            except (ValueError, TypeError, KeyError) as exc:
                raise OutputError(
                    f"{self.path} line {number} is not a steerlab {self.kind} row ({exc}); "
                    "delete that line to regenerate it, or pass --overwrite to start over."
                ) from exc
            if problem:
                raise OutputError(f"{self.path} line {number}: {problem}; use another --out, or "
                                  "pass --overwrite to start over.")
            self._rows[self.codec.key(row)] = row
        if torn:  # a line cut off by a kill: identity and rows are checked, now repair
            with self.path.open("r+b") as handle:
                handle.truncate(len(complete) + 1)

    def replace(self, rows: Iterable[R]) -> None:
        """Rewrite every row at once (atomically: a kill leaves the old file or the new)."""
        rows = list(rows)
        write_text(self.path, self._header_line() + "".join(self._line(r) for r in rows))
        self._rows = {self.codec.key(r): r for r in rows}

    def _line(self, row: R) -> str:
        return json.dumps(self.codec.encode(row), ensure_ascii=False) + "\n"

    def __contains__(self, key: Hashable) -> bool:
        return key in self._rows

    def get(self, key: Hashable) -> R | None:
        return self._rows.get(key)

    def rows(self) -> list[R]:
        """Every row, in the order first stored (a row stored again keeps its place)."""
        return list(self._rows.values())

    @contextmanager
    def appending(self) -> Iterator[Callable[[R], R]]:
        """Yield ``put(row)``: appends and flushes one row, returns it as it reads back;
        the file is fsynced when the block ends."""
        with self.path.open("a", encoding="utf-8") as handle:

            def put(row: R) -> R:
                line = self._line(row)
                handle.write(line)
                handle.flush()
                stored = self.codec.decode(json.loads(line))
                self._rows[self.codec.key(stored)] = stored
                return stored

            try:
                yield put
            finally:
                handle.flush()
                os.fsync(handle.fileno())

    def append(self, rows: Iterable[R]) -> list[R]:
        """Append ``rows`` and fsync once; returns them as they read back."""
        rows = list(rows)
        if not rows:
            return []
        with self.appending() as put:
            return [put(r) for r in rows]


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a row file as JSON objects, for reading only (a baseline, a report): the
    header is skipped, a torn last line ignored, and an older header-less layout read too."""
    path = Path(path)
    if not path.exists():
        return []
    complete = path.read_bytes().rpartition(b"\n")[0]
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(complete.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except ValueError as exc:
            raise OutputError(f"{path} line {number} is not JSON ({exc}); fix or delete that "
                              "line.") from exc
        if not (number == 1 and isinstance(data, dict) and data.get("format") == FORMAT):
            rows.append(data)
    return rows


__all__ = ["FORMAT", "VERSION", "Codec", "RowStore", "dict_codec", "header", "identity_diffs",
           "is_store", "jsonable", "model_identity", "read_rows"]
