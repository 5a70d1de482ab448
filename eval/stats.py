"""The one bootstrap every gate uses.

Paired bootstrap (Efron & Tibshirani 1993, ch. 13; Koehn 2004 for its use in comparing two systems on one test
set): resample the evaluated items with replacement, B times, and recompute the statistic on each resample. The
candidate and the parent are resampled *together* (the same item indices), so the interval of their difference
reflects only how the models differ on items, not which items happened to be drawn. The percentile interval is the
(a, 1 - a) quantiles of the B values, a = (1 - confidence) / 2.

`stat` receives the resampled indices (an int array of length n) and returns one number, so any statistic works:
a ratio of token-weighted sums (perplexity), a difference of shares (stereotype preference), a difference of
BBQ bias scores.
"""

from __future__ import annotations

from collections.abc import Callable
from math import erfc, isfinite, sqrt
from statistics import NormalDist

import numpy as np


def bootstrap_interval(
    n: int, stat: Callable[[np.ndarray], float], samples: int, confidence: float, seed: int = 0
) -> tuple[float, float]:
    """Percentile interval of stat(idx) over `samples` resamples of range(n); (nan, nan) when n == 0."""
    if n == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    values = np.array([stat(rng.integers(0, n, size=n)) for _ in range(samples)], dtype=float)
    a = (1 - confidence) / 2
    return float(np.quantile(values, a)), float(np.quantile(values, 1 - a))


def paired_diff_interval(
    cand: np.ndarray,
    par: np.ndarray,
    stat: Callable[[np.ndarray], float],
    samples: int,
    confidence: float,
    seed: int = 0,
) -> tuple[float, float]:
    """Interval of stat(cand) - stat(par), items resampled jointly for both models."""
    cand, par = np.asarray(cand), np.asarray(par)
    return bootstrap_interval(len(cand), lambda i: stat(cand[i]) - stat(par[i]), samples, confidence, seed)


def one_sided_p(delta: float, interval: tuple[float, float], confidence: float) -> float:
    """p-value of "the change is above 0", from a change and its two-sided percentile interval (normal
    approximation: SE = interval width / (2 z)). NaN in, NaN out; a change with a zero-width interval is 0 (certain)
    when positive, else 1."""
    lo, hi = interval
    if not (isfinite(delta) and isfinite(lo) and isfinite(hi)):
        return float("nan")
    se = (hi - lo) / (2 * NormalDist().inv_cdf((1 + confidence) / 2))
    if se <= 0:
        return 0.0 if delta > 0 else 1.0
    return 0.5 * erfc(delta / se / sqrt(2))


def holm(pvalues: list[float], alpha: float) -> list[bool]:
    """Holm's step-down procedure (Holm 1979): which of m hypotheses to reject so that the chance of rejecting any
    true one stays below alpha (family-wise). The i-th smallest p (i = 0..m-1) is compared with alpha / (m - i),
    stopping at the first that is not below. A NaN p-value is rejected (fail closed)."""
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
