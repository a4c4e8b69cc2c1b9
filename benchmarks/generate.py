"""Benchmark: steered generation throughput, side by side in one run, as ratios.

Same prompts, greedy, same number of new tokens. Rows (tokens/s, and the ratio
to unhooked ``transformers`` ``generate`` measured in the same round = 1.00):

- transformers ``generate``, unhooked (the baseline);
- transformers ``generate`` inside ``steerlab.steer``: one ``Add`` at one layer;
  ``Ablate`` at all layers (every layer's input, attention and MLP writes);
- ``steerlab.generation.generate`` (its own KV-cached loop): unhooked, ``Add``, ``Ablate``;
- peers, in a separate interpreter (``--peers-python`` or
  ``$STEERLAB_PEERS_PYTHON``: a venv with transformers < 5): steering-vectors' ``apply`` and
  repeng's ``ControlModel`` doing the same addition, with their own unhooked
  baseline and ``steerlab.steer`` under that transformers for a same-venv check;
- at batch 1 and 16 on CPU (embedded Qwen2.5-Coder-0.5B-Instruct), at batch 1 and
  32 on a GPU (a randomly initialised Llama-3.1-8B-Instruct config in bfloat16).

Conditions are interleaved round by round so machine load hits them alike; the
ratio is computed per round against that round's baseline and summarised as a
geometric mean with a 95% t-interval over the rounds (n = rounds).

    python benchmarks/generate.py                 # CPU, ~5 min on an idle 2-core box
    python benchmarks/generate.py --rounds 5 --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
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

import torch

from locations import PEERS_PYTHON, ROOT
from sections import section, write_section

WHAT = ("tokens per second of steered generation, steerlab's and its peers', as ratios to "
        "unhooked transformers `generate`.")

PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a refrigerator keeps food cold.",
    "Describe the water cycle to a ten-year-old, step by step.",
    "Write a detailed guide to planting a vegetable garden in spring.",
    "Explain how public-key cryptography works, with an example.",
    "Write an essay about the history of the printing press.",
    "Describe a walk through a busy market in a city you imagine.",
    "Explain the difference between a list and a tuple in Python, with examples.",
    "Write a letter to a friend describing your last holiday in detail.",
    "Explain how vaccines train the immune system.",
    "Write a detailed recipe for homemade bread, with every step.",
    "Describe how a bill becomes a law, step by step.",
    "Write a short biography of an imaginary inventor.",
    "Explain how a compiler turns source code into machine code.",
    "Describe the life cycle of a star, from nebula to remnant.",
    "Write a travel guide for a weekend in a mountain town.",
]
PEER_SCRIPT_FLAG = "--peer-worker"


class Workload:
    """How much each timed call does; the warm-up shrinks it to a token or two."""

    def __init__(self, new_tokens: int, single_prompts: int) -> None:
        self.new_tokens = new_tokens
        self.single_prompts = single_prompts

    def prompts(self, prompts: list[str], batch: int) -> list[str]:
        """Batch 1 runs the first ``single_prompts`` one at a time; batch b, b prompts."""
        return prompts[:self.single_prompts] if batch == 1 else prompts[:batch]


# -- timing helpers ----------------------------------------------------------------------------
def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _hf_generate(lm: Any, prompts: list[str], batch: int, new_tokens: int) -> int:
    """transformers' greedy generate over ``prompts`` in chunks; returns new tokens."""
    from steerlab.prompts.chat import encode

    total = 0
    for start in range(0, len(prompts), batch):
        enc = encode(lm.tokenizer, prompts[start:start + batch]).to(lm.device)
        with torch.inference_mode():
            out = lm.model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                                    max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                    do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
        total += int(out[:, enc.input_ids.shape[1]:].numel())
    return total


def _timed(run: Callable[[], int]) -> tuple[int, float]:
    _sync()
    start = time.perf_counter()
    tokens = run()
    _sync()
    return tokens, time.perf_counter() - start


def _summary(per_round: list[float]) -> dict[str, Any]:
    """Geometric mean and 95% t-interval of positive per-round ratios (n = rounds)."""
    logs = [math.log(x) for x in per_round if x > 0]
    n = len(logs)
    if n == 0:
        return {"n": 0, "mean": float("nan"), "ci95": [float("nan"), float("nan")]}
    mean = statistics.fmean(logs)
    if n == 1:
        return {"n": 1, "mean": math.exp(mean), "ci95": [float("nan"), float("nan")]}
    t = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365}.get(n, 2.262)
    half = t * statistics.stdev(logs) / math.sqrt(n)
    return {"n": n, "mean": math.exp(mean), "ci95": [math.exp(mean - half), math.exp(mean + half)]}


# -- the model under test ----------------------------------------------------------------------
def _cpu_model(dtype: str) -> Any:
    from steerlab.model.loading import load_model

    return load_model("default", dtype=dtype)


def _gpu_model() -> Any:
    """A random-weight model with Llama-3.1-8B-Instruct's configuration, in bfloat16."""
    from tests.tiny import tiny_tokenizer
    from transformers import AutoModelForCausalLM, LlamaConfig

    from steerlab.model.architectures import architecture_for
    from steerlab.model.loading import LoadedModel

    config = LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
        rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    )
    tok = tiny_tokenizer("llama3")  # word-level ids < 128256; random weights read any ids
    config.pad_token_id, config.eos_token_id, config.bos_token_id = (
        tok.pad_token_id, tok.eos_token_id, None)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.eval().requires_grad_(False)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return LoadedModel(model=model, tokenizer=tok, arch=architecture_for(model),
                       spec="random-llama-3.1-8b", dtype=torch.bfloat16, dtype_reason="benchmark")


def _gpu_prompts() -> list[str]:
    from tests.tiny import WORDS

    gen = torch.Generator().manual_seed(0)
    return [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (40,), generator=gen))
            for _ in range(32)]


def _direction(lm: Any) -> Any:
    from steerlab.directions.artifact import Direction, DirectionMeta

    gen = torch.Generator().manual_seed(0)
    vectors = torch.randn(lm.n_layers, lm.d_model, generator=gen)
    vectors = vectors / vectors.norm(dim=1, keepdim=True)
    return Direction(vectors, tuple(range(lm.n_layers)),
                     DirectionMeta(name="bench", best_layer=lm.n_layers // 2))


# -- in-process conditions ---------------------------------------------------------------------
def _conditions(lm: Any, prompts: list[str], work: Workload, layer: int,
                alpha: float) -> dict[str, Callable[[int], int]]:
    from steerlab.generation.generate import generate
    from steerlab.interventions.specs import Ablate, Add
    from steerlab.interventions.steering import steer

    direction = _direction(lm)
    add = [Add(direction, alpha, layers=layer)]
    ablate = [Ablate(direction)]

    def hf(specs: list[Any]) -> Callable[[int], int]:
        def run(batch: int) -> int:
            with steer(lm, specs):
                return _hf_generate(lm, work.prompts(prompts, batch), batch, work.new_tokens)
        return run

    def ours(specs: list[Any]) -> Callable[[int], int]:
        def run(batch: int) -> int:
            rows = generate(lm, work.prompts(prompts, batch), steer=specs,
                            max_new_tokens=work.new_tokens, batch_size=batch)
            return sum(r.n_new_tokens for r in rows)
        return run

    return {
        "transformers generate (unhooked)": hf([]),
        f"transformers generate + steerlab Add @{layer}": hf(add),
        "transformers generate + steerlab Ablate @all": hf(ablate),
        "steerlab.generation.generate (unhooked)": ours([]),
        f"steerlab.generation.generate Add @{layer}": ours(add),
        "steerlab.generation.generate Ablate @all": ours(ablate),
    }


def _measure(conds: dict[str, Callable[[int], int]], batches: list[int], rounds: int,
             baseline: str, work: Workload) -> dict[str, Any]:
    """Interleaved rounds; per-round tokens/s and ratio to the same round's baseline."""
    results: dict[str, Any] = {}
    full = (work.new_tokens, work.single_prompts)
    work.new_tokens, work.single_prompts = 2, 1
    for name, run in conds.items():  # warm-up: first-call costs (allocations, kernels)
        try:
            run(1)
        except Exception as exc:  # a peer that cannot run at all: record why, keep going
            results[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    work.new_tokens, work.single_prompts = full
    for r in range(rounds):
        for batch in batches:
            speeds: dict[str, float] = {}
            for name, run in conds.items():
                if "error" in results.get(name, {}):
                    continue
                tokens, seconds = _timed(lambda run=run, batch=batch: run(batch))
                speeds[name] = tokens / seconds
                entry = results.setdefault(name, {}).setdefault(str(batch), {
                    "tokens_per_s": [], "ratio": [], "tokens": tokens})
                entry["tokens_per_s"].append(speeds[name])
                print(f"  round {r + 1}/{rounds} batch {batch:>2} {name:<48} "
                      f"{tokens:>5} tok {seconds:7.1f} s {speeds[name]:8.1f} tok/s", flush=True)
            for name, speed in speeds.items():
                results[name][str(batch)]["ratio"].append(speed / speeds[baseline])
    return results


# -- peers (separate interpreter) --------------------------------------------------------------
def _peer_worker(args: argparse.Namespace) -> None:
    """Runs under the peers' venv (transformers < 5): baseline, steering-vectors, repeng,
    and steerlab.steer, all on plain ``model.generate``."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype).eval()
    model.requires_grad_(False)
    layer, alpha = args.layer, args.alpha
    work = Workload(args.new_tokens, args.single_prompts)
    gen = torch.Generator().manual_seed(0)
    vec = torch.randn(model.config.hidden_size, generator=gen)
    vec = alpha * vec / vec.norm()
    versions = {"transformers": transformers.__version__, "torch": torch.__version__}

    def generate(batch: int) -> int:
        prompts = work.prompts(PROMPTS, batch)
        total = 0
        for start in range(0, len(prompts), batch):
            texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                             add_generation_prompt=True)
                     for p in prompts[start:start + batch]]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.inference_mode():
                out = model.generate(**enc, max_new_tokens=work.new_tokens,
                                     min_new_tokens=work.new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
            total += int(out[:, enc["input_ids"].shape[1]:].numel())
        return total

    conds: dict[str, Callable[[int], int]] = {"transformers generate (unhooked)": generate}
    try:
        import steering_vectors
        from steering_vectors import SteeringVector

        versions["steering-vectors"] = getattr(steering_vectors, "__version__", "0.12.2")
        sv = SteeringVector(layer_activations={layer: vec}, layer_type="decoder_block")

        def sv_run(batch: int) -> int:
            with sv.apply(model, multiplier=1.0, min_token_index=0):
                return generate(batch)
        conds[f"steering-vectors apply Add @{layer}"] = sv_run
    except Exception as exc:
        conds[f"steering-vectors apply Add @{layer}"] = _raiser(exc)
    try:
        import numpy as np
        from repeng import ControlModel, ControlVector

        versions["repeng"] = "0.4.0"

        def repeng_run(batch: int) -> int:
            control = ControlModel(model, [layer])  # wraps the layers in place
            try:
                cv = ControlVector(model_type=model.config.model_type,
                                   directions={layer: vec.numpy().astype(np.float32)})
                control.set_control(cv, 1.0)
                return generate(batch)
            finally:
                control.unwrap()
        conds[f"repeng ControlModel Add @{layer}"] = repeng_run
    except Exception as exc:
        conds[f"repeng ControlModel Add @{layer}"] = _raiser(exc)
    try:
        sys.path.insert(0, str(ROOT / "src"))
        from steerlab.directions.artifact import Direction
        from steerlab.interventions.specs import Add
        from steerlab.interventions.steering import steer
        from steerlab.model.architectures import architecture_for
        from steerlab.model.loading import LoadedModel

        lm = LoadedModel(model=model, tokenizer=tok, arch=architecture_for(model), spec="peer",
                         dtype=dtype, dtype_reason="benchmark")
        direction = Direction(vec[None, :], (layer,))

        def steerlab_run(batch: int) -> int:
            with steer(lm, [Add(direction, 1.0, layers=layer)]):
                return generate(batch)
        conds[f"steerlab.steer Add @{layer} (same venv)"] = steerlab_run
    except Exception as exc:
        conds[f"steerlab.steer Add @{layer} (same venv)"] = _raiser(exc)
    results = _measure(conds, args.batches, args.rounds, "transformers generate (unhooked)", work)
    Path(args.json_out).write_text(json.dumps({"versions": versions, "results": results}))


def _raiser(exc: BaseException) -> Callable[[int], int]:
    def run(batch: int) -> int:
        raise exc
    return run


def _run_peers(args: argparse.Namespace, model_dir: str, layer: int) -> dict[str, Any]:
    python = Path(args.peers_python or "")
    if not args.peers_python or not python.exists():
        return {"error": f"peers' python {python} not found: create the peers' venv "
                         "(transformers<5, steering-vectors, repeng) and pass --peers-python"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "peers.json"
        cmd = [str(python), str(Path(__file__).resolve()), PEER_SCRIPT_FLAG, "--model-dir",
               model_dir, "--json-out", str(out), "--rounds", str(args.peer_rounds or args.rounds),
               "--new-tokens",
               str(args.new_tokens), "--single-prompts", str(args.single_prompts),
               "--batches", ",".join(map(str, args.batches)), "--dtype",
               args.dtype, "--layer", str(layer), "--alpha", str(args.alpha)]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}  # this checkout's steerlab
        proc = subprocess.run(cmd, env=env, text=True, capture_output=True)
        sys.stdout.write(proc.stdout)
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return {"error": "peer worker failed: " + " | ".join(tail)}
        return json.loads(out.read_text())


# -- report ------------------------------------------------------------------------------------
def _fmt_ratio(values: list[float]) -> str:
    s = _summary(values)
    if s["n"] == 0:
        return "–"
    lo, hi = s["ci95"]
    ci = "" if math.isnan(lo) else f" [{lo:.2f}, {hi:.2f}]"
    return f"{s['mean']:.2f}×{ci}"


def _table(results: dict[str, Any], batches: list[int]) -> list[str]:
    head = "| condition | " + " | ".join(
        f"batch {b}: tok/s (median) | batch {b}: ratio [95% CI]" for b in batches
    ) + f" | batch {batches[-1]}/batch {batches[0]} |"
    lines = [head, "|" + "---|" * (2 * len(batches) + 2)]
    for name, entry in results.items():
        if "error" in entry:
            lines.append(f"| {name} | failed: `{entry['error']}` |" + " |" * (2 * len(batches)))
            continue
        cells = []
        for b in batches:
            e = entry.get(str(b))
            if not e:
                cells += ["–", "–"]
                continue
            cells += [f"{statistics.median(e['tokens_per_s']):.1f}", _fmt_ratio(e["ratio"])]
        lo, hi = entry.get(str(batches[0])), entry.get(str(batches[-1]))
        scale = _fmt_ratio([h / low for h, low in zip(hi["tokens_per_s"], lo["tokens_per_s"],
                                                     strict=False)]) if lo and hi else "–"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {scale} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(PEER_SCRIPT_FLAG, action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--json-out", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--batches", default=None, help="e.g. 1,16 (CPU) or 1,32 (GPU)")
    parser.add_argument("--single-prompts", type=int, default=None,
                        help="prompts run one at a time for batch 1 (default 2 CPU, 4 GPU)")
    parser.add_argument("--dtype", default="float32", help="CPU dtype: float32 or bfloat16")
    parser.add_argument("--layer", type=int, default=None)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--peers-python", default=PEERS_PYTHON,
                        help="python of a venv with repeng and steering-vectors "
                        "(default: $STEERLAB_PEERS_PYTHON; without either, --no-peers)")
    parser.add_argument("--peer-rounds", type=int, default=None,
                        help="rounds for the peers' interpreter (default: --rounds)")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--write", default=None, help="update this BENCHMARKS.md section")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available() and not args.peer_worker
    args.batches = [int(b) for b in (args.batches or ("1,32" if gpu else "1,16")).split(",")]
    args.new_tokens = args.new_tokens or (64 if gpu else 12)
    args.single_prompts = args.single_prompts or (4 if gpu else 2)
    if args.peer_worker:
        args.layer = args.layer if args.layer is not None else 12
        _peer_worker(args)
        return

    lm = _gpu_model() if gpu else _cpu_model(args.dtype)
    prompts = _gpu_prompts() if gpu else PROMPTS
    layer = args.layer if args.layer is not None else lm.n_layers // 2
    machine = (f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}" if gpu else
               f"{platform.processor() or 'CPU'} ({os.cpu_count()} cores, shared), "
               f"torch {torch.__version__}")
    print(f"model {lm.name} ({lm.n_layers} layers, {lm.dtype}), machine {machine}", flush=True)
    work = Workload(args.new_tokens, args.single_prompts)
    conds = _conditions(lm, prompts, work, layer, args.alpha)
    t0 = time.perf_counter()
    results = _measure(conds, args.batches, args.rounds, "transformers generate (unhooked)", work)
    peers: dict[str, Any] = {}
    if not gpu and not args.no_peers:
        from steerlab.model.embedded import safetensors_dir

        print("peers (separate interpreter):", flush=True)
        peers = _run_peers(args, str(safetensors_dir()), layer)
    elapsed = time.perf_counter() - t0

    import transformers

    what = ("GPU: random-init Llama-3.1-8B-Instruct config, bfloat16" if gpu else
            "embedded Qwen2.5-Coder-0.5B-Instruct, " + str(lm.dtype).removeprefix("torch."))
    lines = [
        f"{what}; "
        f"{max(args.batches)} prompts at batch {max(args.batches)}, the first "
        f"{args.single_prompts} one at a time at batch 1, "
        f"greedy, {args.new_tokens} new tokens per row, steering at layer {layer} "
        f"(Add: α={args.alpha} × unit vector) or all layers (Ablate). Machine: {machine}, "
        f"transformers {transformers.__version__}. {elapsed / 60:.1f} min in all.",
        "",
        f"Ratios are to unhooked transformers `generate` in the same round (= 1.00): geometric "
        f"mean over n = {args.rounds} rounds with a 95% t-interval. "
        + ("The CPU is shared with other jobs, so absolute tok/s drift; interleaving rounds "
           "keeps the ratios fair, and the intervals show what drift remains." if not gpu
           else ""),
        "",
        *_table(results, args.batches),
    ]
    if peers:
        lines += ["", f"Peers (n = {args.peer_rounds or args.rounds} rounds), in their own "
                  "interpreter (" + (
            ", ".join(f"{k} {v}" for k, v in peers.get("versions", {}).items()) or "not run")
            + "); ratios to that interpreter's own unhooked `generate`:", ""]
        if "error" in peers:
            lines.append(f"Not run: {peers['error']}")
        else:
            lines += _table(peers["results"], args.batches)
    rerun = f"python benchmarks/generate.py --rounds {args.rounds} --peers-python PY"
    body = section("generate", WHAT, rerun, "\n".join(lines))
    print()
    print(body)
    if args.write:
        write_section("generate", body, Path(args.write))
        print(f"updated {args.write}")


if __name__ == "__main__":
    main()
