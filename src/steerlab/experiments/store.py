"""``responses.jsonl``: the append-only record of every generation of a run.

One row per (condition, prompt id). The runner appends and fsyncs finished rows
at most a second after they finish, so an interrupted run loses only rows still
generating (or finished in its last second); on reopen a torn last line is
dropped and finished rows are never generated again. Rows are in the order they
finished: read a condition's rows by prompt id, not by position.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from steerlab.errors import SteerlabError


class ResponseStore:
    """Resumable store of generation rows keyed by ``(condition, prompt_id)``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._rows: dict[tuple[str, str], dict[str, Any]] = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        good: list[str] = []
        for number, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                if number == len(lines):  # torn write from an interrupted run
                    break
                raise SteerlabError(
                    f"{self.path} line {number} is not JSON ({exc}); delete that line or the file "
                    "to regenerate those rows."
                ) from exc
            self._rows[(row["condition"], str(row["prompt_id"]))] = row
            good.append(line if line.endswith("\n") else line + "\n")
        if len(good) != len(lines) or (lines and not lines[-1].endswith("\n")):
            self.path.write_text("".join(good), encoding="utf-8")

    def has(self, condition: str, prompt_id: str) -> bool:
        return (condition, str(prompt_id)) in self._rows

    def rows(self, condition: str | None = None) -> list[dict[str, Any]]:
        """Rows of one condition (or all), in insertion order."""
        return [r for (c, _), r in self._rows.items() if condition is None or c == condition]

    def conditions(self) -> list[str]:
        return list(dict.fromkeys(c for c, _ in self._rows))

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        rows = list(rows)
        if not rows:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        for row in rows:
            self._rows[(row["condition"], str(row["prompt_id"]))] = row
