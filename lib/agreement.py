"""Annotator agreement on rankings: Kendall's W, Krippendorff's alpha (ordinal), Kendall's tau-b, Borda.

Ranks follow the convention "1 = best"; tied responses share the average of the places they occupy
(e.g. a tie for 2nd and 3rd gives both 2.5).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Hashable, Sequence


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
    """Krippendorff's alpha with the ordinal metric (Krippendorff 2011, "Computing Krippendorff's Alpha").

    `units`: for each unit (here: one response of one prompt), the values the annotators gave it (here: its
    rank). Units with fewer than 2 values are not pairable and are ignored.

        o_ck  = sum_u (number of c-k pairs in u) / (m_u - 1)          coincidences
        n_c   = sum_k o_ck,  n = sum_c n_c
        d_ck  = ( sum_{g=c..k} n_g - (n_c + n_k)/2 )^2                 ordinal distance (c <= k)
        alpha = 1 - (n - 1) * sum o_ck d_ck / sum_{c,k} n_c n_k d_ck

    Returns None when there is no pairable unit or no variation at all.
    """
    coinc: dict[tuple[float, float], float] = defaultdict(float)
    for vals in units:
        m = len(vals)
        if m < 2:
            continue
        counts = Counter(vals)
        for c, nc in counts.items():
            for k, nk in counts.items():
                pairs = nc * (nk - (1 if c == k else 0))
                if pairs:
                    coinc[(c, k)] += pairs / (m - 1)
    if not coinc:
        return None
    values = sorted({c for c, _ in coinc})
    n_c = {c: sum(v for (a, _), v in coinc.items() if a == c) for c in values}
    n = sum(n_c.values())
    if len(values) < 2 or n <= 1:
        return None
    pos = {c: i for i, c in enumerate(values)}
    cum = [0.0]
    for c in values:
        cum.append(cum[-1] + n_c[c])

    def dist(c: float, k: float) -> float:
        a, b = sorted((pos[c], pos[k]))
        return (cum[b + 1] - cum[a] - (n_c[values[a]] + n_c[values[b]]) / 2) ** 2

    observed = sum(v * dist(c, k) for (c, k), v in coinc.items())
    expected = sum(n_c[c] * n_c[k] * dist(c, k) for c in values for k in values)
    if expected == 0:
        return None
    return 1 - (n - 1) * observed / expected


def kendall_tau_b(a: dict[Hashable, float], b: dict[Hashable, float]) -> float | None:
    """Kendall's tau-b between two rankings of the same items (ties handled); None if either is all-tied."""
    items = [i for i in a if i in b]
    concordant = discordant = ties_a = ties_b = 0
    for x in range(len(items)):
        for y in range(x + 1, len(items)):
            da = a[items[x]] - a[items[y]]
            db = b[items[x]] - b[items[y]]
            if da == 0 and db == 0:
                continue
            if da == 0:
                ties_a += 1
            elif db == 0:
                ties_b += 1
            elif (da > 0) == (db > 0):
                concordant += 1
            else:
                discordant += 1
    denom = math.sqrt((concordant + discordant + ties_a) * (concordant + discordant + ties_b))
    return (concordant - discordant) / denom if denom else None


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
