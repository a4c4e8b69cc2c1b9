"""``steerlab reproduce persona-gating``: the paper's experiments, one command."""

from __future__ import annotations

from pathlib import Path

import typer

from steerlab.cli.common import DTYPE_OPT, console, load


def register(app: typer.Typer) -> None:
    group = typer.Typer(
        help="Reproduce published steering experiments end to end.", no_args_is_help=True
    )
    app.add_typer(group, name="reproduce")

    @group.command("persona-gating")
    def persona_gating(
        model: str = typer.Argument("default", help="Model spec (default: embedded Qwen2.5-0.5B)."),
        out: Path = typer.Option(..., "--out", help="Run folder (resumes if it exists)."),
        eval_prompts: str | None = typer.Option(
            None,
            "--eval-prompts",
            help="Evaluation prompts file or built-in name (default: built-in harmful test split).",
        ),
        limit: int | None = typer.Option(None, "--limit", help="Use the first N eval prompts."),
        config: Path | None = typer.Option(None, "--config", help="YAML/JSON config overrides."),
        judge: str | None = typer.Option(None, "--judge", help="OpenAI-compatible judge URL."),
        judge_model: str | None = typer.Option(None, "--judge-model", help="Judge model name."),
        seed: int | None = typer.Option(None, "--seed", help="Seed for random controls."),
        dtype: str = DTYPE_OPT,
    ) -> None:
        """Persona gates refusal (arXiv 2606.26161): steer, re-add, project, random controls."""
        from steerlab.experiments.config import PersonaGatingConfig
        from steerlab.experiments.persona_gating import run_persona_gating

        overrides: dict[str, object] = {
            "limit": limit,
            "judge_url": judge,
            "judge_model": judge_model,
            "seed": seed,
        }
        if eval_prompts is not None:
            overrides["eval_prompts"] = eval_prompts
        cfg = PersonaGatingConfig.from_file(config, **overrides)
        if eval_prompts is not None and Path(eval_prompts).exists():
            cfg = cfg.model_copy(update={"eval_split": None})  # a user's file has no splits
        lm = load(model, dtype)
        results = run_persona_gating(lm, out, cfg)
        for finding in results["findings"]:
            color = {"reproduced": "green", "not reproduced": "red"}.get(
                finding["verdict"], "yellow"
            )
            console.print(f"[{color}]{finding['verdict']:>15}[/]  {finding['claim']}")
            console.print(f"                 [dim]{finding['evidence']}[/]")
        if "cost" in results:
            cost = results["cost"]
            console.print(
                f"cost: {cost['ratio_to_baseline_pass']:.1f}x one unhooked generation "
                f"pass (budget {cost['budget_ratio']:.1f}x)"
            )
        console.print(f"report: {out / 'report.html'}  results: {out / 'results.json'}")
