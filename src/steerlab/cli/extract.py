"""``steerlab extract`` (make a direction) and ``steerlab scan`` (measure it layer by layer)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from rich.progress import TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from steerlab.cli.common import (
    DTYPE_OPT,
    MODEL_ARG,
    SYSTEM_HELP,
    console,
    load,
    read_system,
)
from steerlab.errors import DataError
from steerlab.generation.progress import counting_bar
from steerlab.interventions.layer_spec import parse_layers
from steerlab.store.outputs import output_dir

OUT_OPT = typer.Option(..., "--out", "-o", help="Output folder.")
POSITIVE_OPT = typer.Option(None, "--positive", help="Positive prompt set: built-in name "
                            "(e.g. paired:harmful) or a .jsonl/.json/.csv/.txt file.")
NEGATIVE_OPT = typer.Option(None, "--negative", help="Negative prompt set (same forms).")
SYS_POS_OPT = typer.Option(None, "--system-positive",
                           help="System prompt for the positive set. " + SYSTEM_HELP)
SYS_NEG_OPT = typer.Option(None, "--system-negative",
                           help="System prompt for the negative set (same forms).")
POSITION_OPT = typer.Option("last", "--position", help="Token position: last, t_inst, "
                            "post_inst, post_inst\\[k] (k-th post-instruction token), "
                            "prompt_mean, response_mean.")
METHOD_OPT = typer.Option("diff_in_means", "--method", help="diff_in_means, pca or logreg.")
LAYERS_OPT = typer.Option("all", "--layers", help="all, a range like 8-16, or a list like 3,5,7.")
LIMIT_OPT = typer.Option(None, "--limit", help="Use at most this many prompts (pairs) per set.")
BATCH_OPT = typer.Option(32, "--batch-size", help="Prompts per forward pass.")
OVERWRITE_OPT = typer.Option(False, "--overwrite", help="Replace what a non-empty --out holds.")


@contextmanager
def progress_bar(description: str, total: int) -> Iterator[Any]:
    """A rich progress bar counting prompts through forward passes; yields ``advance(n)``."""
    with counting_bar(TextColumn("prompts"), TimeElapsedColumn(), transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.update(task, advance=n)


@dataclass(frozen=True)
class PromptSets:
    """The options extract and scan both take (what to contrast, where and how to read it),
    declared once: :func:`with_prompt_sets` shows them to typer and hands them over as one
    value (the defaults are typer's option declarations, so only it builds one)."""

    positive: str | None = POSITIVE_OPT
    negative: str | None = NEGATIVE_OPT
    system_positive: str | None = SYS_POS_OPT
    system_negative: str | None = SYS_NEG_OPT
    position: str = POSITION_OPT
    method: str = METHOD_OPT
    layers: str = LAYERS_OPT
    limit: int | None = LIMIT_OPT
    batch_size: int = BATCH_OPT


def with_prompt_sets(command: Callable[..., None]) -> Callable[..., None]:
    """``command(model, out, *, sets: PromptSets, ...)`` as typer sees it: the PromptSets
    fields become options after model and --out, and reach the command as ``sets``."""
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values()
           if p.name != "sets"]
    shared = list(inspect.signature(PromptSets, eval_str=True).parameters.values())

    def wrapper(**values: Any) -> None:
        command(sets=PromptSets(**{p.name: values.pop(p.name) for p in shared}), **values)

    wrapper.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [*own[:2], *shared, *own[2:]])
    wrapper.__doc__, wrapper.__name__ = command.__doc__, command.__name__
    return wrapper


def _inputs(sets: PromptSets, split: str | None) -> tuple[list[int] | None, Any, Any, Any, Any]:
    """Every input extract and scan check before the model loads: (layers or None for all,
    positive set, negative set, their system prompts); sets are None without --positive."""
    from steerlab.directions.extraction import get_method
    from steerlab.prompts.sets import load_prompts

    get_method(sets.method)
    parsed = parse_layers(sets.layers)
    if (sets.positive is None) != (sets.negative is None):
        raise DataError("Give both --positive and --negative, or neither (built-in sets).")
    loaded = (None, None) if sets.positive is None or sets.negative is None else (
        load_prompts(sets.positive, split=split, limit=sets.limit),
        load_prompts(sets.negative, split=split, limit=sets.limit))
    return (None if parsed == "all" else list(parsed), *loaded,
            read_system(sets.system_positive, "--system-positive"),
            read_system(sets.system_negative, "--system-negative"))


def register(app: typer.Typer) -> None:
    @app.command()
    @with_prompt_sets
    def extract(
        model: str = MODEL_ARG,
        out: Path = OUT_OPT,
        *,
        sets: PromptSets,
        kind: str = typer.Option("refusal", "--kind", help="With no prompt sets: refusal "
                                 "(built-in paired set) or persona (built-in persona contrasts)."),
        axis: str = typer.Option("compliance", "--axis", help="Persona axis for --kind persona: "
                                 "compliance, evil_nurturing, callous_supportive, "
                                 "hostile_patient, arrogant_diplomatic."),
        split: str | None = typer.Option(None, "--split", help="Split of the prompt sets to "
                                         "extract from (built-in sets default to train)."),
        name: str = typer.Option("direction", "--name", help="Name stored with a custom "
                                 "direction."),
        overwrite: bool = OVERWRITE_OPT,
        dtype: str = DTYPE_OPT,
    ) -> None:
        """Extract a direction (one vector per layer) and save it to OUT as safetensors + JSON.

        With no prompt sets it extracts the refusal direction from the built-in paired set
        (--kind persona: the compliant-persona direction). OUT is accepted anywhere a
        direction is expected.
        """
        import steerlab.directions.extraction as extraction

        chosen, pos_set, neg_set, sys_pos, sys_neg = _inputs(sets, split)
        output_dir(out, overwrite=overwrite)  # before the model loads: fail fast
        lm = load(model, dtype)
        if pos_set is not None:
            total = len(pos_set) + len(neg_set)
            with progress_bar("extracting", total) as advance:
                direction = extraction.extract_direction(
                    lm, pos_set, neg_set, method=sets.method, position=sets.position,
                    layers=chosen, system_positive=sys_pos, system_negative=sys_neg, name=name,
                    kind="custom", batch_size=sets.batch_size, progress=advance)
        elif kind == "refusal":
            train = extraction.paired_split(split or "train", sets.limit)
            val = extraction.paired_split("val", sets.limit)
            with progress_bar("refusal direction", 2 * (len(train[0]) + len(val[0]))) as advance:
                direction = extraction.refusal_direction(
                    lm, split=split or "train", position=sets.position, method=sets.method,
                    limit=sets.limit, layers=chosen, batch_size=sets.batch_size, progress=advance)
        elif kind == "persona":
            rows = extraction.persona_contrast(axis, split or "train", limit=sets.limit)[0]
            try:
                held = len(extraction.persona_contrast(axis, "val", limit=sets.limit)[0])
            except DataError:
                held = 0
            with progress_bar(f"persona direction ({axis})", 2 * (len(rows) + held)) as advance:
                direction = extraction.persona_direction(
                    lm, axis=axis, split=split or "train", position=sets.position,
                    method=sets.method, limit=sets.limit, layers=chosen,
                    batch_size=sets.batch_size, progress=advance)
        else:
            raise DataError(f"Unknown --kind {kind!r}; use refusal or persona, or give "
                            "--positive and --negative prompt sets.")
        direction.save(out)
        _print_direction(direction, out)

    @app.command()
    @with_prompt_sets
    def scan(
        model: str = MODEL_ARG,
        out: Path = OUT_OPT,
        *,
        sets: PromptSets,
        positive_test: str | None = typer.Option(None, "--positive-test", help="Held-out "
                                                 "positive set (default: every 5th prompt)."),
        negative_test: str | None = typer.Option(None, "--negative-test", help="Held-out "
                                                 "negative set."),
        persona: bool = typer.Option(True, "--persona/--no-persona", help="Also extract the "
                                     "compliant-persona direction and plot its cosine with "
                                     "this one per layer."),
        overwrite: bool = OVERWRITE_OPT,
        dtype: str = DTYPE_OPT,
    ) -> None:
        """Layer-by-layer analysis: held-out Cohen's d, probe accuracy, cross-layer cosines.

        Writes OUT/scan.json, PNG plots and the direction itself (OUT is a direction folder).
        With no prompt sets it scans the built-in paired set (train split vs held-out test).
        """
        import steerlab.directions.extraction as extraction
        from steerlab.directions.analysis import scan as run_scan
        from steerlab.prompts.sets import load_prompts
        from steerlab.reporting.plots import save_scan_plots

        chosen, pos_set, neg_set, sys_pos, sys_neg = _inputs(sets, None)
        limit = sets.limit
        pos_test = load_prompts(positive_test, limit=limit) if positive_test else None
        neg_test = load_prompts(negative_test, limit=limit) if negative_test else None
        if pos_set is None:
            total = 2 * sum(len(extraction.paired_split(s, limit)[0]) for s in ("train", "test"))
        else:
            total = len(pos_set) + len(neg_set)
            total += len(pos_test or ()) + len(neg_test or ())
        if persona:
            total += 2 * len(extraction.persona_contrast("compliance", "train", limit=limit)[0])
        output_dir(out, overwrite=overwrite)
        lm = load(model, dtype)
        with progress_bar("scanning", total) as advance:
            result = run_scan(
                lm, positive=pos_set, negative=neg_set, positive_test=pos_test,
                negative_test=neg_test, system_positive=sys_pos,
                system_negative=sys_neg, method=sets.method, position=sets.position,
                layers=chosen, persona=persona, limit=limit, batch_size=sets.batch_size,
                progress=advance)
        out.mkdir(parents=True, exist_ok=True)
        result.to_json(out / "scan.json")
        assert result.direction is not None
        result.direction.save(out)
        plots = save_scan_plots(result, out)
        _print_scan(result, out, plots)


def _print_direction(direction: Any, out: Path) -> None:
    meta = direction.meta
    best = meta.best_layer
    d = meta.extra.get("cohens_d", {})
    console.print(Text.assemble(
        ("saved", "bold green"), f" {meta.kind} direction {meta.name!r} ({meta.method}, "
        f"position {meta.position}, layers {direction.layers[0]}-{direction.layers[-1]}, "
        f"counts {meta.counts}) to {out}"))
    if best is not None:
        console.print(f"best layer {best}: held-out Cohen's d {d.get(str(best), float('nan')):.2f}"
                      f" ({meta.extra.get('best_layer_by', '')}); norm "
                      f"{direction.norms[best]:.2f}")


def _print_scan(result: Any, out: Path, plots: list[Path]) -> None:
    table = Table(title=f"scan: {result.model.get('name', '')} ({result.method}, "
                  f"{result.position})")
    for column in ("layer", "Cohen's d", "probe acc", "95% CI"):
        table.add_column(column, justify="right")
    if result.refusal_persona_cosine:
        table.add_column("cos(persona)", justify="right")
    for layer in result.layers:
        probe = result.probe_accuracy[layer]
        row = [str(layer), f"{result.cohens_d[layer]:.2f}", f"{probe['accuracy']:.3f}",
               f"{probe['ci95'][0]:.2f}-{probe['ci95'][1]:.2f}"]
        if result.refusal_persona_cosine:
            row.append(f"{result.refusal_persona_cosine.get(layer, float('nan')):.3f}")
        style = "bold" if layer == result.best_layer else None
        table.add_row(*row, style=style)
    console.print(table)
    best = result.best_layer
    console.print(f"best layer {best}: Cohen's d {result.cohens_d[best]:.2f} on held-out "
                  f"{result.counts['test_pos']} + {result.counts['test_neg']} prompts "
                  f"(probe n={result.probe_accuracy[best]['n']})")
    console.print(Text.assemble(("wrote", "bold green"), f" {out / 'scan.json'}, direction files "
                                "and " + ", ".join(p.name for p in plots)))
