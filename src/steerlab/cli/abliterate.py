"""``steerlab abliterate``: search per-layer ablation kernels for the refusal/KL trade-off."""

from __future__ import annotations

from pathlib import Path

import typer

from steerlab.cli.common import DTYPE_OPT, MODEL_ARG, RUN_DIR_OPT, console, load
from steerlab.store.outputs import clear_run_dir


def register(app: typer.Typer) -> None:
    @app.command()
    def abliterate(
        model: str = MODEL_ARG,
        out: Path = RUN_DIR_OPT,
        trials: int | None = typer.Option(None, "--trials", help="Trial budget (default 40, "
                                          "or the config's)."),
        config: Path | None = typer.Option(None, "--config", help="YAML/JSON settings "
                                           "(see docs/abliterate.md)."),
        judge_url: str | None = typer.Option(None, "--judge-url", help="OpenAI-compatible "
                                             "judge instead of the substring scorer."),
        overwrite: bool = typer.Option(False, "--overwrite",
                                       help="Delete the folder's earlier study and start over."),
        dtype: str = DTYPE_OPT,
        progress: bool = typer.Option(True, "--progress/--no-progress",
                                      help="Show trials done, best so far and time left."),
    ) -> None:
        """Search direction source, position and per-layer ablation kernels with Optuna;
        write the chosen spec (usable by every --steer), a manifest and a report."""
        from steerlab.abliterate import AbliterateConfig
        from steerlab.abliterate import abliterate as run_abliterate

        settings = AbliterateConfig.from_file(config, trials=trials, judge_url=judge_url)
        if overwrite:
            clear_run_dir(out)
        lm = load(model, dtype)
        result = run_abliterate(lm, out, settings, progress=progress)
        base, chosen = result.baseline, result.choice.score
        console.print(
            f"validation refusals {base.refusals}/{base.n_harmful} → "
            f"{chosen.refusals}/{chosen.n_harmful} at first-token KL {chosen.kl:.3f} "
            f"(trial {result.choice.trial.number} of {result.n_trials}; {result.choice.rule})"
        )
        console.print(f"spec: {out / 'spec.json'} (use it with --steer); folder: {out}")
