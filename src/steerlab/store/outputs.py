"""Where a command may write: one policy for every ``--out``.

- A path of the wrong kind (a folder where a file goes, or the reverse), a folder that
  cannot be created, or a place the user may not write: one :class:`OutputError` that
  names it, raised before any work starts.
- What steerlab did not write is never written over without ``--overwrite``.
- A run steerlab wrote is resumed only under the same run identity
  (:mod:`steerlab.store.rowstore` checks that before it touches a byte).
- ``--overwrite`` replaces.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from steerlab.errors import DataError


class OutputError(DataError):
    """An output path cannot be written as asked (wrong kind, not writable, not ours)."""


def _folder(folder: Path, flag: str) -> None:
    """Create ``folder`` and its parents, or say in one line why it cannot be."""
    block = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if block is not None and not block.is_dir():
        raise OutputError(f"{block} is a file, so {flag} cannot put anything under it; "
                          f"choose another {flag}.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"Cannot create the folder {folder} for {flag} "
                          f"({exc.strerror or exc}); choose another {flag}.") from exc
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"Cannot write in {folder} (permission denied); choose another {flag}.")


def output_file(path: str | Path, *, overwrite: bool = False, flag: str = "--out",
                ours: Callable[[Path], bool] | None = None, what: str = "steerlab") -> Path:
    """Check a file output: not a folder, its folder writable, and an existing file only
    when ``ours(path)`` says steerlab wrote it (or with ``overwrite``)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{flag} {path} is a folder; {flag} takes a file path here.")
    _folder(path.parent, flag)
    if path.exists():
        if not os.access(path, os.W_OK):
            raise OutputError(f"Cannot write {path} (permission denied); choose another {flag}.")
        if not overwrite and not (ours is not None and ours(path)):
            raise OutputError(
                f"{path} exists and was not written by {what} (or by an older steerlab whose "
                f"layout this version does not resume); pass --overwrite to replace it, or "
                f"choose another {flag}.")
    return path


def output_dir(path: str | Path, *, overwrite: bool = False, flag: str = "--out",
               ours: Callable[[Path], bool] | None = None, what: str = "steerlab") -> Path:
    """Check and create a folder output: not a file, writable, and non-empty only when
    ``ours(path)`` says it holds a run this command resumes (or with ``overwrite``)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {path} is a file; {flag} takes a folder here.")
    _folder(path, flag)
    if overwrite or not any(path.iterdir()) or (ours is not None and ours(path)):
        return path
    held = (f" and holds no {what} run this version can resume (an older steerlab's run needs "
            "--overwrite too)") if ours is not None else ""
    raise OutputError(f"{path} is not empty{held}; pass --overwrite to write over it, or choose "
                      f"another {flag}.")


def clear_run_dir(path: str | Path, flag: str = "--out") -> None:
    """Delete run folder ``path`` for ``--overwrite`` (a run folder's cached steps would
    otherwise be reused); refuses a folder that holds the working directory or a git
    checkout, where a mistyped ``--out`` would delete the user's work."""
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise OutputError(f"{flag} {path} is a file; {flag} takes a folder here.")
    here, target = Path.cwd().resolve(), path.resolve()
    if target == here or target in here.parents or (target / ".git").exists():
        raise OutputError(f"--overwrite would delete {path}, which holds the working directory "
                          f"or a git checkout; choose a run folder of its own for {flag}.")
    shutil.rmtree(target)


__all__ = ["OutputError", "clear_run_dir", "output_dir", "output_file"]
