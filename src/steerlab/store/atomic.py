"""Atomic file writes: a temp file in the same folder, then ``os.replace``.

Readers never see a half-written artifact, and an interrupted write leaves
only a temp file that the next write replaces. The result gets the mode an
ordinary new file (or folder) gets under the user's umask, not ``mkstemp``'s
private 0600, so a report copied to a shared folder stays readable.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

# Headroom beyond the estimate: file headers, the tokenizer, and what other writers take meanwhile.
FREE_SPACE_MARGIN = 1.05
FREE_SPACE_SLACK_BYTES = 64 << 20


def umask() -> int:
    """The process's umask, read without changing it where Linux allows (``os.umask`` sets it,
    briefly, for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def temp_dir(beside: str | os.PathLike[str]) -> Path:
    """A new temp folder beside ``beside`` with an ordinary folder's mode (0777 & ~umask)."""
    target = Path(beside)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    tmp.chmod(0o777 & ~umask())
    return tmp


@contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temp file beside ``path``; rename it over ``path`` only on success.

    The file gets ``path``'s mode when it replaces one, else 0666 & ~umask.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        file_mode = stat.S_IMODE(target.stat().st_mode)
    except OSError:
        file_mode = 0o666 & ~umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, file_mode)
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_open(path, "w") as handle:
        handle.write(text)


def write_json(path: str | os.PathLike[str], obj: Any, *, indent: int = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=str) + "\n")


def free_space_shortfall(folder: str | os.PathLike[str], need_bytes: int) -> str | None:
    """Why a write of about ``need_bytes`` into ``folder`` cannot fit, or None if it can.

    Checked before writing a model-sized file, so a full disk is refused up front with
    the sizes named rather than failing half-way through a multi-GB write.
    """
    probe = Path(folder).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free >= need_bytes * FREE_SPACE_MARGIN + FREE_SPACE_SLACK_BYTES:
        return None
    return (f"it needs about {need_bytes / 1e9:.2f} GB but only {free / 1e9:.2f} GB is free "
            f"on the disk holding {probe}")


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (an OSError, or a writer's own error wrapping one) means no space left."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    return "No space left on device" in str(exc) or f"os error {errno.ENOSPC}" in str(exc)
