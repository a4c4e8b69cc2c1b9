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
    def persona_gating(
        refusal_direction: str | None = typer.Option(
            None, "--refusal-direction",
            help="Ablate and re-add this saved refusal direction (an extract folder or an "
            "abliterate run) at its best layer, instead of extracting and selecting one.",
        ),
    ) -> dict[str, Any]:
        """Persona gates refusal (arXiv 2606.26161): steer, re-add, project, random controls."""
        return {"refusal_direction": refusal_direction}
