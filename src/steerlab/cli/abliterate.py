"""``steerlab abliterate``: search per-layer ablation kernels for the refusal/KL trade-off."""

from __future__ import annotations

from pathlib import Path

import typer

from steerlab.cli import common


def register(app: typer.Typer) -> None:
    @app.command()
    def abliterate(
        model: str = common.MODEL_ARG,
        out: Path = common.RUN_DIR_OPT,
        trials: int | None = typer.Option(None, "--trials", help="Trial budget (default 40, "
                                          "or the config's)."),
        config: Path | None = common.CONFIG_OPT,
        judge_url: str | None = typer.Option(None, "--judge-url", help="OpenAI-compatible "
                                             "judge instead of the substring scorer."),
        overwrite: bool = common.OVERWRITE_OPT,
        dtype: str = common.DTYPE_OPT,
        progress: bool = typer.Option(True, "--progress/--no-progress",
                                      help="Show trials done, best so far and time left."),
    ) -> None:
        """Search direction source, position and per-layer ablation kernels with Optuna;
        write the chosen spec (usable by every --steer), a manifest and a report.

        --config takes the settings of docs/abliterate.md (a rerun resumes the study)."""
        from steerlab.abliterate import AbliterateConfig
        from steerlab.abliterate import abliterate as run_abliterate

        settings = AbliterateConfig.from_file(config, trials=trials, judge_url=judge_url)
        lm = common.load_for_run(model, dtype, out, overwrite)
        result = run_abliterate(lm, out, settings, progress=progress)
        base, chosen = result.baseline, result.choice.score
        common.console.print(
            f"validation refusals {base.refusals}/{base.n_harmful} → "
            f"{chosen.refusals}/{chosen.n_harmful} at first-token KL {chosen.kl:.3f} "
            f"(trial {result.choice.trial.number} of {result.n_trials}; {result.choice.rule})"
        )
        common.console.print(f"spec: {out / 'spec.json'} (use it with --steer); folder: {out}")
