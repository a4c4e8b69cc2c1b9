"""Measure the cost of the default persona-gating reproduction (issue #8's budget).

Runs ``run_persona_gating`` (default settings unless ``--config``) in a fresh
folder and prints, as a markdown table, where the time went in units of one
unhooked generation pass over the evaluation prompts, against the budget
(generation passes + 2), with the machine, dtype and versions. The run's own
``results.json`` is the measurement; this script only runs it where you say
(``--device cuda`` on a GPU) and formats it.

Usage: python benchmarks/persona_gating.py [--model default] [--device cuda]
       [--dtype auto] [--config FILE] [--out DIR]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from steerlab.experiments.config import PersonaGatingConfig
from steerlab.experiments.persona_gating import run_persona_gating
from steerlab.experiments.timings import cost_parts
from steerlab.model.loading import load_model


def machine(device: torch.device) -> str:
    """What ran it: the GPU's name, or the CPU with its thread count."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"CPU ({platform.machine()}), {torch.get_num_threads()} torch threads"


def markdown(results: dict[str, Any], lm: Any, wall: float, where: str) -> str:
    cost = results["cost"]
    base = cost["baseline_pass_seconds"]
    lines = [
        f"`python benchmarks/persona_gating.py` — {lm.name} ({str(lm.dtype).removeprefix('torch.')}"
        f", fingerprint {lm.fingerprint}) on {where}, torch {torch.__version__}; "
        f"n_eval={results['n_eval']}; wall {wall / 60:.1f} min; unit pass {base:.2f} s.",
        "",
        "| part | pass-equivalents | seconds |",
        "|---|---:|---:|",
        *(f"| {name} | {passes:.1f} | {passes * base:.0f} |" for name, passes in cost_parts(cost)),
        "",
        f"Within budget: **{'yes' if cost['within_budget'] else 'no'}**.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: auto)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None,
                        help="Run folder (default: a fresh temporary one; must not hold a run)")
    args = parser.parse_args()
    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    config = PersonaGatingConfig.from_file(args.config)
    out = args.out or Path(tempfile.mkdtemp(prefix="persona-gating-bench-"))
    if (out / "run.json").exists():
        raise SystemExit(f"{out} already holds a run; a resumed run's cost mixes machines. "
                         "Give an empty --out.")
    start = time.perf_counter()
    results = run_persona_gating(lm, out, config, show_progress=False)
    print(markdown(results, lm, time.perf_counter() - start, machine(lm.device)))


if __name__ == "__main__":
    main()
