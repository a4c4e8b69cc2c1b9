"""Shared pieces of the CLI: consoles, model loading with a printed dtype choice."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

if TYPE_CHECKING:
    from steerlab.model.loading import LoadedModel

# Messages are plain text, so a path or a prompt with brackets prints as written: rich markup
# is off, and styles are given explicitly (``style=``, or ``Text.assemble`` for a part).
console = Console(markup=False)
error_console = Console(stderr=True, markup=False)

MODEL_ARG = typer.Argument(
    "default",
    help="HF model directory, cached hub id, .gguf file, or 'default' "
    "(embedded Qwen2.5-Coder-0.5B).",
)
DTYPE_OPT = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16.")
RUN_DIR_OPT = typer.Option(..., "--out", help="Run folder (resumes if it exists).")
# The options of every command that writes a run folder (experiments, sweep, abliterate).
OVERWRITE_OPT = typer.Option(
    False, "--overwrite", help="Delete the run folder's earlier run and start over."
)
CONFIG_OPT = typer.Option(None, "--config", help="YAML/JSON file of config overrides.")


def load(spec: str, dtype: str = "auto", device: str | None = None) -> LoadedModel:
    """Load a model and print which dtype was chosen and why."""
    from steerlab.model.loading import load_model

    with console.status(f"Loading {spec} ..."):
        lm = load_model(spec, dtype=dtype, device=device)
    dt = str(lm.dtype).removeprefix("torch.")
    error_console.print(
        f"model {lm.name} ({lm.arch.name}, {lm.n_layers} layers, d_model {lm.d_model}), "
        f"dtype {dt} ({lm.dtype_reason}), fingerprint {lm.fingerprint}", style="dim"
    )
    return lm


def load_for_run(model: str, dtype: str, out: Path, overwrite: bool) -> LoadedModel:
    """Load the model for a command that writes the run folder ``out``; ``--overwrite``
    clears the folder's earlier run first (call it after the inputs are checked)."""
    from steerlab.store.outputs import clear_run_dir

    if overwrite:
        clear_run_dir(out)
    return load(model, dtype)


SYSTEM_HELP = (
    "System prompt: the text itself, or @FILE to read it from a UTF-8 text file. A value with "
    "no spaces that contains a slash or ends in .txt/.md/.json/.jsonl/.yaml/.yml/.prompt is "
    "taken as a file path, and must exist."
)
TEXT_SUFFIXES = (".txt", ".md", ".json", ".jsonl", ".yaml", ".yml", ".prompt")
MAX_SYSTEM_BYTES = 1 << 20


def read_system(value: str | None, option: str = "--system") -> str | None:
    """The system prompt an option names: its text, or a file's text (the rule in SYSTEM_HELP).

    A mistyped path is refused rather than sent to the model as the system prompt.
    """
    from steerlab.errors import DataError

    if value is None:
        return None
    explicit = value.startswith("@")
    text = value[1:] if explicit else value
    path = Path(text).expanduser()
    looks_like_path = not any(c.isspace() for c in text) and (
        "/" in text or "\\" in text or text.lower().endswith(TEXT_SUFFIXES))
    if not explicit and not looks_like_path and (len(text) > 4096 or not path.is_file()):
        return value
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise DataError(f"{option} {value!r} looks like a file path but {path} {what}; fix the "
                        "path, or give the prompt text itself (text with spaces is used as is).")
    data = path.read_bytes()[: MAX_SYSTEM_BYTES + 1]
    if len(data) > MAX_SYSTEM_BYTES:
        raise DataError(f"{option} file {path} is over {MAX_SYSTEM_BYTES} bytes; a system prompt "
                        "is a short text.")
    try:
        decoded = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{option} file {path} is not UTF-8 text (byte {exc.start}); give a "
                        "text file.") from exc
    if "\x00" in decoded:
        raise DataError(f"{option} file {path} is binary (it holds NUL bytes); give a text file.")
    return decoded.strip()
