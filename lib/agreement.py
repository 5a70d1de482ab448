"""Annotator agreement on rankings: Kendall's W, Krippendorff's alpha (ordinal), Kendall's tau-b, Borda.

Ranks follow the convention "1 = best"; tied responses share the average of the places they occupy
(e.g. a tie for 2nd and 3rd gives both 2.5).

Library code where a library has the statistic: Krippendorff's alpha is the `krippendorff` package's, Kendall's
tau-b scipy's (`scipy.stats.kendalltau`). Kendall's W stays here: no maintained library computes it (scipy has
Friedman's test, whose tie-corrected statistic is W * m (n - 1), but only for 3 or more items, while most rankings
here are pairs); tests/lib/test_agreement.py checks it against scipy's Friedman statistic wherever that exists.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence

import krippendorff
import numpy as np
from scipy import stats


def tier_ranks(tiers: Sequence[Sequence[Hashable]]) -> dict[Hashable, float]:
    """Average ranks from tiers (best first): [["b"], ["a", "c"]] -> {b: 1, a: 2.5, c: 2.5}."""
    ranks, place = {}, 1
    for group in tiers:
        avg = place + (len(group) - 1) / 2
        for item in group:
            ranks[item] = avg
        place += len(group)
    return ranks


def kendalls_w(rankings: Sequence[dict[Hashable, float]]) -> float | None:
    """Kendall's coefficient of concordance W with the tie correction (Kendall & Babington Smith 1939).

        W = 12 S / ( m^2 (n^3 - n) - m * sum_j T_j ),   S = sum_i (R_i - m(n+1)/2)^2,
        T_j = sum over tie groups g of annotator j of (t_g^3 - t_g)

    m annotators rank the same n items; R_i is item i's rank sum. W = 1 is complete agreement, 0 none.
    Returns None when undefined (fewer than 2 annotators, fewer than 2 items, or every annotator ties all).
    """
    m = len(rankings)
    if m < 2:
        return None
    items = list(rankings[0])
    n = len(items)
    if n < 2 or any(set(r) != set(items) for r in rankings):
        return None
    sums = [sum(r[i] for r in rankings) for i in items]
    mean = m * (n + 1) / 2
    s = sum((x - mean) ** 2 for x in sums)
    ties = 0.0
    for r in rankings:
        for t in Counter(r.values()).values():
            ties += t**3 - t
    denom = m * m * (n**3 - n) - m * ties
    if denom <= 0:
        return None
    return 12 * s / denom


def krippendorff_alpha_ordinal(units: Sequence[Sequence[float]]) -> float | None:
    """Krippendorff's alpha with the ordinal metric (Krippendorff 2011, "Computing Krippendorff's Alpha"), by the
    `krippendorff` package from each unit's value counts.

    `units`: for each unit (here: one response of one prompt), the values the annotators gave it (here: its
    rank). Units with fewer than 2 values are not pairable and are ignored. Returns None when there is no pairable
    unit or no variation at all.
    """
    pairable = [list(u) for u in units if len(u) >= 2]
    values = sorted({v for u in pairable for v in u})
    if len(values) < 2:
        return None
    counts = np.array([[u.count(v) for v in values] for u in pairable], dtype=float)
    alpha = krippendorff.alpha(value_counts=counts, value_domain=values, level_of_measurement="ordinal")
    return float(alpha) if math.isfinite(alpha) else None


def kendall_tau_b(a: dict[Hashable, float], b: dict[Hashable, float]) -> float | None:
    """Kendall's tau-b between two rankings of the same items (ties handled; scipy's); None if either is all-tied."""
    items = [i for i in a if i in b]
    x, y = [a[i] for i in items], [b[i] for i in items]
    if len(items) < 2 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return float(stats.kendalltau(x, y, variant="b").statistic)


def borda_consensus(rankings: Sequence[dict[Hashable, float]]) -> list[list[Hashable]]:
    """Consensus tiers by mean average-rank (a Borda count); equal means stay tied. Ties in input are kept."""
    items = list(rankings[0])
    mean = {i: sum(r[i] for r in rankings) / len(rankings) for i in items}
    tiers: list[list[Hashable]] = []
    for i in sorted(items, key=lambda x: (mean[x], str(x))):
        if tiers and math.isclose(mean[tiers[-1][0]], mean[i], abs_tol=1e-9):
            tiers[-1].append(i)
        else:
            tiers.append([i])
    return tiers
