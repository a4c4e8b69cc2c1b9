"""``steerlab generate MODEL --prompts SET [--steer SPEC]... --out FILE.jsonl``."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import typer

from steerlab.cli.common import (
    DTYPE_OPT,
    MODEL_ARG,
    SYSTEM_HELP,
    console,
    error_console,
    load,
    read_system,
)

STEER_HELP = (
    "Intervention, repeatable, applied in order: compact OP:DIR[SRC]@LAYERS[:OPTION]... "
    "(add:runs/persona@12:4.0, ablate:runs/refusal[14]@all, project:runs/persona@16-23, "
    "subspace:runs/refusal@7-10>12-20) or a .json/.yaml file. See docs/steering.md."
)


def register(app: typer.Typer) -> None:
    @app.command()
    def generate(
        model: str = MODEL_ARG,
        prompts: str = typer.Option(..., "--prompts", "-p", help="Prompt set: built-in name "
                                    "(harmless, paired:harmful, ...) or a .jsonl/.json/.csv/.txt "
                                    "file."),
        out: Path = typer.Option(..., "--out", "-o", help="Output JSONL; rows are appended as "
                                 "they finish and a rerun skips those already there."),
        system: str | None = typer.Option(None, "--system", help=SYSTEM_HELP),
        steer: list[str] | None = typer.Option(None, "--steer", "-s", help=STEER_HELP),
        max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", help="Tokens per "
                                           "response at most."),
        split: str | None = typer.Option(None, "--split", help="train, val or test."),
        limit: int | None = typer.Option(None, "--limit", help="Use at most this many prompts."),
        sample: bool = typer.Option(False, "--sample", help="Sample instead of greedy decoding."),
        temperature: float = typer.Option(1.0, "--temperature", help="Sampling temperature."),
        top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass."),
        seed: int = typer.Option(0, "--seed", help="Sampling seed (per prompt: seed, index)."),
        batch_size: str = typer.Option("auto", "--batch-size", help="Rows per batch or 'auto' "
                                       "(halves on out-of-memory)."),
        allow_mismatch: bool = typer.Option(False, "--allow-mismatch", help="Use directions "
                                            "made on a model with another fingerprint."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Start --out over instead of "
                                       "resuming it (or replace a file steerlab did not write)."),
        dtype: str = DTYPE_OPT,
    ) -> None:
        """Generate chat responses (optionally steered), streamed to a resumable JSONL."""
        from steerlab.errors import DataError
        from steerlab.generation.generate import generate as run
        from steerlab.interventions.specs import parse_steer_args, resolve_specs
        from steerlab.prompts.sets import load_prompts
        from steerlab.store.outputs import output_file
        from steerlab.store.rowstore import is_store

        specs = parse_steer_args(steer)  # parse before loading the model: fail fast on typos
        size: int | str = batch_size
        if batch_size != "auto":
            if not batch_size.isdigit() or int(batch_size) < 1:
                raise DataError(f"--batch-size must be 'auto' or a positive integer; got "
                                f"{batch_size!r}.")
            size = int(batch_size)
        prompt_set = load_prompts(prompts, split=split, limit=limit)
        system_prompt = read_system(system)
        # a wrong --out fails before the model loads (the run identity is checked after)
        output_file(out, overwrite=overwrite, ours=lambda p: is_store(p, "generate"),
                    what="steerlab generate")
        lm = load(model, dtype)
        specs = resolve_specs(specs, lm=lm, allow_mismatch=allow_mismatch)
        start = time.perf_counter()
        rows = run(lm, list(prompt_set), system=system_prompt, steer=specs,
                   max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature,
                   top_p=top_p, seed=seed, batch_size=size, out_jsonl=out, progress=True,
                   overwrite=overwrite)
        elapsed = time.perf_counter() - start
        reasons = Counter(r.finish_reason for r in rows)
        tokens = sum(r.n_new_tokens for r in rows)
        error_console.print(f"{len(rows)} responses ({dict(reasons)}), {tokens} new tokens, "
                            f"{elapsed:.1f} s this run", style="dim")
        console.print(f"wrote {out}")
