"""Benchmark: all-layer direction extraction vs one plain forward pass, and vs peers.

Work: 256 harmful + 256 harmless instructions (the refusal_direction train
files in ``../shared/data`` beside the repository, or ``--data DIR``; never copied
into the repo), chat-rendered, batch
32, read at the last prompt token, a difference-of-means vector on every layer
of the embedded Qwen2.5-Coder-0.5B-Instruct.

Rows, in this venv (transformers 5), interleaved round by round:

- plain forward of the decoder stack only (``model.model``: every layer and the
  final norm, no LM head) over the same length-sorted batches: 1.00, the
  strictest baseline;
- plain forward with full logits (what ``model(**batch)`` does by default);
- ``steerlab.extract_direction`` (hooks on every decoder layer, float64 running
  sums, forward stopped after the last layer).

Peers, in their own interpreter (``--peers-python`` or the environment variable
``STEERLAB_PEERS_PYTHON``: a venv with transformers < 5, repeng 0.4.0, steering-vectors),
on the same rendered texts with their own batching at batch 32 (``--peer-baseline``
adds a plain forward there): repeng ``ControlVector.train`` (pca_diff),
steering-vectors ``train_steering_vector`` (mean aggregator = difference of
means), and steerlab itself under that transformers. steering-vectors' vectors
are compared with steerlab's (cosine per layer) as a correctness check.

    python benchmarks/extract.py --write      # ~15-25 min on a busy 2-core box
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from locations import DATA, PEERS_PYTHON, ROOT
from sections import section, write_section

SECTION = "extract"
WHAT = ("the time to extract all-layer difference-of-means directions, against a plain forward "
        "pass over the same prompts in the same venv, and against the peer libraries doing the "
        "same work in theirs.")
RERUN = "python benchmarks/extract.py --data DIR --peers-python PY --rounds 2 --write"
WORKER_FLAG = "--peer-worker"
BASELINE = "plain forward, decoder stack only (no LM head)"
NOTES = (
    "Notes: the peers' venv (--peers-python) has torch linked to the same torch 2.13.0+cpu "
    "build, transformers 4.57.6, repeng 0.4.0, steering-vectors 0.12.2, and steerlab's light "
    "dependencies; steerlab runs there from this checkout's src. repeng reads its default 23 "
    "layers (hidden_layers = -1..-23) with output_hidden_states and fits a PCA per layer; "
    "steering-vectors hooks all 24 decoder blocks with its mean aggregator (a difference of "
    "means, like steerlab's, hence the cosine check; why it stays below 1, e.g. bfloat16 "
    "rounding under different padding, was not investigated). steerlab stops each forward "
    "after the last layer, so it never runs the final norm or the LM head."
)


def load_instructions(n: int, data: Path = DATA) -> tuple[list[str], list[str]]:
    """The first ``n`` harmful and harmless training instructions."""
    if not (data / "harmful_train.json").exists():
        raise SystemExit(f"{data} holds no harmful_train.json: pass --data DIR")
    harmful = [r["instruction"] for r in json.loads((data / "harmful_train.json").read_text())]
    harmless = [r["instruction"] for r in json.loads((data / "harmless_train.json").read_text())]
    if len(harmful) < n or len(harmless) < n:
        raise SystemExit(f"need {n} prompts per side; have {len(harmful)} and {len(harmless)}")
    return harmful[:n], harmless[:n]


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    gc.collect()
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _forward_all(lm: Any, sets: list[list[str]], batch_size: int, *, head: bool = True) -> int:
    """Plain forwards over the same length-sorted batches steerlab uses.

    ``head=False`` runs only the decoder stack (``model.model``: embeddings, every layer,
    final norm), the strictest baseline: extraction never needs the LM head.
    """
    import torch

    from steerlab.activations.record import forward_batch, iter_batches, position_ids

    n = 0
    for texts in sets:
        for idx, batch in iter_batches(lm, texts, batch_size=batch_size):
            if head:
                forward_batch(lm, batch)
            else:
                with torch.inference_mode():
                    lm.model.model(input_ids=batch.input_ids,
                                   attention_mask=batch.attention_mask,
                                   position_ids=position_ids(batch.attention_mask),
                                   use_cache=False)
            n += len(idx)
    return n


def _conditions(lm: Any, harmful: list[str], harmless: list[str],
                batch_size: int) -> dict[str, Callable[[], Any]]:
    from steerlab.directions.extraction import extract_direction

    return {
        BASELINE: lambda: _forward_all(lm, [harmful, harmless], batch_size, head=False),
        "plain forward (full logits)": lambda: _forward_all(lm, [harmful, harmless], batch_size),
        "steerlab extract_direction (24 layers)":
            lambda: extract_direction(lm, harmful, harmless, batch_size=batch_size),
    }


def _rounds(conds: dict[str, Callable[[], Any]], rounds: int, baseline: str) -> dict[str, Any]:
    """Run every condition once per round (order rotated); ratios per round vs baseline."""
    names = list(conds)
    times: dict[str, list[float]] = {name: [] for name in names}
    outputs: dict[str, Any] = {}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            seconds, outputs[name] = _timed(conds[name])
            times[name].append(seconds)
            print(f"  round {r + 1}: {name}: {seconds:.1f} s", flush=True)
    ratios = {name: [t / b for t, b in zip(times[name], times[baseline], strict=True)]
              for name in names}
    return {"times": times, "ratios": ratios, "outputs": outputs}


def _summary(values: list[float]) -> str:
    """Geometric mean, with a 95% t-interval on the log scale when n > 1."""
    logs = [math.log(v) for v in values]
    mean = statistics.fmean(logs)
    if len(logs) < 2:
        return f"{math.exp(mean):.2f}× (n=1)"
    t = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78}.get(len(logs), 2.26)
    half = t * statistics.stdev(logs) / math.sqrt(len(logs))
    return f"{math.exp(mean):.2f}× [{math.exp(mean - half):.2f}, {math.exp(mean + half):.2f}] " \
           f"(n={len(logs)})"


# -- peers (separate interpreter) -------------------------------------------------------------
def _peer_worker(args: argparse.Namespace) -> None:
    """Runs under the peers' venv: plain forward, steerlab, repeng, steering-vectors."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    payload = json.loads(Path(args.texts).read_text())
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype).eval()
    model.requires_grad_(False)
    versions: dict[str, str] = {"transformers": transformers.__version__,
                                "torch": torch.__version__}
    errors: dict[str, str] = {}
    pos_texts, neg_texts = payload["rendered_harmful"], payload["rendered_harmless"]
    conds: dict[str, Callable[[], Any]] = {}

    sys.path.insert(0, str(ROOT / "src"))
    from steerlab.model.architectures import architecture_for
    from steerlab.model.loading import LoadedModel

    lm = LoadedModel(model=model, tokenizer=tok, arch=architecture_for(model), spec="peer",
                     dtype=dtype, dtype_reason="benchmark")
    _forward_all(lm, [payload["harmful"][:args.batch_size]], args.batch_size)  # warm-up
    ours = _conditions(lm, payload["harmful"], payload["harmless"], args.batch_size)
    baseline = BASELINE
    if args.peer_baseline:
        conds[baseline] = ours[baseline]
    conds["steerlab extract_direction (same venv)"] = ours["steerlab extract_direction (24 layers)"]
    try:
        from repeng import ControlVector, DatasetEntry

        versions["repeng"] = "0.4.0"
        dataset = [DatasetEntry(positive=p, negative=n)
                   for p, n in zip(pos_texts, neg_texts, strict=True)]
        conds["repeng ControlVector.train (pca_diff)"] = lambda: ControlVector.train(
            model, tok, dataset, batch_size=args.batch_size, method="pca_diff")
    except Exception as exc:  # record exactly what happened
        errors["repeng"] = f"{type(exc).__name__}: {exc}"
    try:
        import steering_vectors
        from steering_vectors import train_steering_vector

        versions["steering-vectors"] = getattr(steering_vectors, "__version__", "0.12.2")
        pairs = list(zip(pos_texts, neg_texts, strict=True))
        conds["steering-vectors train_steering_vector"] = lambda: train_steering_vector(
            model, tok, pairs, read_token_index=-1, batch_size=args.batch_size)
    except Exception as exc:
        errors["steering-vectors"] = f"{type(exc).__name__}: {exc}"

    names = list(conds)
    times: dict[str, list[float]] = {name: [] for name in names}
    outputs: dict[str, Any] = {}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            try:
                seconds, outputs[name] = _timed(conds[name])
            except Exception as exc:
                errors[name] = f"{type(exc).__name__}: {exc}"
                continue
            times[name].append(seconds)
            print(f"  [peers] round {r + 1}: {name}: {seconds:.1f} s", flush=True)
    check: dict[str, Any] = {}
    sv_out = outputs.get("steering-vectors train_steering_vector")
    sl_out = outputs.get("steerlab extract_direction (same venv)")
    if sv_out is not None and sl_out is not None:
        cos = [float(torch.nn.functional.cosine_similarity(
            sv_out.layer_activations[i].float().cpu(), sl_out.vector(i).float(), dim=0))
            for i in sl_out.layers]
        check["cosine steerlab vs steering-vectors, min over layers"] = min(cos)
    Path(args.json_out).write_text(json.dumps({
        "versions": versions, "errors": errors, "check": check,
        "times": {k: v for k, v in times.items() if v}, "baseline": baseline}))


def _run_peers(args: argparse.Namespace, model_dir: str, payload: dict[str, Any]) -> dict:
    python = Path(args.peers_python or "")
    if not args.peers_python or not python.exists():
        missing = (f"peers' python {python} not found: create the peers' venv "
                   "(transformers<5, repeng==0.4.0, steering-vectors) and pass --peers-python")
        return {"errors": {"all": missing}}
    with tempfile.TemporaryDirectory() as tmp:
        texts, out = Path(tmp) / "texts.json", Path(tmp) / "peers.json"
        texts.write_text(json.dumps(payload))
        cmd = [str(python), str(Path(__file__).resolve()), WORKER_FLAG, "--model-dir", model_dir,
               "--texts", str(texts), "--json-out", str(out), "--rounds", str(args.peer_rounds),
               "--dtype", args.dtype, "--batch-size", str(args.batch_size),
               "--threads", str(args.threads)] + (["--peer-baseline"] if args.peer_baseline
                                                  else [])
        proc = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, text=True,
                              capture_output=True)
        sys.stdout.write(proc.stdout)
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-4:]
            return {"errors": {"worker": "peer worker failed: " + " | ".join(tail)}}
        return json.loads(out.read_text())


# -- report -----------------------------------------------------------------------------------
def markdown(info: dict[str, Any], ours: dict[str, Any], peers: dict[str, Any]) -> str:
    base = BASELINE
    lines = [
        f"All-layer difference-of-means directions from {info['n']} harmful + {info['n']} "
        f"harmless instructions (refusal_direction's `harmful_train.json` and "
        f"`harmless_train.json` in `DIR`, by default `../shared/data` beside the repository, "
        f"never copied into it), batch {info['batch_size']}, "
        f"last prompt token, embedded Qwen2.5-Coder-0.5B-Instruct ({info['layers']} layers), "
        f"{info['dtype']}, on {info['machine']}, torch {info['torch']} with "
        f"{info['threads']} thread(s). The machine is shared "
        "with other jobs: ratios are per round against that round's baseline, geometric mean "
        "with a 95% t-interval over rounds.",
        "",
        f"### steerlab venv (transformers {info['transformers']})",
        "",
        "| condition | seconds per round | ratio to the decoder-stack-only forward |",
        "|---|---|---|",
    ]
    for name, times in ours["times"].items():
        secs = ", ".join(f"{t:.1f}" for t in times)
        lines.append(f"| {name} | {secs} | {_summary(ours['ratios'][name])} |")
    full = "plain forward (full logits)"
    ext = "steerlab extract_direction (24 layers)"
    vs_full = [a / b for a, b in zip(ours["times"][ext], ours["times"][full], strict=True)]
    lines += ["", f"steerlab extraction vs plain forward with full logits: {_summary(vs_full)}.",
              ""]
    versions = peers.get("versions", {})
    lines += [f"### peers' venv ({', '.join(f'{k} {v}' for k, v in versions.items())})", "",
              "Same rendered texts, each library's own batching at the same batch size.", "",
              "| condition | seconds | ratio to plain forward there | steerlab is faster by |",
              "|---|---|---|---|"]
    ptimes = peers.get("times", {})
    pbase = statistics.fmean(ptimes[base]) if base in ptimes else None
    ours_there = ptimes.get("steerlab extract_direction (same venv)")
    for name, times in ptimes.items():
        mean = statistics.fmean(times)
        ratio = f"{mean / pbase:.2f}×" if pbase else "-"
        faster = (f"{mean / statistics.fmean(ours_there):.2f}×"
                  if ours_there and "steerlab" not in name and name != base else "-")
        lines.append(f"| {name} | {', '.join(f'{t:.1f}' for t in times)} | {ratio} | {faster} |")
    for key, value in peers.get("check", {}).items():
        lines += ["", f"Check: {key} = {value:.6f}."]
    for key, value in peers.get("errors", {}).items():
        lines += ["", f"**{key} could not run:** {value}"]
    lines += ["", NOTES, ""]
    return section(SECTION, WHAT, RERUN, "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--n", type=int, default=256, help="prompts per side")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--peer-rounds", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the box is "
                        "shared, and spinning OpenMP threads on busy cores distort timings)")
    parser.add_argument("--peers-python", default=PEERS_PYTHON,
                        help="python of a venv with repeng and steering-vectors "
                        "(default: $STEERLAB_PEERS_PYTHON; without either, --no-peers)")
    parser.add_argument("--data", type=Path, default=DATA,
                        help="folder of the refusal_direction train files "
                        "(default: ../shared/data beside the repository)")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--peer-baseline", action="store_true",
                        help="also time a plain forward in the peers' venv")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    parser.add_argument(WORKER_FLAG, action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--texts", help=argparse.SUPPRESS)
    parser.add_argument("--json-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.peer_worker:
        _peer_worker(args)
        return

    import transformers

    from steerlab.model.embedded import safetensors_dir
    from steerlab.model.loading import load_model
    from steerlab.prompts.chat import render

    harmful, harmless = load_instructions(args.n, args.data)
    lm = load_model("default", dtype=args.dtype)
    print(f"model {lm.name}, {lm.dtype}, {args.n}+{args.n} prompts, batch {args.batch_size}",
          flush=True)
    _forward_all(lm, [harmful[:args.batch_size]], args.batch_size)  # warm-up, untimed
    ours = _rounds(_conditions(lm, harmful, harmless, args.batch_size), args.rounds, BASELINE)
    peers: dict[str, Any] = {}
    if not args.no_peers:
        del lm
        gc.collect()
        tok = load_model_tokenizer()
        payload = {"harmful": harmful, "harmless": harmless,
                   "rendered_harmful": [render(tok, p) for p in harmful],
                   "rendered_harmless": [render(tok, p) for p in harmless]}
        print("peers (separate interpreter):", flush=True)
        peers = _run_peers(args, str(safetensors_dir()), payload)
    cpu = platform.processor() or platform.machine()
    info = {"n": args.n, "batch_size": args.batch_size, "layers": 24, "dtype": args.dtype,
            "machine": f"{os.cpu_count()}-core {_cpu_name() or cpu}, CPU",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "threads": args.threads}
    ours.pop("outputs")
    text = markdown(info, ours, peers)
    print(text)
    if args.write:
        write_section(SECTION, text)


def load_model_tokenizer() -> Any:
    from transformers import AutoTokenizer

    from steerlab.model.embedded import safetensors_dir

    return AutoTokenizer.from_pretrained(str(safetensors_dir()))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


if __name__ == "__main__":
    main()
