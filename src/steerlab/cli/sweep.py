"""``steerlab sweep``: a layer × strength grid of any steering spec."""

from __future__ import annotations

from pathlib import Path

import typer

from steerlab.cli import common


def register(app: typer.Typer) -> None:
    @app.command()
    def sweep(
        model: str = common.MODEL_ARG,
        steer_template: str = typer.Option(
            ...,
            "--steer-template",
            help="Compact steer spec with {layer} and {alpha}, e.g. "
            "'add:runs/persona@{layer}:{alpha}'.",
        ),
        layers: str = typer.Option(..., "--layers", help="Layers: '4,8,12' or '4-16'."),
        alphas: str = typer.Option(..., "--alphas", help="Strengths: '2,4,8'."),
        prompts: str = typer.Option("paired:harmful", "--prompts", help="Prompt file or name."),
        split: str | None = typer.Option("val", "--split", help="Split for built-in sets."),
        limit: int | None = typer.Option(32, "--limit", help="Prompts per cell."),
        harmless: str | None = typer.Option(
            "harmless", "--harmless", help="Harmless prompts for KL ('' to skip)."
        ),
        max_new_tokens: int = typer.Option(32, "--max-new-tokens"),
        steer: list[str] | None = typer.Option(
            None, "--steer", "-s",
            help="Fixed intervention under every cell and the baseline (repeatable), e.g. an "
            "abliterate run's spec.json: sweep a grid on the edited model.",
        ),
        out: Path = common.RUN_DIR_OPT,
        dtype: str = common.DTYPE_OPT,
        overwrite: bool = common.OVERWRITE_OPT,
    ) -> None:
        """Refusal, degenerate rate and KL for every (layer, alpha) cell, with heatmaps."""
        from steerlab.experiments.sweep import run_sweep
        from steerlab.interventions.layer_spec import parse_layers
        from steerlab.interventions.specs import parse_steer_args, resolve_specs
        from steerlab.prompts.sets import load_prompts

        fixed = parse_steer_args(steer)  # before loading the model: fail fast on typos
        lm = common.load_for_run(model, dtype, out, overwrite)
        prompt_set = load_prompts(
            prompts, split=None if Path(prompts).exists() else split, limit=limit
        )
        harmless_set = load_prompts(harmless, split="test", limit=16) if harmless else None
        results = run_sweep(
            lm,
            out,
            template=steer_template,
            layers=parse_layers(layers, lm.n_layers),
            alphas=[float(a) for a in alphas.split(",")],
            prompts=prompt_set,
            harmless=harmless_set,
            max_new_tokens=max_new_tokens,
            steer=resolve_specs(fixed, lm=lm),
        )
        best = min(results["cells"], key=lambda c: c["refusal_rate"])
        common.console.print(
            f"lowest refusal {best['refusal_rate']:.0%} at layer {best['layer']}, "
            f"alpha {best['alpha']:g}; report: {out / 'report.html'}"
        )
