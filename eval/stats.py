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
