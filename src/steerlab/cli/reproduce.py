"""``steerlab reproduce persona-gating``: the paper's experiments, one command."""

from __future__ import annotations

import typer

from steerlab.cli.experiment import experiment_command, own_option


def register(app: typer.Typer) -> None:
    group = typer.Typer(
        help="Reproduce published steering experiments end to end.", no_args_is_help=True
    )
    app.add_typer(group, name="reproduce")

    experiment_command(
        group, "persona-gating", "persona_gating",
        "Persona gates refusal (arXiv 2606.26161): steer, re-add, project, random controls.",
        [own_option("refusal_direction", str, "--refusal-direction",
                    "Ablate and re-add this saved refusal direction (an extract folder or an "
                    "abliterate run) at its best layer, instead of extracting and selecting one.")],
    )
