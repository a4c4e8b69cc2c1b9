"""Statistics every reported number needs: intervals, paired tests, agreement.

All functions are plain Python/numpy, deterministic (bootstraps take a seed),
and accept ``None`` entries as missing where noted (missing values are dropped
and counted, never treated as 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np

from steerlab.errors import EvaluationError

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_ci(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes in ``n`` trials.

    Good at small n and at 0 or n successes, where the normal interval fails.
    With ``n == 0`` there is no information: ``(0.0, 1.0)``.

    Example:
        >>> [round(x, 4) for x in wilson_ci(5, 10)]
        [0.2366, 0.7634]
    """
    if n < 0 or k < 0 or k > n:
        raise EvaluationError(f"wilson_ci needs 0 <= k <= n, got k={k}, n={n}.")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    # Exact ends: with k == 0 or k == n the interval touches the boundary.
    return (0.0 if k == 0 else lo), (1.0 if k == n else hi)


def bootstrap_ci(values: Sequence[float], *, stat: Callable[[np.ndarray], float] | None = None,
                 n_boot: int = 10_000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat`` (default: the mean), seeded."""
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        raise EvaluationError("bootstrap_ci got no values; an interval needs at least one.")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, arr.size, size=(n_boot, arr.size))
    samples = arr[idx]
    boots = samples.mean(axis=1) if stat is None else np.apply_along_axis(stat, 1, samples)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(boots, [alpha, 1 - alpha])
    return float(lo), float(hi)


def _binom_two_sided(k: int, n: int) -> float:
    """Exact two-sided binomial p at p=0.5 (doubling the smaller tail)."""
    if n == 0:
        return 1.0
    k = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def mcnemar_table(a: Sequence[bool], b: Sequence[bool]) -> dict[str, int]:
    """Counts of the paired 2x2 table: ``both``, ``only_a``, ``only_b``, ``neither``."""
    if len(a) != len(b):
        raise EvaluationError(f"Paired test needs equal lengths, got {len(a)} and {len(b)}.")
    pairs = list(zip((bool(x) for x in a), (bool(y) for y in b), strict=True))
    return {
        "both": sum(x and y for x, y in pairs),
        "only_a": sum(x and not y for x, y in pairs),
        "only_b": sum(y and not x for x, y in pairs),
        "neither": sum(not x and not y for x, y in pairs),
    }


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Exact McNemar p-value for paired booleans (same prompts, two conditions).

    Only discordant pairs matter: under H0 each is equally likely to favour
    either condition, so the count is Binomial(b + c, 1/2).

    Example:
        >>> mcnemar([True] * 8 + [False], [False] * 8 + [True])  # b=8, c=1
        0.0390625
    """
    table = mcnemar_table(a, b)
    return _binom_two_sided(table["only_a"], table["only_a"] + table["only_b"])


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in input order.

    For a family of tests read together (every re-add layer of a window, say):
    an adjusted p < 0.05 keeps the family-wise error rate at 5% without picking
    the best test first.

    Example:
        >>> holm([0.01, 0.04, 0.03])
        [0.03, 0.06, 0.06]
    """
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, n_boot: int = 10_000,
                     seed: int = 0) -> dict[str, Any]:
    """Paired bootstrap of ``mean(b) - mean(a)``: interval and two-sided p-value.

    Pairs are resampled together, so prompt difficulty cancels. The p-value is
    twice the smaller share of bootstrap differences on either side of 0.
    """
    if len(a) != len(b):
        raise EvaluationError(f"Paired test needs equal lengths, got {len(a)} and {len(b)}.")
    if not a:
        raise EvaluationError("paired_bootstrap got no pairs.")
    diff = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    rng = np.random.default_rng(seed)
    boots = diff[rng.integers(0, diff.size, size=(n_boot, diff.size))].mean(axis=1)
    lo, hi = np.quantile(boots, [0.025, 0.975])
    if np.all(diff == 0):
        p = 1.0
    else:
        p = float(min(1.0, 2 * min((boots <= 0).mean(), (boots >= 0).mean())))
    return {"n": int(diff.size), "mean_diff": float(diff.mean()), "ci95": [float(lo), float(hi)],
            "p": p}


def restored_share(base: Sequence[bool], steered: Sequence[bool], restored: Sequence[bool], *,
                   n_boot: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """How much of an intervention's effect a second one undoes, on the same prompts.

    ``(rate(restored) - rate(steered)) / (rate(base) - rate(steered))``: 1 means back
    at the base rate, 0 no restoration. The percentile interval resamples prompts
    (all three flags together); resamples where steering moved nothing are dropped
    and counted. ``share`` is ``None`` when the observed effect is zero.
    """
    if not len(base) == len(steered) == len(restored):
        raise EvaluationError(f"restored_share needs three aligned flag lists; got lengths "
                              f"{len(base)}, {len(steered)} and {len(restored)}.")
    if not base:
        raise EvaluationError("restored_share got no prompts.")
    flags = np.asarray([base, steered, restored], dtype=float)  # [3, n]
    rates = flags.mean(axis=1)
    gap = rates[0] - rates[1]
    out: dict[str, Any] = {"n": len(base), "share": None, "ci95": None, "dropped_resamples": 0}
    if gap == 0:
        return out
    out["share"] = float((rates[2] - rates[1]) / gap)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, flags.shape[1], size=(n_boot, flags.shape[1]))
    boot = flags[:, idx].mean(axis=2)  # [3, n_boot]
    boot_gap = boot[0] - boot[1]
    keep = np.sign(boot_gap) == np.sign(gap)
    out["dropped_resamples"] = int((~keep).sum())
    if keep.any():
        shares = (boot[2, keep] - boot[1, keep]) / boot_gap[keep]
        lo, hi = np.quantile(shares, [0.025, 0.975])
        out["ci95"] = [float(lo), float(hi)]
    return out


def cohens_kappa(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    """Cohen's kappa between two raters' labels on the same items.

    1 = perfect agreement, 0 = chance level. When both raters use one single
    label on every item agreement is perfect but kappa is undefined: returns
    ``nan``.
    """
    if len(a) != len(b):
        raise EvaluationError(f"Kappa needs equal lengths, got {len(a)} and {len(b)}.")
    n = len(a)
    if n == 0:
        return math.nan
    labels = set(a) | set(b)
    observed = sum(x == y for x, y in zip(a, b, strict=True)) / n
    expected = sum((list(a).count(lab) / n) * (list(b).count(lab) / n) for lab in labels)
    if expected >= 1.0:
        return math.nan
    return (observed - expected) / (1 - expected)


def rate_summary(flags: Sequence[bool | None]) -> dict[str, Any]:
    """``{"n", "k", "rate", "ci95": [lo, hi]}`` with a Wilson interval.

    ``None`` entries are missing: excluded from n and reported as ``missing``
    when there are any.
    """
    present = [bool(f) for f in flags if f is not None]
    n, k = len(present), sum(present)
    lo, hi = wilson_ci(k, n)
    out: dict[str, Any] = {"n": n, "k": k, "rate": (k / n) if n else None, "ci95": [lo, hi]}
    if len(present) != len(flags):
        out["missing"] = len(flags) - len(present)
    return out


def mean_summary(values: Sequence[float | None], *, seed: int = 0,
                 n_boot: int = 10_000) -> dict[str, Any]:
    """``{"n", "mean", "ci95"}`` with a seeded bootstrap interval; ``None`` = missing."""
    present = [float(v) for v in values if v is not None]
    out: dict[str, Any] = {"n": len(present), "mean": None, "ci95": None}
    if present:
        out["mean"] = float(np.mean(present))
        out["ci95"] = list(bootstrap_ci(present, seed=seed, n_boot=n_boot))
    if len(present) != len(values):
        out["missing"] = len(values) - len(present)
    return out
