"""What every export shares: the edit record, the error, and writing a folder atomically."""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from steerlab.errors import SteerlabError
from steerlab.store.atomic import temp_dir
from steerlab.version import __version__

if TYPE_CHECKING:
    from steerlab.model.loading import LoadedModel

FORMATS = ("hf", "lora", "gguf-cvec")
EDIT_FILE = "steerlab_edit.json"


class ExportError(SteerlabError):
    """An export target exists, or the edit cannot be written in the requested format."""


def edit_provenance(lm: LoadedModel | None) -> dict[str, Any]:
    info: dict[str, Any] = {
        "created_by": f"steerlab {__version__}",
        "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
    }
    if lm is not None:
        info.update(model_name=lm.name, model_spec=lm.spec, model_type=lm.model.config.model_type)
    return info


@contextmanager
def staged_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temp folder beside ``out`` to fill in the block, renamed to ``out`` when the block
    ends (an old export is replaced only then) and removed if the block raises, so ``out``
    is never half-written."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ExportError(
            f"{out} already exists and is not empty; choose another --out or pass overwrite=True "
            "(--overwrite)."
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(out)
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ExportError(f"Unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}.")
    return fmt


def edit_record(path: str | Path) -> dict[str, Any] | None:
    """The ``steerlab_edit.json`` of an exported folder, if any."""
    file = Path(path) / EDIT_FILE
    return json.loads(file.read_text()) if file.is_file() else None
