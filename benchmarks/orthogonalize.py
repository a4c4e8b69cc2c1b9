"""Benchmark weight orthogonalization on the embedded model.

Measures, in one process and one run:

- time to orthogonalize every residual writer (embedding, 24 × o_proj, 24 × down_proj);
- peak memory during it: the process's peak RSS (VmHWM, reset just before via
  /proc/self/clear_refs) minus its RSS before, as a share of the model's own
  parameter bytes (target: peak ≤ 1.1 × model, i.e. overhead ≤ 0.1 ×);
- greedy generation speed of the original model, the same model under runtime
  ``Ablate`` hooks at all layers, and the orthogonalized (merged) model.

Usage: python benchmarks/orthogonalize.py [--dtype bfloat16] [--write]
(--write replaces the "orthogonalize" section of BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from sections import section, write_section
from steerlab.directions.artifact import Direction, DirectionMeta
from steerlab.generation.generate import generate
from steerlab.interventions.specs import Ablate
from steerlab.model.loading import load_model
from steerlab.weights.orthogonalize import orthogonalize

PROMPTS = [
    "Explain how a bicycle gear works.",
    "Write a short poem about rain.",
    "What is the capital of Australia?",
    "Give three tips for learning Python.",
]
SECTION = "orthogonalize"
WHAT = ("the time and peak memory of orthogonalizing a direction out of the weights, and the "
        "generation speed of the original model, the original under runtime ablation, and the "
        "orthogonalized model.")


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _gen_rate(lm: Any, steer: list[Any], tokens: int) -> float:
    """Generated tokens per second of one batched greedy run."""
    start = time.perf_counter()
    gens = generate(lm, PROMPTS, steer=steer, max_new_tokens=tokens, batch_size=len(PROMPTS))
    return sum(g.n_new_tokens for g in gens) / (time.perf_counter() - start)


def run(dtype: str, tokens: int, repeats: int) -> dict[str, Any]:
    lm = load_model("default", dtype=dtype)
    model_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    direction = Direction(torch.randn(1, lm.d_model, generator=torch.Generator().manual_seed(0)),
                          (12,), DirectionMeta(name="random"))
    generate(lm, PROMPTS[:1], max_new_tokens=2)  # warm up allocator and kernels first
    # float32 weights stay memory-mapped from the safetensors cache: fault every page in
    # first, or the edit's first touch of never-read rows (most of the embedding) would be
    # counted as overhead although the model's size already includes them.
    for param in lm.model.parameters():
        flat = param.detach().reshape(-1)
        float(flat[:: max(1, 4096 // param.element_size())].float().sum())
    rss_before = _status("VmRSS")
    reset = _reset_peak()
    start = time.perf_counter()
    result = orthogonalize(lm, direction)
    seconds = time.perf_counter() - start
    peak = _status("VmHWM")
    overhead = max(0, peak - rss_before)
    # Speeds: a second, unedited copy; conditions interleaved round by round so that load
    # from other processes on a shared machine hits all three alike.
    base = load_model("default", dtype=dtype)
    conditions = {
        "original": (base, []),
        "runtime_ablation": (base, [Ablate(direction)]),
        "orthogonalized": (lm, []),
    }
    for model, steer in conditions.values():
        _gen_rate(model, steer, 4)  # warm-up
    rates: dict[str, list[float]] = {k: [] for k in conditions}
    for _ in range(repeats):
        for name, (model, steer) in conditions.items():
            rates[name].append(_gen_rate(model, steer, tokens))
    speeds = {k: statistics.median(v) for k, v in rates.items()}
    return {
        "dtype": dtype,
        "model_bytes": model_bytes,
        "modules_edited": len(result.modules),
        "orthogonalize_seconds": round(seconds, 3),
        "peak_overhead_bytes": overhead,
        "peak_over_model": round((model_bytes + overhead) / model_bytes, 4),
        "peak_reset_ok": reset,
        "tokens_per_second": {k: round(v, 2) for k, v in speeds.items()},
        "speed_vs_original": {k: round(v / speeds["original"], 3) for k, v in speeds.items()},
        "generation": f"{len(PROMPTS)} prompts batched, {tokens} new tokens, greedy, "
                      f"median of {repeats} interleaved rounds",
    }


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        f"Machine: {platform.processor() or 'CPU'}"
        f" ({torch.get_num_threads()} threads), torch {torch.__version__}, CPU, embedded "
        "Qwen2.5-Coder-0.5B-Instruct (untied, 24 layers). Peak = model bytes + the rise of the "
        "process's peak RSS during `orthogonalize` (VmHWM reset just before).",
        "",
        "| dtype | model | orthogonalize time | peak overhead | peak / model | gen tok/s "
        "original | runtime ablation | orthogonalized |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s, v = r["tokens_per_second"], r["speed_vs_original"]
        lines.append(
            f"| {r['dtype']} | {r['model_bytes'] / 2**30:.2f} GiB | "
            f"{r['orthogonalize_seconds']:.2f} s ({r['modules_edited']} matrices) | "
            f"{r['peak_overhead_bytes'] / 2**20:.1f} MiB | {r['peak_over_model']:.3f}× | "
            f"{s['original']:.1f} (1.00×) | {s['runtime_ablation']:.1f} "
            f"({v['runtime_ablation']:.2f}×) | {s['orthogonalized']:.1f} "
            f"({v['orthogonalized']:.2f}×) |"
        )
    lines += ["", f"Generation: {results[0]['generation']}. The machine is shared (2 cores, "
              "other jobs running), so speed ratios carry a few percent of noise; the "
              "orthogonalized model runs the same graph as the original with no hooks.", ""]
    return section(SECTION, WHAT, "python benchmarks/orthogonalize.py --write", "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", action="append", help="bfloat16 and/or float32 (both default)")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    results = []
    for dtype in args.dtype or ["bfloat16", "float32"]:
        results.append(run(dtype, args.tokens, args.repeats))
        print(json.dumps(results[-1]), flush=True)
    text = markdown(results)
    print(text)
    if args.write:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
