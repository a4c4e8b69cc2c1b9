"""The ``steerlab`` command: a thin shell over the library API.

Each command group lives in its own module with a ``register(app)`` function;
add a module name to ``COMMAND_MODULES`` to add commands.
"""

from __future__ import annotations

import importlib
import json
import sys
import warnings
from typing import Any, NoReturn, Protocol, cast

import typer
from rich.text import Text

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
    """Entry point: user mistakes and unreadable inputs become one red line and exit code 2."""
    run_app(app, argv)


def run_app(typer_app: typer.Typer, argv: list[str] | None) -> None:
    """Run ``typer_app`` inside the one error boundary of the ``steerlab`` command."""
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        _run(typer_app, argv)


def _run(typer_app: typer.Typer, argv: list[str] | None) -> None:
    try:
        typer_app(args=argv, standalone_mode=False)
    except SteerlabError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        error_console.print(Text.assemble(("interrupted", "yellow"),
                                          "; rerun the same command to resume."))
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as exc:
        if isinstance(exc, _input_errors()):
            _fail(describe_input_error(exc))
        if not isinstance(exc, _usage_errors()):
            raise
        usage = cast("_UsageError", exc)  # a mistyped option, a missing argument
        usage.show()
        sys.exit(usage.exit_code)


def _fail(message: str) -> NoReturn:
    """Print ``error: MESSAGE`` as one line, the message taken literally (no rich markup)."""
    line = " ".join(message.split())
    error_console.print(Text.assemble(("error:", "bold red"), " ", line), soft_wrap=True)
    sys.exit(2)


_shown: set[str] = set()


def _show_warning(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
    """Library warnings (e.g. a direction used on another model) as one yellow line each."""
    text = " ".join(str(message).split())
    if text in _shown:
        return
    _shown.add(text)
    error_console.print(Text.assemble(("warning:", "bold yellow"), " ", text), soft_wrap=True)


def _input_errors() -> tuple[type[Exception], ...]:
    """Errors that mean an unreadable or malformed input, not a bug in steerlab."""
    import yaml
    from safetensors import SafetensorError

    return (OSError, json.JSONDecodeError, UnicodeError, yaml.YAMLError, SafetensorError)


def describe_input_error(exc: BaseException) -> str:
    """One sentence for an OS or parse error: what failed, on which file, and the fix."""
    if isinstance(exc, OSError) and exc.filename is not None:
        reason = exc.strerror or type(exc).__name__
        return f"cannot use {exc.filename}: {reason}; check the path and its permissions."
    if isinstance(exc, UnicodeError):
        return f"an input is not UTF-8 text ({exc}); give a text file."
    kind = "JSON" if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
    return f"cannot read an input ({kind}: {exc}); check the file."


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
