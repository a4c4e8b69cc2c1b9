"""``steerlab serve MODEL``: an OpenAI-compatible server with per-request steering."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import sys
from typing import Any

import typer
from rich.text import Text

from steerlab.cli.common import DTYPE_OPT, MODEL_ARG, error_console, load
from steerlab.errors import SteerlabError


def parse_direction_args(values: list[str]) -> dict[str, str]:
    """``["persona=dirs/persona", ...]`` -> ``{"persona": "dirs/persona"}``."""
    out: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        name = name.strip()
        if not sep or not name or not path.strip():
            raise SteerlabError(f"--direction {value!r} must look like NAME=PATH (e.g. "
                                "persona=dirs/persona).")
        if name in out:
            raise SteerlabError(f"--direction name {name!r} is given twice; names must be unique.")
        out[name] = path.strip()
    return out


def bind_registered(specs: list[Any], directions: dict[str, Any]) -> list[Any]:
    """In startup ``--steer`` specs, replace direction names registered with --direction by
    the loaded directions (anything else stays a path for the interventions module)."""
    bound = []
    for spec in specs:
        changes: dict[str, Any] = {}
        direction = getattr(spec, "direction", None)
        if isinstance(direction, str) and direction in directions:
            changes["direction"] = directions[direction]
        many = getattr(spec, "directions", None)
        if isinstance(many, (list, tuple)):
            changes["directions"] = type(many)(
                directions.get(d, d) if isinstance(d, str) else d for d in many)
        bound.append(dataclasses.replace(spec, **changes) if changes else spec)
    return bound


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        model: str = MODEL_ARG,
        direction: list[str] = typer.Option(
            [], "--direction", "-d",
            help="NAME=PATH of a saved direction that requests may steer with by NAME. Repeat."),
        steer: list[str] = typer.Option(
            [], "--steer", "-s",
            help="Default steering for requests without a 'steer' field: OP:DIR[SRC]@LAYERS[:ALPHA]"
                 " (DIR may be a --direction NAME) or a JSON/YAML spec file. Repeat."),
        host: str = typer.Option("127.0.0.1", help="Address to bind (loopback by default)."),
        port: int = typer.Option(8000, help="Port to listen on."),
        api_key: str | None = typer.Option(
            None, "--api-key", envvar="STEERLAB_API_KEY",
            help="Require 'Authorization: Bearer KEY' on every request (or set STEERLAB_API_KEY)."),
        max_batch_size: int = typer.Option(16, min=1, help="Most requests decoded together."),
        max_wait_ms: float = typer.Option(20.0, min=0.0,
                                          help="How long a batch waits to fill, in ms."),
        max_queue: int = typer.Option(256, min=1, help="Waiting requests before 503."),
        max_tokens_limit: int = typer.Option(1024, "--max-tokens-limit", min=1,
                                             help="Largest max_tokens a request may ask for."),
        model_alias: list[str] = typer.Option(
            [], "--model-alias",
            help="Another name requests may give as 'model' (repeat). The served id (see "
                 "/v1/models) and MODEL as given here are always accepted; any other name is "
                 "answered 404 model_not_found, as the OpenAI API does."),
        allow_mismatch: bool = typer.Option(
            False, help="Accept directions extracted from a model with another fingerprint."),
        dtype: str = DTYPE_OPT,
    ) -> None:
        """Serve MODEL over an OpenAI-compatible HTTP API with per-request steering."""
        from steerlab.directions.artifact import Direction
        from steerlab.serve import create_app, run

        paths = parse_direction_args(direction)
        lm = load(model, dtype)
        directions = {name: Direction.load(path, lm, allow_mismatch=allow_mismatch)
                      for name, path in paths.items()}
        default: list[Any] = []
        if steer:
            from steerlab.interventions.specs import parse_steer

            for text in steer:
                default += bind_registered(list(parse_steer(text)), directions)
        app = create_app(lm, directions, default, api_key=api_key, max_batch_size=max_batch_size,
                         max_wait_ms=max_wait_ms, max_queue=max_queue,
                         max_new_tokens_limit=max_tokens_limit, model_aliases=model_alias)
        if not _is_loopback(host) and not api_key:
            error_console.print(Text.assemble(
                ("warning:", "yellow"), f" serving on {host} without --api-key: anyone who can "
                "reach this address can use the model."))
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access = logging.getLogger("steerlab.serve.access")
        access.addHandler(handler)
        access.setLevel(logging.INFO)
        error_console.print(
            Text.assemble(("steerlab serve", "green"), f" {lm.name} on http://{host}:{port}/v1 "
            f"(directions: {', '.join(directions) or 'none'}; default steering: "
            f"{len(default)} spec(s); auth: {'on' if api_key else 'off'})"))
        run(app, host=host, port=port)
