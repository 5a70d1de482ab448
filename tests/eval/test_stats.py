"""eval/stats.py is library code (scipy's bootstrap and normal law, statsmodels' Holm): each swap gives the numbers
align's former hand-written code gave on the same inputs (that code is kept here, as the reference)."""

from __future__ import annotations

from math import erfc, sqrt
from statistics import NormalDist

import numpy as np
import pytest

from eval.stats import bootstrap_interval, holm, one_sided_p, paired_diff_interval


def former_bootstrap(n, stat, samples, confidence, seed=0):
    rng = np.random.default_rng(seed)
    values = np.array([stat(rng.integers(0, n, size=n)) for _ in range(samples)], dtype=float)
    a = (1 - confidence) / 2
    return float(np.quantile(values, a)), float(np.quantile(values, 1 - a))


def former_one_sided_p(delta, interval, confidence):
    se = (interval[1] - interval[0]) / (2 * NormalDist().inv_cdf((1 + confidence) / 2))
    return 0.5 * erfc(delta / se / sqrt(2))


def former_holm(pvalues, alpha):
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: -1.0 if pvalues[i] != pvalues[i] else pvalues[i])
    reject = [False] * m
    for rank, i in enumerate(order):
        p = pvalues[i]
        if p != p or p <= alpha / (m - rank):
            reject[i] = True
        else:
            break
    return reject


@pytest.mark.parametrize("n,confidence,seed", [(2, 0.95, 0), (37, 0.9, 3), (400, 0.95, 11)])
def test_bootstrap_equals_the_former_loop(n, confidence, seed):
    rng = np.random.default_rng(n)
    x, w = rng.normal(size=n), rng.integers(1, 30, size=n)

    def ratio(i):  # a token-weighted ratio, as perplexity's
        return float(np.exp(np.sum(x[i] * w[i]) / np.sum(w[i])))

    got = bootstrap_interval(n, ratio, 500, confidence, seed)
    assert got == pytest.approx(former_bootstrap(n, ratio, 500, confidence, seed), rel=1e-12)
    cand, par = x + 0.3, x
    diff = paired_diff_interval(cand, par, np.mean, 300, confidence, seed)
    want = former_bootstrap(n, lambda i: np.mean(cand[i]) - np.mean(par[i]), 300, confidence, seed)
    assert diff == pytest.approx(want, rel=1e-12)


def test_bootstrap_edges():
    assert all(np.isnan(bootstrap_interval(0, np.mean, 100, 0.95)))
    assert bootstrap_interval(1, lambda i: 2.5 + i.sum(), 100, 0.95) == (2.5, 2.5)  # the one item, both ends
    assert bootstrap_interval(5, lambda i: 1.0, 100, 0.95) == (1.0, 1.0)
    assert all(
        np.isnan(bootstrap_interval(5, lambda i: float("nan"), 100, 0.95))
    )  # NaN stays NaN (fails closed)


def test_p_and_holm_equal_the_former_code():
    rng = np.random.default_rng(0)
    for _ in range(200):
        delta, lo = rng.normal(), rng.normal()
        interval = (lo, lo + rng.uniform(0.01, 3))
        assert one_sided_p(delta, interval, 0.95) == pytest.approx(
            former_one_sided_p(delta, interval, 0.95), abs=1e-12
        )
        ps = list(rng.uniform(0, 0.1, size=int(rng.integers(1, 8))))
        if rng.uniform() < 0.3:
            ps[int(rng.integers(len(ps)))] = float("nan")
        assert holm(ps, 0.05) == former_holm(ps, 0.05)
    assert holm([], 0.05) == []
