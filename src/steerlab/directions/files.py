"""A direction folder on disk: one validator for what is read, one atomic swap for what is
written.

Every loader (``Direction.load``, and through it the CLI, the experiments and the server at
start-up) reads through :func:`read_vectors` and :func:`read_manifest`, so a truncated,
foreign or non-finite file is refused with one message instead of a traceback or a model that
prints ``!!!!``. :func:`commit_folder` writes a whole folder beside the target and swaps it in
with one rename, so a kill at any step leaves the old direction or the new one, never new
vectors under old metadata.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file

from steerlab.errors import DirectionError

T = TypeVar("T")
VECTORS_KEY = "vectors"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # Linux renameat2 flag
_RENAME_SWAP = 2  # macOS renamex_np flag


class Manifest(BaseModel):
    """The shape of ``direction.json``; ``meta`` is checked against the metadata type."""

    model_config = ConfigDict(extra="allow")

    format_version: int = Field(ge=1)
    layers: list[int] = Field(min_length=1)
    meta: dict[str, Any] = Field(default_factory=dict)


def check_finite(vectors: torch.Tensor, what: str) -> None:
    """Refuse NaN or infinite entries: steering with them turns every token into noise."""
    if not vectors.is_floating_point():
        raise DirectionError(f"{what} must hold floating-point vectors; got {vectors.dtype}.")
    if vectors.numel() and not bool(torch.isfinite(vectors).all()):
        bad = int((~torch.isfinite(vectors)).sum())
        raise DirectionError(
            f"{what} has {bad} NaN or infinite value(s) of {vectors.numel()}; re-extract it "
            "(a NaN usually means an empty prompt set or an overflow in float16)."
        )


def read_vectors(path: Path) -> torch.Tensor:
    """The ``vectors`` tensor of a ``direction.safetensors`` file, checked for shape and values."""
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise DirectionError(
            f"{path} is not a readable safetensors file ({_first_line(exc)}); it is truncated "
            "or corrupt: re-extract the direction."
        ) from exc
    if VECTORS_KEY not in tensors:
        raise DirectionError(
            f"{path} has no {VECTORS_KEY!r} tensor (it has: {', '.join(sorted(tensors)) or 'none'})"
            "; it is not a steerlab direction file."
        )
    vectors = tensors[VECTORS_KEY]
    if vectors.ndim != 2 or 0 in vectors.shape:
        raise DirectionError(
            f"{path}: {VECTORS_KEY!r} must have shape [n_layers, d_model]; got "
            f"{tuple(vectors.shape)}."
        )
    check_finite(vectors, str(path))
    return vectors


def read_manifest(path: Path, meta_type: type[T]) -> tuple[int, tuple[int, ...], T]:
    """``(format_version, layers, meta)`` from ``direction.json``, every field type-checked."""
    where = ""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        manifest = Manifest.model_validate(raw)
        where = "meta."
        meta = TypeAdapter(meta_type).validate_python(manifest.meta)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DirectionError(f"{path} is not readable JSON ({exc}); re-extract the direction.") \
            from exc
    except ValidationError as exc:
        raise DirectionError(
            f"{path} is malformed ({_pydantic_summary(exc, where)}); re-extract the direction."
        ) from exc
    return manifest.format_version, tuple(manifest.layers), meta


def commit_folder(target: Path, write: Callable[[Path], None], own: tuple[str, ...]) -> None:
    """Write a folder with ``write(stage)`` into a sibling, then swap it in with one rename.

    Files of an existing ``target`` other than ``own`` (a scan's plots, notes) are carried
    over by hard link. Where the filesystem cannot exchange two folders atomically, the old
    folder is renamed aside first (a kill between the two renames leaves it beside the target).
    """
    if target.exists() and not target.is_dir():
        raise DirectionError(f"{target} exists and is not a folder; a direction is a folder.")
    target = target.resolve() if target.exists() else target.absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_stages(target)
    stage = _sibling(target, "staged")
    try:
        write(stage)
        if target.is_dir():
            _carry_over(target, stage, own)
        _fsync_dir(stage)
        if not target.exists():
            os.rename(stage, target)
        elif _exchange(stage, target):
            shutil.rmtree(stage)
        else:
            aside = _sibling(target, "replaced", create=False)
            os.rename(target, aside)
            os.rename(stage, target)
            shutil.rmtree(aside)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def fsync_file(path: Path) -> None:
    """Flush a written file to disk before it is renamed into place."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sibling(target: Path, kind: str, *, create: bool = True) -> Path:
    while True:
        path = target.parent / f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"
        if not create:
            return path
        try:
            path.mkdir()  # the mode an ordinary folder gets under the user's umask
            return path
        except FileExistsError:
            continue


def _remove_dead_stages(target: Path) -> None:
    """Remove staging folders left by a writer that was killed (its process is gone)."""
    for path in target.parent.glob(f".{target.name}.staged-*"):
        pid = path.name.rsplit(".staged-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _carry_over(old: Path, stage: Path, own: tuple[str, ...]) -> None:
    for entry in old.iterdir():
        if entry.name in own or (stage / entry.name).exists():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, stage / entry.name, copy_function=_link_or_copy, symlinks=True)
        else:
            _link_or_copy(str(entry), str(stage / entry.name))


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)
    return dst


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two folders (Linux renameat2, macOS renamex_np); False if unsupported."""
    libc = ctypes.CDLL(None, use_errno=True)
    src, dst = os.fsencode(a), os.fsencode(b)
    if hasattr(libc, "renameat2"):
        rc = libc.renameat2(_AT_FDCWD, src, _AT_FDCWD, dst, _RENAME_EXCHANGE)
    elif hasattr(libc, "renamex_np"):
        rc = libc.renamex_np(src, dst, _RENAME_SWAP)
    else:
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the renames are still ordered
    finally:
        os.close(fd)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _pydantic_summary(exc: ValidationError, prefix: str = "") -> str:
    parts = []
    for err in exc.errors()[:3]:
        where = prefix + ".".join(str(p) for p in err["loc"]) if err["loc"] else "top level"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)
