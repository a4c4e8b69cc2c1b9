"""The ``steerlab`` command: a thin shell over the library API.

Each command group lives in its own module with a ``register(app)`` function;
add a module name to ``COMMAND_MODULES`` to add commands.
"""

from __future__ import annotations

import importlib
import sys
from typing import Protocol, cast

import typer

from steerlab.cli.common import console, error_console
from steerlab.errors import SteerlabError

COMMAND_MODULES = [
    "info",
    "data",
    "reproduce",
    "sweep",
    "serve",
    "orthogonalize",
    "generate",
    "eval",
    "extract",
    "experiment",
    "abliterate",
]

app = typer.Typer(
    name="steerlab",
    help="Find, measure and edit the directions inside chat LLMs that carry refusal and persona.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for _name in COMMAND_MODULES:
    importlib.import_module(f"steerlab.cli.{_name}").register(app)


@app.callback()
def _root() -> None:
    """steerlab: refusal and persona directions in chat models."""


def main(argv: list[str] | None = None) -> None:
    """Entry point: user mistakes become one red line and exit code 2."""
    try:
        app(args=argv, standalone_mode=False)
    except SteerlabError as exc:
        error_console.print(f"[bold red]error:[/] {exc}")
        sys.exit(2)
    except KeyboardInterrupt:
        error_console.print("[yellow]interrupted[/]; rerun the same command to resume.")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as exc:
        if not isinstance(exc, _usage_errors()):
            raise
        usage = cast("_UsageError", exc)  # a mistyped option, a missing argument
        usage.show()
        sys.exit(usage.exit_code)


class _UsageError(Protocol):
    exit_code: int

    def show(self) -> None: ...


def _usage_errors() -> tuple[type[Exception], ...]:
    """Click's exception base, which usage errors derive from: recent typer vendors its own
    copy of click (reached through ``typer.BadParameter``), older typer uses click."""
    import click

    vendored = [c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"]
    return tuple({click.ClickException, *vendored})


__all__ = ["app", "console", "main"]
