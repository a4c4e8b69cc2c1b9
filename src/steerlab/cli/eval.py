"""``steerlab eval``: refusal / bypass / degenerate rates with intervals, an
optional LLM judge, KL and capability checks, paired comparison with a
baseline run; in-process (with interventions) or against any OpenAI-compatible
server. Resumable: rerun the same command to finish an interrupted run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from steerlab.cli.common import (
    DTYPE_OPT,
    RUN_DIR_OPT,
    SYSTEM_HELP,
    console,
    error_console,
    load,
    read_system,
)


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_(
        model: str = typer.Argument(
            "default", help="Model spec for the in-process backend (HF dir, hub id, .gguf, "
            "'default'); with --backend openai, the served model name unless --model is given."),
        prompts: str = typer.Option(..., "--prompts", help="Prompt file or built-in set "
                                    "(e.g. paired:harmful, harmless)."),
        split: str | None = typer.Option(None, "--split", help="train, val or test."),
        limit: int | None = typer.Option(None, "--limit", help="Evaluate the first N prompts."),
        system: str | None = typer.Option(None, "--system", help=SYSTEM_HELP),
        steer: list[str] = typer.Option([], "--steer", help="Intervention (repeatable): compact "
                                        "spec like 'ablate:runs/refusal@all', JSON, or a file."),
        judge: str = typer.Option("substring", "--judge", help="'substring' (no LLM judge) or "
                                  "the URL of an OpenAI-compatible judge endpoint."),
        judge_model: str | None = typer.Option(None, "--judge-model", help="Judge model name."),
        judge_api_key: str | None = typer.Option(None, "--judge-api-key",
                                                 envvar="STEERLAB_JUDGE_API_KEY"),
        judge_cache: Path | None = typer.Option(None, "--judge-cache", help="Judge cache JSONL "
                                                "(default OUT/judge_cache.jsonl)."),
        concurrency: int = typer.Option(4, "--concurrency", help="Parallel HTTP requests."),
        backend: str = typer.Option("inprocess", "--backend", help="inprocess or openai."),
        base_url: str | None = typer.Option(None, "--base-url", help="OpenAI-compatible server "
                                            "for --backend openai, e.g. http://127.0.0.1:8000/v1"),
        served_model: str | None = typer.Option(None, "--model", help="Served model name."),
        api_key: str | None = typer.Option(None, "--api-key", envvar="STEERLAB_API_KEY"),
        max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
        batch_size: int = typer.Option(8, "--batch-size", help="In-process generation batch."),
        refusal_phrases: str = typer.Option("default", "--refusal-phrases", help="default "
                                            "(standard + multilingual), standard, multilingual."),
        ignore_disclaimers: bool = typer.Option(False, "--ignore-disclaimers", help="Do not count "
                                                "'As an AI...' alone as a refusal."),
        classifier: Path | None = typer.Option(None, "--classifier", help="Local HF classifier "
                                               "directory (Llama-Guard / HarmBench style)."),
        baseline: Path | None = typer.Option(None, "--baseline", help="Another eval's --out on "
                                             "the same prompts: paired comparison."),
        kl_prompts: str | None = typer.Option(None, "--kl-prompts", help="Prompts for KL vs the "
                                              "unsteered model (e.g. harmless)."),
        kl_limit: int = typer.Option(16, "--kl-limit", help="How many KL prompts."),
        kl_tokens: int = typer.Option(8, "--kl-tokens", help="Average KL over this many tokens."),
        capability: int | None = typer.Option(None, "--capability", help="Also measure accuracy "
                                              "on N built-in capability items (0 = all)."),
        seed: int = typer.Option(0, "--seed"),
        out: Path = RUN_DIR_OPT,
        overwrite: bool = typer.Option(False, "--overwrite", help="Start --out over instead of "
                                       "resuming it (or write into a folder steerlab did not)."),
        dtype: str = DTYPE_OPT,
    ) -> None:
        """Evaluate a model (optionally steered) on a prompt set; write responses and summary."""
        from steerlab.errors import EvaluationError
        from steerlab.evaluate.backends import InProcessBackend, OpenAIBackend
        from steerlab.evaluate.classifier import LocalClassifier
        from steerlab.evaluate.judge import Judge
        from steerlab.evaluate.refusal import RefusalScorer
        from steerlab.evaluate.run import eval_dir, run_eval
        from steerlab.interventions.specs import parse_steer_args
        from steerlab.prompts.sets import load_prompts

        prompt_set = load_prompts(prompts, split=split, limit=limit)
        system_prompt = read_system(system)
        specs = parse_steer_args(steer)
        eval_dir(out, overwrite)  # a wrong --out fails before the model loads
        gen_backend: InProcessBackend | OpenAIBackend
        if backend == "inprocess":
            gen_backend = InProcessBackend(load(model, dtype), specs,
                                           max_new_tokens=max_new_tokens, batch_size=batch_size,
                                           seed=seed)
        elif backend == "openai":
            if not base_url:
                raise EvaluationError("--backend openai needs --base-url (e.g. "
                                      "http://127.0.0.1:8000/v1) and --model NAME.")
            if specs:
                raise EvaluationError("--steer acts on a model in this process; a served model "
                                      "must be steered by its server (steerlab serve --steer).")
            gen_backend = OpenAIBackend(base_url, served_model or model, api_key,
                                        max_new_tokens=max_new_tokens, seed=seed,
                                        max_concurrency=concurrency)
        else:
            raise EvaluationError(f"Unknown backend {backend!r}; use inprocess or openai.")
        llm_judge = None
        if judge != "substring":
            if not judge_model:
                raise EvaluationError("An LLM judge needs --judge-model NAME (the model the "
                                      f"server at {judge} serves).")
            llm_judge = Judge(judge, judge_model, judge_api_key,
                              cache=judge_cache or out / "judge_cache.jsonl",
                              max_concurrency=concurrency)
            llm_judge.check()
        clf = LocalClassifier(classifier) if classifier is not None else None
        kl_set = load_prompts(kl_prompts, limit=kl_limit) if kl_prompts else None
        try:
            summary = run_eval(
                prompt_set, gen_backend, out, system=system_prompt, judge=llm_judge, classifier=clf,
                refusal=RefusalScorer(phrases=refusal_phrases,
                                      ignore_disclaimers=ignore_disclaimers),
                baseline=baseline, kl_prompts=kl_set, kl_k=kl_tokens,
                capability_limit=capability, seed=seed, progress=True,
                extra_config={"prompts": {"source": prompts, "split": split, "limit": limit}},
                overwrite=overwrite,
            )
        finally:
            if llm_judge is not None:
                llm_judge.close()
            if isinstance(gen_backend, OpenAIBackend):
                gen_backend.close()
        _print(summary, out)


def _print(summary: dict[str, Any], out: Path) -> None:
    def rate(s: dict[str, Any]) -> str:
        if s.get("rate") is None:
            return "n/a"
        return f"{s['rate']:.1%} [{s['ci95'][0]:.1%}, {s['ci95'][1]:.1%}] ({s['k']}/{s['n']})"

    console.print(f"refusal (substring): {rate(summary['refusal'])}")
    for name in ("bypass", "degenerate"):
        console.print(f"{name}: {rate(summary['outcomes'][name])}")
    judge = summary.get("judge")
    if judge:
        comp = judge["compliance"]
        if comp["mean"] is not None:
            console.print(f"judge compliance: {comp['mean']:.3f} [{comp['ci95'][0]:.3f}, "
                          f"{comp['ci95'][1]:.3f}] (n={comp['n']}, missing={judge['missing']})")
        else:
            error_console.print(f"judge: every row missing ({judge['missing']})", style="yellow")
    comp = summary.get("comparison")
    if comp:
        c = comp["refusal"]
        console.print(f"vs baseline: refusal {c['baseline']['rate']:.1%} -> {c['this']['rate']:.1%}"
                      f" ({c['diff']:+.1%}), McNemar p = {c['p_mcnemar']:.3g} "
                      f"(n = {comp['n_pairs']} pairs)")
    console.print(f"wrote {out / 'responses.jsonl'}, {out / 'summary.json'}, "
                  f"{out / 'summary.md'}", style="dim")
