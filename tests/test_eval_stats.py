"""Intervals and tests checked against published / independently computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from steerlab.errors import EvaluationError
from steerlab.evaluate.stats import (
    bootstrap_ci,
    cohens_kappa,
    mcnemar,
    mcnemar_table,
    mean_summary,
    paired_bootstrap,
    rate_summary,
    wilson_ci,
)


@pytest.mark.parametrize(("k", "n", "lo", "hi"), [
    # Wilson 95% intervals as tabulated by Newcombe (1998) / any Wilson calculator.
    (0, 10, 0.0, 0.2775),
    (5, 10, 0.2366, 0.7634),
    (10, 10, 0.7225, 1.0),
    (1, 10, 0.0179, 0.4042),
    (81, 263, 0.2553, 0.3662),   # Newcombe 1998, example (c)
])
def test_wilson_known_values(k, n, lo, hi):
    got = wilson_ci(k, n)
    assert got[0] == pytest.approx(lo, abs=1e-4)
    assert got[1] == pytest.approx(hi, abs=1e-4)


def test_wilson_edges():
    assert wilson_ci(0, 0) == (0.0, 1.0)
    with pytest.raises(EvaluationError):
        wilson_ci(3, 2)


def test_mcnemar_exact_known_tables():
    # b=8 discordant one way, c=1 the other: p = 2 * (1 + 9) / 2**9 = 0.0390625
    a = [True] * 8 + [False] * 1 + [True] * 5 + [False] * 6
    b = [False] * 8 + [True] * 1 + [True] * 5 + [False] * 6
    assert mcnemar_table(a, b) == {"both": 5, "only_a": 8, "only_b": 1, "neither": 6}
    assert mcnemar(a, b) == pytest.approx(0.0390625)
    assert mcnemar(b, a) == pytest.approx(0.0390625)  # symmetric
    # no discordant pairs: no evidence of a difference
    assert mcnemar([True, False], [True, False]) == 1.0
    # 0 vs 6 discordant: 2 / 2**6
    assert mcnemar([True] * 6, [False] * 6) == pytest.approx(2 / 64)


def test_mcnemar_matches_scipy_binomtest():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    for _ in range(20):
        a = rng.random(30) < 0.6
        b = rng.random(30) < 0.4
        t = mcnemar_table(list(a), list(b))
        expected = scipy_stats.binomtest(t["only_a"], t["only_a"] + t["only_b"], 0.5).pvalue \
            if t["only_a"] + t["only_b"] else 1.0
        assert mcnemar(list(a), list(b)) == pytest.approx(expected)


def test_mcnemar_length_mismatch():
    with pytest.raises(EvaluationError, match="equal lengths"):
        mcnemar([True], [True, False])


def test_cohens_kappa_known_value_and_sklearn():
    # Wikipedia's worked example: 20 yes/yes, 5 yes/no, 10 no/yes, 15 no/no -> kappa 0.4
    a = ["y"] * 20 + ["y"] * 5 + ["n"] * 10 + ["n"] * 15
    b = ["y"] * 20 + ["n"] * 5 + ["y"] * 10 + ["n"] * 15
    assert cohens_kappa(a, b) == pytest.approx(0.4)
    from sklearn.metrics import cohen_kappa_score

    rng = np.random.default_rng(0)
    x = list(rng.integers(0, 3, 40))
    y = list(rng.integers(0, 3, 40))
    assert cohens_kappa(x, y) == pytest.approx(cohen_kappa_score(x, y))
    assert cohens_kappa([1, 0, 1], [1, 0, 1]) == pytest.approx(1.0)
    assert math.isnan(cohens_kappa([1, 1], [1, 1]))


def test_bootstrap_is_seeded_and_covers_the_mean():
    values = [0.0, 0.5, 1.0, 1.0, 0.5, 0.0, 1.0, 1.0]
    a = bootstrap_ci(values, seed=3)
    assert a == bootstrap_ci(values, seed=3)
    cont = list(np.random.default_rng(0).random(15))
    assert bootstrap_ci(cont, seed=3, n_boot=500) != bootstrap_ci(cont, seed=4, n_boot=500)
    assert a[0] < np.mean(values) < a[1]
    lo, hi = bootstrap_ci(values, stat=np.median, seed=0)
    assert 0.0 <= lo <= hi <= 1.0
    # a large normal sample: the bootstrap CI of the mean ~ mean ± 1.96 sd/sqrt(n)
    big = np.random.default_rng(0).normal(0, 1, 2000)
    lo, hi = bootstrap_ci(big, seed=0, n_boot=4000)
    half = 1.96 * big.std(ddof=1) / math.sqrt(big.size)
    assert lo == pytest.approx(big.mean() - half, abs=0.01)
    assert hi == pytest.approx(big.mean() + half, abs=0.01)


def test_paired_bootstrap():
    a = [0.0, 0.0, 0.5, 0.0, 1.0, 0.0, 0.0, 0.5, 0.0, 0.0]
    b = [1.0, 1.0, 1.0, 0.5, 1.0, 1.0, 0.5, 1.0, 1.0, 1.0]
    res = paired_bootstrap(a, b, seed=0)
    assert res["n"] == 10
    assert res["mean_diff"] == pytest.approx(np.mean(b) - np.mean(a))
    assert 0 < res["ci95"][0] < res["mean_diff"] < res["ci95"][1]
    assert res["p"] < 0.01
    same = paired_bootstrap(a, a)
    assert same["p"] == 1.0 and same["mean_diff"] == 0.0
    noisy = paired_bootstrap([0, 1, 0, 1], [1, 0, 1, 0], seed=0)
    assert noisy["p"] > 0.5


def test_rate_summary_and_missing():
    s = rate_summary([True, False, True, True, None])
    assert s["n"] == 4 and s["k"] == 3 and s["rate"] == 0.75 and s["missing"] == 1
    assert s["ci95"] == pytest.approx(list(wilson_ci(3, 4)))
    empty = rate_summary([])
    assert empty["rate"] is None and empty["ci95"] == [0.0, 1.0]
    m = mean_summary([1.0, 0.5, None, 0.0])
    assert m["n"] == 3 and m["mean"] == pytest.approx(0.5) and m["missing"] == 1
    assert m["ci95"][0] <= 0.5 <= m["ci95"][1]


def test_holm_matches_hand_computed_adjustment():
    from steerlab.evaluate.stats import holm

    # sorted 0.01, 0.03, 0.04 -> 3*0.01, max(.03, 2*0.03), max(.06, 1*0.04)
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == [1.0, 1.0]  # capped at 1, monotone
    assert holm([0.2]) == [0.2] and holm([]) == []


def test_restored_share_is_the_undone_part_of_the_drop_with_a_paired_interval() -> None:
    from steerlab.evaluate.stats import restored_share

    n = 40
    base = [True] * 30 + [False] * 10  # 75%
    steered = [True] * 10 + [False] * 30  # 25%
    restored = [True] * 20 + [False] * 20  # 50%: half the drop undone
    out = restored_share(base, steered, restored, seed=1)
    assert out["n"] == n and out["share"] == pytest.approx(0.5)
    lo, hi = out["ci95"]
    assert 0.1 < lo < 0.5 < hi < 0.9
    assert restored_share(base, steered, base)["share"] == pytest.approx(1.0)
    assert restored_share(base, steered, steered)["share"] == pytest.approx(0.0)
    assert restored_share(base, base, restored)["share"] is None  # no drop to restore
    with pytest.raises(EvaluationError, match="aligned"):
        restored_share(base, steered[:-1], restored)
