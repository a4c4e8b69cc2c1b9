"""``steerlab experiment``: the refusal-structure experiments, one command each.

Every experiment command (``steerlab reproduce persona-gating`` too) shares its
options (model, ``--out``, ``--limit``, ``--judge``, ``--config``) and writes
results.json, responses.jsonl, report.html and report.md into ``--out`` (a rerun
resumes).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import typer
from rich.text import Text

from steerlab.cli.common import (
    CONFIG_OPT,
    DTYPE_OPT,
    MODEL_ARG,
    OVERWRITE_OPT,
    RUN_DIR_OPT,
    console,
    load_for_run,
)

LIMIT_OPT = typer.Option(None, "--limit", help="Use the first N evaluation prompts.")
JUDGE_OPT = typer.Option(None, "--judge", help="OpenAI-compatible judge URL (optional).")
JUDGE_MODEL_OPT = typer.Option(None, "--judge-model", help="Judge model name.")
SEED_OPT = typer.Option(None, "--seed", help="Seed for random controls.")
TOKENS_OPT = typer.Option(None, "--max-new-tokens", help="Greedy tokens per prompt.")
EVAL_OPT = typer.Option(
    None,
    "--eval-prompts",
    help="Evaluation prompts file or built-in name (default: built-in harmful test split).",
)


def _shared_options(
    model: str = MODEL_ARG,
    out: Path = RUN_DIR_OPT,
    limit: int | None = LIMIT_OPT,
    judge: str | None = JUDGE_OPT,
    judge_model: str | None = JUDGE_MODEL_OPT,
    config: Path | None = CONFIG_OPT,
    seed: int | None = SEED_OPT,
    max_new_tokens: int | None = TOKENS_OPT,
    eval_prompts: str | None = EVAL_OPT,
    overwrite: bool = OVERWRITE_OPT,
    dtype: str = DTYPE_OPT,
) -> None:
    """The options every experiment command takes (its signature is all that is used)."""


def _run(model: str, out: Path, dtype: str, module: str, config_file: Path | None,
         eval_prompts: str | None, overwrite: bool, **overrides: Any) -> None:
    """Resolve the config, load the model, run the experiment, and print the findings."""
    experiment = importlib.import_module(f"steerlab.experiments.{module}").EXPERIMENT
    if eval_prompts is not None:
        overrides["eval_prompts"] = eval_prompts
    cfg = experiment.config.from_file(config_file, **overrides)
    if eval_prompts is not None and Path(eval_prompts).exists():
        cfg = cfg.model_copy(update={"eval_split": None})  # a user's file has no splits
    results = experiment.run(load_for_run(model, dtype, out, overwrite), out, cfg)
    for finding in results["findings"]:
        color = {"reproduced": "green", "not reproduced": "red"}.get(finding["verdict"], "yellow")
        console.print(Text.assemble((f"{finding['verdict']:>15}", color), f"  {finding['claim']}"))
        console.print(f"                 {finding['evidence']}", style="dim")
    if "answer" in results:
        console.print(Text.assemble(("answer:", "bold"), f" {results['answer']}"))
    if "cost" in results:
        cost = results["cost"]
        console.print(f"cost: {cost['ratio_to_baseline_pass']:.1f}x one unhooked generation "
                      f"pass (budget {cost['budget_ratio']:.1f}x)")
    console.print(f"report: {out / 'report.html'}  results: {out / 'results.json'}")


def own_option(name: str, kind: type, flag: str, help: str) -> inspect.Parameter:
    """An option particular to one experiment: ``None`` unless given, and then it overrides
    the config field ``name``."""
    return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                             default=typer.Option(None, flag, help=help), annotation=kind | None)


def experiment_command(group: typer.Typer, name: str, module: str, doc: str,
                       own: Sequence[inspect.Parameter]) -> None:
    """Register ``NAME`` in ``group``: the :func:`_shared_options` around the experiment's
    ``own`` options (``--dtype`` last), running the ``EXPERIMENT`` of
    ``steerlab.experiments.MODULE``, imported only when the command runs so ``--help``
    stays fast. ``steerlab experiment NAME`` and ``steerlab reproduce NAME`` both come
    through here.
    """
    shared = list(inspect.signature(_shared_options, eval_str=True).parameters.values())

    def command(**values: Any) -> None:
        given = {p.name: values.pop(p.name) for p in shared}
        _run(given["model"], given["out"], given["dtype"], module, given["config"],
             given["eval_prompts"], given["overwrite"], limit=given["limit"],
             judge_url=given["judge"], judge_model=given["judge_model"], seed=given["seed"],
             max_new_tokens=given["max_new_tokens"], **values)

    command.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [*shared[:-1], *own, shared[-1]]
    )
    command.__doc__ = doc
    command.__name__ = module
    group.command(name)(command)


# Each experiment command: its name, module, help and own options.
EXPERIMENTS = (
    ("layer-transfer", "layer_transfer",
     "Each layer's refusal direction ablated everywhere: one direction or a subspace?",
     [own_option("source_layers", str, "--source-layers",
                 "Source layers to test, e.g. '4-20' (default: all)."),
      own_option("layer_stride", int, "--layer-stride", "Test every k-th layer."),
      own_option("mode", str, "--mode", "ablate (default) or subtract.")]),
    ("subspace", "subspace",
     "Ablate a multi-layer refusal subspace; test the two-tier refusal hypothesis.",
     [own_option("layers", str, "--layers",
                 "Basis layers, e.g. '7-10' (default: 4 around the best).")]),
    ("positions", "positions",
     "Directions read at t_inst vs each post-instruction token: harmfulness vs refusal.",
     [own_option("layer", int, "--layer",
                 "Layer of the interventions (default: best last-token layer).")]),
    ("hydra", "hydra",
     "Ablate, re-extract on the ablated model, repeat: do backup directions take over?",
     [own_option("rounds", int, "--rounds", "Ablate / re-extract rounds (default 3).")]),
)


def register(app: typer.Typer) -> None:
    group = typer.Typer(
        help="Refusal-structure experiments: layer transfer, subspace ablation "
        "and the two-tier hypothesis, read positions, backup directions.",
        no_args_is_help=True,
    )
    app.add_typer(group, name="experiment")
    for name, module, doc, own in EXPERIMENTS:
        experiment_command(group, name, module, doc, own)
