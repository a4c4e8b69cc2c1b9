"""``steerlab experiment``: the refusal-structure experiments, one command each.

layer-transfer, subspace, positions and hydra share their options (model,
``--out``, ``--limit``, ``--judge``, ``--config``) and write results.json,
responses.jsonl, report.html and report.md into ``--out`` (a rerun resumes).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from steerlab.cli.common import DTYPE_OPT, MODEL_ARG, console, load

OUT_OPT = typer.Option(..., "--out", help="Run folder (resumes if it exists).")
LIMIT_OPT = typer.Option(None, "--limit", help="Use the first N evaluation prompts.")
JUDGE_OPT = typer.Option(None, "--judge", help="OpenAI-compatible judge URL (optional).")
JUDGE_MODEL_OPT = typer.Option(None, "--judge-model", help="Judge model name.")
CONFIG_OPT = typer.Option(None, "--config", help="YAML/JSON file of config overrides.")
SEED_OPT = typer.Option(None, "--seed", help="Seed for random controls.")
TOKENS_OPT = typer.Option(None, "--max-new-tokens", help="Greedy tokens per prompt.")
EVAL_OPT = typer.Option(
    None,
    "--eval-prompts",
    help="Evaluation prompts file or built-in name (default: built-in harmful test split).",
)


def _run(
    model: str,
    out: Path,
    dtype: str,
    config_cls: Any,
    runner: Callable[..., Any],
    config_file: Path | None,
    eval_prompts: str | None,
    **overrides: Any,
) -> None:
    """Resolve the config, load the model, run, and print the findings."""
    if eval_prompts is not None:
        overrides["eval_prompts"] = eval_prompts
    cfg = config_cls.from_file(config_file, **overrides)
    if eval_prompts is not None and Path(eval_prompts).exists():
        cfg = cfg.model_copy(update={"eval_split": None})  # a user's file has no splits
    lm = load(model, dtype)
    results = runner(lm, out, cfg)
    for finding in results["findings"]:
        color = {"reproduced": "green", "not reproduced": "red"}.get(finding["verdict"], "yellow")
        console.print(f"[{color}]{finding['verdict']:>15}[/]  {finding['claim']}")
        console.print(f"                 [dim]{finding['evidence']}[/]")
    if "answer" in results:
        console.print(f"[bold]answer:[/] {results['answer']}")
    console.print(f"report: {out / 'report.html'}  results: {out / 'results.json'}")


def register(app: typer.Typer) -> None:
    group = typer.Typer(
        help="Refusal-structure experiments: layer transfer, subspace ablation "
        "and the two-tier hypothesis, read positions, backup directions.",
        no_args_is_help=True,
    )
    app.add_typer(group, name="experiment")

    @group.command("layer-transfer")
    def layer_transfer(
        model: str = MODEL_ARG,
        out: Path = OUT_OPT,
        limit: int | None = LIMIT_OPT,
        judge: str | None = JUDGE_OPT,
        judge_model: str | None = JUDGE_MODEL_OPT,
        config: Path | None = CONFIG_OPT,
        seed: int | None = SEED_OPT,
        max_new_tokens: int | None = TOKENS_OPT,
        eval_prompts: str | None = EVAL_OPT,
        source_layers: str | None = typer.Option(
            None, "--source-layers", help="Source layers to test, e.g. '4-20' (default: all)."
        ),
        layer_stride: int | None = typer.Option(
            None, "--layer-stride", help="Test every k-th layer."
        ),
        mode: str | None = typer.Option(None, "--mode", help="ablate (default) or subtract."),
        dtype: str = DTYPE_OPT,
    ) -> None:
        """Each layer's refusal direction ablated everywhere: one direction or a subspace?"""
        from steerlab.experiments.layer_transfer import LayerTransferConfig, run_layer_transfer

        _run(
            model,
            out,
            dtype,
            LayerTransferConfig,
            run_layer_transfer,
            config,
            eval_prompts,
            limit=limit,
            judge_url=judge,
            judge_model=judge_model,
            seed=seed,
            max_new_tokens=max_new_tokens,
            source_layers=source_layers,
            layer_stride=layer_stride,
            mode=mode,
        )

    @group.command("subspace")
    def subspace(
        model: str = MODEL_ARG,
        out: Path = OUT_OPT,
        limit: int | None = LIMIT_OPT,
        judge: str | None = JUDGE_OPT,
        judge_model: str | None = JUDGE_MODEL_OPT,
        config: Path | None = CONFIG_OPT,
        seed: int | None = SEED_OPT,
        max_new_tokens: int | None = TOKENS_OPT,
        eval_prompts: str | None = EVAL_OPT,
        layers: str | None = typer.Option(
            None, "--layers", help="Basis layers, e.g. '7-10' (default: 4 around the best)."
        ),
        dtype: str = DTYPE_OPT,
    ) -> None:
        """Ablate a multi-layer refusal subspace; test the two-tier refusal hypothesis."""
        from steerlab.experiments.subspace import SubspaceConfig, run_subspace

        _run(
            model,
            out,
            dtype,
            SubspaceConfig,
            run_subspace,
            config,
            eval_prompts,
            limit=limit,
            judge_url=judge,
            judge_model=judge_model,
            seed=seed,
            max_new_tokens=max_new_tokens,
            layers=layers,
        )

    @group.command("positions")
    def positions(
        model: str = MODEL_ARG,
        out: Path = OUT_OPT,
        limit: int | None = LIMIT_OPT,
        judge: str | None = JUDGE_OPT,
        judge_model: str | None = JUDGE_MODEL_OPT,
        config: Path | None = CONFIG_OPT,
        seed: int | None = SEED_OPT,
        max_new_tokens: int | None = TOKENS_OPT,
        eval_prompts: str | None = EVAL_OPT,
        layer: int | None = typer.Option(
            None, "--layer", help="Layer of the interventions (default: best last-token layer)."
        ),
        dtype: str = DTYPE_OPT,
    ) -> None:
        """Directions read at t_inst vs each post-instruction token: harmfulness vs refusal."""
        from steerlab.experiments.positions import PositionsConfig, run_positions

        _run(
            model,
            out,
            dtype,
            PositionsConfig,
            run_positions,
            config,
            eval_prompts,
            limit=limit,
            judge_url=judge,
            judge_model=judge_model,
            seed=seed,
            max_new_tokens=max_new_tokens,
            layer=layer,
        )

    @group.command("hydra")
    def hydra(
        model: str = MODEL_ARG,
        out: Path = OUT_OPT,
        limit: int | None = LIMIT_OPT,
        judge: str | None = JUDGE_OPT,
        judge_model: str | None = JUDGE_MODEL_OPT,
        config: Path | None = CONFIG_OPT,
        seed: int | None = SEED_OPT,
        max_new_tokens: int | None = TOKENS_OPT,
        eval_prompts: str | None = EVAL_OPT,
        rounds: int | None = typer.Option(
            None, "--rounds", help="Ablate / re-extract rounds (default 3)."
        ),
        dtype: str = DTYPE_OPT,
    ) -> None:
        """Ablate, re-extract on the ablated model, repeat: do backup directions take over?"""
        from steerlab.experiments.hydra import HydraConfig, run_hydra

        _run(
            model,
            out,
            dtype,
            HydraConfig,
            run_hydra,
            config,
            eval_prompts,
            limit=limit,
            judge_url=judge,
            judge_model=judge_model,
            seed=seed,
            max_new_tokens=max_new_tokens,
            rounds=rounds,
        )
