"""``steerlab info MODEL``: what a model is, and its fingerprint."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from steerlab.cli.common import DTYPE_OPT, MODEL_ARG, console, load


def register(app: typer.Typer) -> None:
    @app.command()
    def info(
        model: str = MODEL_ARG,
        dtype: str = DTYPE_OPT,
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    ) -> None:
        """Print architecture, layers, d_model, dtype, parameters, chat template, fingerprint."""
        details = load(model, dtype).info()
        if as_json:
            console.print_json(json.dumps(details))
            return
        table = Table(title=f"steerlab info: {model}", show_header=False)
        for key, value in details.items():
            table.add_row(
                key,
                f"{value:,}"
                if isinstance(value, int) and not isinstance(value, bool)
                else str(value),
            )
        console.print(table)
