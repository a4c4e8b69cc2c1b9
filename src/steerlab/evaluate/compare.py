"""Capability check for an edited model: what the edit bought and what it cost.

``compare_models({"original": ..., "edited α=1": ..., ...})`` evaluates each
model in turn (only one is in memory at a time) on the same prompts:

- refusal rate on harmful prompts (substring scorer), and outcomes;
- over-refusal on harmless prompts;
- KL(original ‖ model) of next-token distributions on the harmless prompts:
  at the first response token, and averaged over the first ``kl_tokens``
  tokens of the original's greedy response (teacher-forced, stopping at its EOS);
- capability-set accuracy (greedy, graded by steerlab.evaluate.capability);
- perplexity of the capability set's questions with their reference answers,
  rendered through the chat template as one text (every token counts,
  template included), token-weighted: a relative measure, compare columns.

Every rate has n and a 95% Wilson interval, every mean a seeded bootstrap
interval, and every model after the first a paired test against the first
(McNemar for rates, paired bootstrap for NLL). Rows (one per model × prompt)
go to ``rows.jsonl``; ``comparison.json`` and ``comparison.md`` hold the table.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from steerlab.errors import EvaluationError
from steerlab.evaluate.backends import InProcessBackend
from steerlab.evaluate.capability import capability_accuracy, capability_items
from steerlab.evaluate.kl import kl_from_logprobs, step_logprobs, steps_until_eos
from steerlab.evaluate.outcome import outcome
from steerlab.evaluate.perplexity import nll_report
from steerlab.evaluate.refusal import is_refusal
from steerlab.evaluate.stats import mcnemar, mean_summary, paired_bootstrap, rate_summary
from steerlab.generation.generate import eos_ids
from steerlab.prompts.chat import render
from steerlab.prompts.sets import load_prompts
from steerlab.store.atomic import write_json, write_text
from steerlab.store.outputs import output_dir
from steerlab.store.rowstore import RowStore, dict_codec
from steerlab.weights.export.lora import load_edited

if TYPE_CHECKING:
    from steerlab.model.loading import LoadedModel


ROW_CODEC = dict_codec("model", "set", "id")


@dataclass(frozen=True)
class CompareConfig:
    """What to measure and on how many prompts (defaults run in minutes on a CPU)."""

    harmful: str = "paired:harmful"
    harmless: str = "harmless"
    split: str | None = "test"
    limit: int | None = 32
    capability_limit: int | None = 40
    max_new_tokens: int = 48
    kl_tokens: int = 4
    batch_size: int = 8
    seed: int = 0


@dataclass
class _Reference:
    """The first model's harmless-prompt log-probs and greedy tokens (for KL)."""

    logprobs: list[torch.Tensor]  # per batch [B, k, V] float32, CPU
    tokens: list[torch.Tensor]  # per batch [B, k]


def compare_prompts(cfg: CompareConfig) -> dict[str, list[Any]]:
    """The harmful, harmless and capability items every model of a comparison answers."""
    return {
        "harmful": list(load_prompts(cfg.harmful, split=cfg.split, limit=cfg.limit)),
        "harmless": list(load_prompts(cfg.harmless, split=cfg.split, limit=cfg.limit)),
        "capability": capability_items(cfg.capability_limit),
    }


def evaluate_model(
    lm: LoadedModel,
    cfg: CompareConfig,
    prompts: dict[str, list[Any]],
    reference: _Reference | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]], _Reference]:
    """All measures for one model. Returns (measures, rows, this model's KL reference)."""
    backend = InProcessBackend(lm, (), max_new_tokens=cfg.max_new_tokens,
                               batch_size=cfg.batch_size)
    rows: list[dict[str, Any]] = []
    flags: dict[str, list[bool]] = {}
    for name in ("harmful", "harmless"):
        items = prompts[name]
        texts = [""] * len(items)
        for comp in backend.stream([p.prompt for p in items]):
            texts[comp.index] = comp.response
        flags[name] = [is_refusal(t) for t in texts]
        for p, text, refused in zip(items, texts, flags[name], strict=True):
            rows.append({"set": name, "id": p.id, "prompt": p.prompt, "response": text,
                         "refusal": refused, "outcome": outcome(text)})
    cap = capability_accuracy(lm, (), cfg.capability_limit, batch_size=cfg.batch_size)
    for item in cap["items"]:
        rows.append({"set": "capability", **item})
    answers = [render(lm.tokenizer, p.prompt) + str(p.extra.get("answer", ""))
               for p in prompts["capability"]]
    nll = nll_report(lm, answers, batch_size=cfg.batch_size)
    text_nll = [t["nll"] for t in nll["per_text"]]
    harmless = [p.prompt for p in prompts["harmless"]]
    mine = _Reference([], [])
    eos = eos_ids(lm)
    kl_first: list[float] = []
    kl_mean: list[float] = []
    for i, start in enumerate(range(0, len(harmless), cfg.batch_size)):
        chunk = harmless[start : start + cfg.batch_size]
        forced = reference.tokens[i] if reference is not None else None
        lp, toks = step_logprobs(lm, chunk, None, cfg.kl_tokens, forced)
        mine.logprobs.append(lp)
        mine.tokens.append(toks)
        base = reference.logprobs[i] if reference is not None else lp
        kl = kl_from_logprobs(base, lp)  # [B, k]
        fed = forced if forced is not None else toks
        kl_first += kl[:, 0].tolist()
        kl_mean += [float(row[: steps_until_eos(t, eos)].mean()) for row, t in zip(kl, fed,
                                                                                 strict=True)]
    measures = {
        "refusal_harmful": rate_summary(flags["harmful"]),
        "over_refusal_harmless": rate_summary(flags["harmless"]),
        "kl_first_token": mean_summary(kl_first, seed=cfg.seed),
        f"kl_mean_first_{cfg.kl_tokens}": mean_summary(kl_mean, seed=cfg.seed),
        "capability_accuracy": {"n": cap["n"], "k": cap["k"], "rate": cap["accuracy"],
                                "ci95": cap["ci95"]},
        "perplexity": {"n": nll["n_texts"], "n_tokens": nll["n_tokens"],
                       "value": nll["perplexity"],
                       "ci95": _perplexity_interval(nll["per_text"], cfg.seed)},
        "_paired": {"harmful": flags["harmful"], "harmless": flags["harmless"],
                    "capability": [bool(r["correct"]) for r in cap["items"]], "nll": text_nll},
    }
    return measures, rows, mine


def _perplexity_interval(per_text: list[dict[str, float]], seed: int,
                         n_boot: int = 10_000) -> list[float]:
    """95% bootstrap interval (texts resampled) of the token-weighted perplexity."""
    tokens = np.array([t["tokens"] for t in per_text], dtype=float)
    total = np.array([t["nll"] * t["tokens"] for t in per_text], dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(per_text), size=(n_boot, len(per_text)))
    ppl = np.exp(total[idx].sum(1) / tokens[idx].sum(1))
    lo, hi = np.quantile(ppl, [0.025, 0.975])
    return [float(lo), float(hi)]


def _resolve(source: Any, dtype: str, base: str | None) -> LoadedModel:
    if isinstance(source, str):
        return load_edited(source, dtype=dtype, base=base)
    if callable(source):
        return source()  # type: ignore[no-any-return]
    return source  # type: ignore[no-any-return]


def compare_models(models: Mapping[str, Any], cfg: CompareConfig | None = None, *,
                   out_dir: str | Path | None = None, dtype: str = "auto",
                   on_model: Callable[[str], None] | None = None,
                   overwrite: bool = False) -> dict[str, Any]:
    """Evaluate each model (a LoadedModel, a spec, or a zero-argument loader) side by side.

    The first model is the baseline for KL and the paired tests. Models given
    as specs or loaders are loaded one at a time and freed after use; a spec
    that is a LoRA adapter folder is merged into the first model's spec. A non-empty
    ``out_dir`` is written over only with ``overwrite``.

    Example:
        >>> compare_models({"original": "default", "α=1": "out/lora-a1"})   # doctest: +SKIP
    """
    cfg = cfg or CompareConfig()
    if len(models) < 2:
        raise EvaluationError("compare needs the original model and at least one edited model.")
    out = None if out_dir is None else output_dir(out_dir, overwrite=overwrite)
    prompts = compare_prompts(cfg)
    results: dict[str, Any] = {}
    reference: _Reference | None = None
    all_rows: list[dict[str, Any]] = []
    info: dict[str, Any] = {}
    first = next(iter(models.values()))
    base = first if isinstance(first, str) else None
    for name, source in models.items():
        if on_model:
            on_model(name)
        lm = _resolve(source, dtype, base)
        try:
            measures, rows, mine = evaluate_model(lm, cfg, prompts, reference)
            info[name] = {"spec": lm.spec, "fingerprint": lm.fingerprint,
                          "dtype": str(lm.dtype).removeprefix("torch.")}
        finally:
            del lm  # models we loaded are freed before the next one loads
            gc.collect()
        if reference is None:
            reference = mine
        results[name] = measures
        all_rows += [{"model": name, **r} for r in rows]
    baseline = next(iter(results))
    add_paired_tests(results, baseline, cfg.seed)
    comparison = {"config": asdict(cfg), "baseline": baseline, "models": info,
                  "results": results}
    if out is not None:
        write_outputs(out, comparison, all_rows)
    return comparison


def add_paired_tests(results: dict[str, Any], baseline: str, seed: int) -> None:
    """Give every result but ``baseline``'s its ``vs_baseline`` tests: paired p-values
    (McNemar) and the NLL difference (bootstrap), all measured on the same items; then drop
    the per-item outcomes (``_paired``) the tests were computed from."""
    base = results[baseline]["_paired"]
    for name, measures in results.items():
        this = measures["_paired"]
        if name != baseline:
            measures["vs_baseline"] = {
                "refusal_harmful_p": mcnemar(base["harmful"], this["harmful"]),
                "over_refusal_p": mcnemar(base["harmless"], this["harmless"]),
                "capability_p": mcnemar(base["capability"], this["capability"]),
                "nll_diff": paired_bootstrap(base["nll"], this["nll"], seed=seed),
            }
    for measures in results.values():
        measures.pop("_paired")


def write_outputs(out: Path, comparison: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """``comparison.json``, ``comparison.md`` and ``rows.jsonl`` (the row store's layout,
    its identity the config and the models), each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "comparison.json", comparison)
    write_text(out / "comparison.md", comparison_markdown(comparison))
    identity = {"config": comparison["config"], "models": comparison["models"]}
    RowStore(out / "rows.jsonl", "compare", identity, ROW_CODEC, overwrite=True).replace(rows)


def _cell(s: dict[str, Any], key: str = "rate", digits: int = 3) -> str:
    value = s.get(key) if key in s else s.get("mean")
    if value is None:
        return "n/a"
    ci = s.get("ci95")
    interval = f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else ""
    count = f" k={s['k']}/{s['n']}" if "k" in s else f" n={s['n']}"
    return f"{value:.{digits}f}{interval}{count}"


def comparison_markdown(comparison: dict[str, Any]) -> str:
    """The side-by-side table: one column per model, one row per measure."""
    results = comparison["results"]
    names = list(results)
    cfg = comparison["config"]
    kl_key = f"kl_mean_first_{cfg['kl_tokens']}"
    measures = [
        ("refusal rate, harmful ↓", "refusal_harmful", "rate", 3),
        ("over-refusal, harmless ↓", "over_refusal_harmless", "rate", 3),
        ("KL first token (nats) ↓", "kl_first_token", "mean", 4),
        (f"KL mean first {cfg['kl_tokens']} tokens ↓", kl_key, "mean", 4),
        ("capability accuracy ↑", "capability_accuracy", "rate", 3),
        ("perplexity, capability Q+A chat text ↓", "perplexity", "value", 2),
    ]
    lines = [
        f"# steerlab compare (baseline: {comparison['baseline']})", "",
        f"Harmful: `{cfg['harmful']}`, harmless: `{cfg['harmless']}` (split {cfg['split']}, "
        f"limit {cfg['limit']}); capability limit {cfg['capability_limit']}; greedy, "
        f"{cfg['max_new_tokens']} new tokens. Cells: value [95% interval] and n "
        "(Wilson for rates, bootstrap for means).", "",
        "| measure | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for label, key, field, digits in measures:
        lines.append(f"| {label} | " + " | ".join(_cell(results[n][key], field, digits)
                                                   for n in names) + " |")
    paired = [n for n in names if "vs_baseline" in results[n]]
    if paired:
        lines += ["", "Paired tests against the baseline (same prompts):", "",
                  "| model | refusal McNemar p | over-refusal p | capability p | "
                  "NLL diff [95% CI] |", "|---|---|---|---|---|"]
        for n in paired:
            v = results[n]["vs_baseline"]
            d = v["nll_diff"]
            lines.append(
                f"| {n} | {v['refusal_harmful_p']:.3g} | {v['over_refusal_p']:.3g} | "
                f"{v['capability_p']:.3g} | {d['mean_diff']:+.4f} "
                f"[{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}] |"
            )
    return "\n".join(lines) + "\n"


__all__ = ["CompareConfig", "compare_models", "comparison_markdown", "evaluate_model"]
