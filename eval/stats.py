"""The one bootstrap every gate uses, and the tests its intervals feed: library code (scipy, statsmodels).

Paired bootstrap (Efron & Tibshirani 1993, ch. 13; Koehn 2004 for its use in comparing two systems on one test
set): resample the evaluated items with replacement, B times, and recompute the statistic on each resample. The
candidate and the parent are resampled *together* (the same item indices), so the interval of their difference
reflects only how the models differ on items, not which items happened to be drawn. The percentile interval is the
(a, 1 - a) quantiles of the B values, a = (1 - confidence) / 2: `scipy.stats.bootstrap(method="percentile")` over
the item indices, so `stat` receives the resampled indices (an int array of length n) and returns one number, and
any statistic works: a ratio of token-weighted sums (perplexity), a difference of shares (stereotype preference), a
difference of BBQ bias scores. With the same seed it draws the same resamples as align's former hand-written loop,
so every interval is unchanged (tests/eval/test_stats.py).

The p-value of a change comes from its interval under the normal approximation (`scipy.stats.norm`), and several
p-values are corrected together by Holm's step-down procedure (`statsmodels.stats.multitest.multipletests`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from math import isfinite

import numpy as np
from scipy import stats


def bootstrap_interval(
    n: int, stat: Callable[[np.ndarray], float], samples: int, confidence: float, seed: int = 0
) -> tuple[float, float]:
    """Percentile interval of stat(idx) over `samples` resamples of range(n); (nan, nan) when n == 0, and the
    statistic itself at both ends when n == 1 (every resample is that one item)."""
    if n == 0:
        return float("nan"), float("nan")
    if n == 1:
        value = float(stat(np.zeros(1, dtype=int)))
        return value, value
    with warnings.catch_warnings():  # a constant or NaN statistic is a valid answer here, not a warning
        warnings.simplefilter("ignore")
        ci = stats.bootstrap(
            (np.arange(n),),
            lambda idx: float(stat(idx)),
            n_resamples=samples,
            vectorized=False,
            method="percentile",
            confidence_level=confidence,
            rng=np.random.default_rng(seed),
        ).confidence_interval
    return float(ci.low), float(ci.high)


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
    se = (hi - lo) / (2 * stats.norm.ppf((1 + confidence) / 2))
    if se <= 0:
        return 0.0 if delta > 0 else 1.0
    return float(stats.norm.sf(delta / se))


def holm(pvalues: list[float], alpha: float) -> list[bool]:
    """Holm's step-down procedure (Holm 1979): which of m hypotheses to reject so that the chance of rejecting any
    true one stays below alpha (family-wise). The i-th smallest p (i = 0..m-1) is compared with alpha / (m - i),
    stopping at the first that is not below. A NaN p-value is rejected (fail closed): it counts as 0."""
    if not pvalues:
        return []
    from statsmodels.stats.multitest import (
        multipletests,  # statsmodels: 1 s to import, only when a gate decides
    )

    p = np.nan_to_num(np.asarray(pvalues, dtype=float), nan=0.0)
    return [bool(r) for r in multipletests(p, alpha=alpha, method="holm")[0]]
