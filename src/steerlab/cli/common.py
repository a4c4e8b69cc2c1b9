"""Shared pieces of the CLI: consoles, model loading with a printed dtype choice."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer
from rich.console import Console

if TYPE_CHECKING:
    from steerlab.model import LoadedModel

console = Console()
error_console = Console(stderr=True)

MODEL_ARG = typer.Argument(
    "default",
    help="HF model directory, cached hub id, .gguf file, or 'default' "
    "(embedded Qwen2.5-Coder-0.5B).",
)
DTYPE_OPT = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16.")


def load(spec: str, dtype: str = "auto", device: str | None = None) -> LoadedModel:
    """Load a model and print which dtype was chosen and why."""
    from steerlab.model import load_model

    with console.status(f"Loading {spec} ..."):
        lm = load_model(spec, dtype=dtype, device=device)
    dt = str(lm.dtype).removeprefix("torch.")
    error_console.print(
        f"[dim]model {lm.name} ({lm.arch.name}, {lm.n_layers} layers, d_model {lm.d_model}), "
        f"dtype {dt} ({lm.dtype_reason}), fingerprint {lm.fingerprint}[/]"
    )
    return lm
