"""``steerlab reproduce persona-gating``: the paper's experiments, one command."""

from __future__ import annotations

from typing import Any

import typer

from steerlab.cli.experiment import experiment_command


def register(app: typer.Typer) -> None:
    group = typer.Typer(
        help="Reproduce published steering experiments end to end.", no_args_is_help=True
    )
    app.add_typer(group, name="reproduce")

    @experiment_command(group, "persona-gating", "persona_gating")
    def persona_gating() -> dict[str, Any]:
        """Persona gates refusal (arXiv 2606.26161): steer, re-add, project, random controls."""
        return {}
