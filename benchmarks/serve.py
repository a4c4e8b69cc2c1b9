"""Throughput of ``steerlab serve``: dynamic batching vs one request at a time.

Starts the real server (uvicorn, loopback) on the embedded model and sends the
same N chat requests (greedy, exactly T new tokens each via ``ignore_eos``)
two ways, alternating within each trial so machine load drifts hit both alike:

- sequential: one request, wait for its answer, then the next;
- concurrent: all N at once; the server batches them (up to --max-batch-size).

Prints tokens/s for both and their ratio (mean and 95% t-interval over
trials), and writes the "serve" section of BENCHMARKS.md.

    python benchmarks/serve.py                      # 3 trials, 16 requests x 16 tokens
    python benchmarks/serve.py --trials 5 --requests 32 --threads 1 --no-write
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from sections import section, write_section
from steerlab.model.loading import load_model
from steerlab.serve import background, create_app

SECTION = "serve"
WHAT = ("the throughput of `steerlab serve` with dynamic batching against one request at a "
        "time.")
RERUN = "python benchmarks/serve.py --requests 16 --tokens 16 --trials 4 --threads 1"
PROMPTS = [
    "What is the capital of France?", "Name three primary colors.",
    "How many legs does a spider have?", "What does a thermometer measure?",
    "Give one word that rhymes with cat.", "What is 12 times 12?",
    "Why is the sky blue?", "What language is spoken in Brazil?",
    "Name a planet in the solar system.", "What is the boiling point of water?",
    "Who wrote Romeo and Juliet?", "What is photosynthesis?",
    "How many days are in a leap year?", "Name a mammal that can fly.",
    "What is the largest ocean?", "What gas do plants absorb?",
]


def _t95(n: int) -> float:
    """Two-sided 95% Student t quantile for n-1 degrees of freedom (small n table)."""
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
             9: 2.262, 10: 2.228}
    return table.get(n - 1, 1.96 + 2.5 / max(n - 1, 1))


def mean_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval (the interval is the mean itself when n == 1)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, mean, mean
    half = _t95(len(values)) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def _body(prompt: str, tokens: int) -> dict[str, Any]:
    return {"model": "default", "messages": [{"role": "user", "content": prompt}],
            "max_tokens": tokens, "temperature": 0, "ignore_eos": True}


def sequential(url: str, prompts: list[str], tokens: int) -> tuple[float, int]:
    n_out = 0
    start = time.perf_counter()
    with httpx.Client(timeout=3600) as client:
        for prompt in prompts:
            reply = client.post(f"{url}/v1/chat/completions", json=_body(prompt, tokens))
            reply.raise_for_status()
            n_out += reply.json()["usage"]["completion_tokens"]
    return time.perf_counter() - start, n_out


def concurrent(url: str, prompts: list[str], tokens: int) -> tuple[float, int]:
    async def main() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(timeout=3600) as client:
            replies = await asyncio.gather(*(
                client.post(f"{url}/v1/chat/completions", json=_body(p, tokens))
                for p in prompts))
        for reply in replies:
            reply.raise_for_status()
        return [r.json() for r in replies]

    start = time.perf_counter()
    answers = asyncio.run(main())
    return time.perf_counter() - start, sum(a["usage"]["completion_tokens"] for a in answers)


def _counters(url: str) -> tuple[float, float]:
    """(batches run, requests run in batches) from the server's /metrics."""
    text = httpx.get(f"{url}/metrics").text
    values = []
    for name in ("steerlab_batches_total", "steerlab_batch_rows_total"):
        match = re.search(rf"^{name} (\S+)$", text, re.M)
        if match is None:
            raise RuntimeError(f"{name} missing from /metrics")
        values.append(float(match.group(1)))
    return values[0], values[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "BENCHMARKS.md"))
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: torch's default). On a machine shared with other "
                        "jobs, 1 avoids OpenMP oversubscription stalls.")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]

    lm = load_model(args.model, dtype=args.dtype)
    prompts = [PROMPTS[i % len(PROMPTS)] + (f" ({i})" if i >= len(PROMPTS) else "")
               for i in range(args.requests)]
    app = create_app(lm, {}, max_batch_size=args.max_batch_size, max_wait_ms=20,
                     max_new_tokens_limit=max(64, args.tokens))
    seq_rates: list[float] = []
    con_rates: list[float] = []
    ratios: list[float] = []
    batch_sizes: list[float] = []
    with background(app) as url:
        sequential(url, prompts[:2], 4)  # warm up
        for trial in range(args.trials):
            t_seq, n_seq = sequential(url, prompts, args.tokens)
            before = _counters(url)
            t_con, n_con = concurrent(url, prompts, args.tokens)
            after = _counters(url)
            batch_sizes.append((after[1] - before[1]) / max(after[0] - before[0], 1))
            assert n_seq == n_con == args.requests * args.tokens
            seq_rates.append(n_seq / t_seq)
            con_rates.append(n_con / t_con)
            ratios.append(con_rates[-1] / seq_rates[-1])
            print(f"trial {trial + 1}: sequential {seq_rates[-1]:.1f} tok/s ({t_seq:.1f} s), "
                  f"batched {con_rates[-1]:.1f} tok/s ({t_con:.1f} s), ratio {ratios[-1]:.2f}x")

    def fmt(values: list[float], unit: str) -> str:
        mean, lo, hi = mean_ci(values)
        return f"{mean:.2f}{unit} (95% CI {lo:.2f}-{hi:.2f}, n={len(values)} trials)"

    cpu = _cpu_name()
    dtype = str(lm.dtype).removeprefix("torch.")
    lines = [
        f"Machine: {cpu}, {torch.get_num_threads()} torch threads, CPU, torch "
        f"{torch.__version__}, {dtype}; model {lm.name}; {time.strftime('%Y-%m-%d')}.",
        f"Workload per trial: {args.requests} chat requests x {args.tokens} new tokens (greedy, "
        f"ignore_eos), max batch size {args.max_batch_size}, max wait 20 ms; sequential and "
        "batched runs alternate within each trial. Command: `python benchmarks/serve.py "
        f"--requests {args.requests} --tokens {args.tokens} --trials {args.trials}"
        f"{f' --threads {args.threads}' if args.threads else ''}`.",
        "",
        "| mode | throughput (tokens/s) |",
        "|---|---|",
        f"| sequential requests | {fmt(seq_rates, '')} |",
        f"| concurrent, dynamic batching | {fmt(con_rates, '')} |",
        "",
        f"Ratio batched / sequential: **{fmt(ratios, 'x')}** (target >= 2x). "
        f"Mean batch size in the batched runs: {statistics.fmean(batch_sizes):.1f} requests.",
        f"Shared 2-core machine: other jobs ran at the same time (load average "
        f"{load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end), so absolute rates are "
        "noisy; the ratio is measured within each trial.",
    ]
    report = "\n".join(lines)
    print()
    print(report)
    if not args.no_write:
        write_section(SECTION, section(SECTION, WHAT, RERUN, report), Path(args.out))
        print(f"\nwrote section '{SECTION}' of {args.out}")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
