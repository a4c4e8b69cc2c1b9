"""The one place benchmarks write their section of BENCHMARKS.md.

Each benchmark owns one ``## name`` section and opens it with what it measures and the
command that reruns it, so a ``--write`` run leaves the file as readable as a hand edit.
"""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime
from pathlib import Path

from steerlab.store.atomic import write_text

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
LOAD_AT_START = os.getloadavg()[0]  # benchmarks import this module before they measure


def measured_when() -> str:
    """The day and how busy the machine was: a reader needs both to judge the figures."""
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    return (f"Measured {day} on {os.cpu_count()} cores; load average {LOAD_AT_START:.1f} "
            f"when the benchmark started, {os.getloadavg()[0]:.1f} when it ended.")


def section(name: str, what: str, rerun: str, body: str) -> str:
    """A section: heading, what it measures, how to rerun it, when and under what load it
    ran, then the measured body."""
    return (f"## {name}\n\nWhat it measures: {what} Rerun: `{rerun}`.\n\n{measured_when()}\n\n"
            f"{body.strip()}\n")


def write_section(name: str, text: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace (or append) the ``## name`` section of ``path`` atomically, leaving the rest."""
    old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
    block = text.strip() + "\n"
    if pattern.search(old):
        new = pattern.sub(lambda _: block + "\n", old, count=1).rstrip() + "\n"
    else:
        new = old.rstrip() + "\n\n" + block
    write_text(path, new)
