"""Agreement statistics against hand-computed and published values."""

import pytest

from lib.agreement import (
    borda_consensus,
    kendall_tau_b,
    kendalls_w,
    krippendorff_alpha_ordinal,
    tier_ranks,
)


def test_tier_ranks_average_ties():
    assert tier_ranks([["b"], ["a", "c"]]) == {"b": 1, "a": 2.5, "c": 2.5}


def test_kendalls_w_by_hand():
    # R = (2, 5, 5), mean 4, S = 4 + 1 + 1 = 6, W = 12*6 / (2^2 * (27 - 3)) = 0.75
    assert kendalls_w([{"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 3, "c": 2}]) == pytest.approx(0.75)
    assert kendalls_w([{"a": 1, "b": 2}, {"a": 1, "b": 2}]) == pytest.approx(1.0)
    assert kendalls_w([{"a": 1, "b": 2}, {"a": 2, "b": 1}]) == pytest.approx(0.0)
    assert kendalls_w([{"a": 1, "b": 2}]) is None


def test_kendalls_w_tie_correction_by_hand():
    # A: a=1, b=c=2.5 ; B: a=1, b=2, c=3. R = (2, 4.5, 5.5), mean 4, S = 4 + .25 + 2.25 = 6.5
    # T_A = 2^3 - 2 = 6, T_B = 0; W = 12*6.5 / (4*24 - 2*6) = 78/84
    w = kendalls_w([tier_ranks([["a"], ["b", "c"]]), tier_ranks([["a"], ["b"], ["c"]])])
    assert w == pytest.approx(78 / 84)


def test_krippendorff_alpha_ordinal_published_example():
    """Krippendorff (2011), 'Computing Krippendorff's Alpha-Reliability', reliability data with 4 coders and
    12 units (missing values omitted): ordinal alpha = 0.815."""
    coders = [
        [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
        [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
    ]
    units = [[v for v in col if v is not None] for col in zip(*coders, strict=True)]
    assert krippendorff_alpha_ordinal(units) == pytest.approx(0.815, abs=5e-4)


def test_krippendorff_perfect_and_unpairable():
    assert krippendorff_alpha_ordinal([[1, 1], [2, 2], [3, 3]]) == pytest.approx(1.0)
    assert krippendorff_alpha_ordinal([[1], [2]]) is None


def test_kendall_tau_b():
    a = {"x": 1, "y": 2, "z": 3}
    assert kendall_tau_b(a, a) == pytest.approx(1.0)
    assert kendall_tau_b(a, {"x": 3, "y": 2, "z": 1}) == pytest.approx(-1.0)
    # one tie in b: concordant 2, discordant 0, ties_b 1 -> 2 / sqrt(3 * 2)
    assert kendall_tau_b(a, {"x": 1, "y": 2.5, "z": 2.5}) == pytest.approx(2 / 6**0.5)


def test_borda_consensus():
    r = [tier_ranks([["a"], ["b"], ["c"]]), tier_ranks([["b"], ["a"], ["c"]])]
    assert borda_consensus(r) == [["a", "b"], ["c"]]


def test_kendalls_w_equals_scipys_friedman_statistic_where_it_exists():
    """scipy's tie-corrected Friedman chi-square over m annotators and n >= 3 items is W * m * (n - 1)."""
    import numpy as np
    from scipy.stats import friedmanchisquare

    rng = np.random.default_rng(0)
    for _ in range(20):
        m, n = int(rng.integers(2, 6)), int(rng.integers(3, 7))
        rankings = []
        for _ in range(m):  # random tiers: shuffled items cut into groups (ties)
            items = list(rng.permutation(n))
            cuts = sorted(set(rng.integers(1, n, size=int(rng.integers(0, n)))))
            rankings.append(tier_ranks([items[a:b] for a, b in zip([0, *cuts], [*cuts, n], strict=True)]))
        if all(len(set(r.values())) == 1 for r in rankings):
            continue
        chi2 = friedmanchisquare(*[[r[i] for r in rankings] for i in range(n)]).statistic
        assert kendalls_w(rankings) == pytest.approx(chi2 / (m * (n - 1)), rel=1e-9)


def test_tau_b_and_alpha_edge_cases():
    assert kendall_tau_b({"x": 1, "y": 1}, {"x": 1, "y": 2}) is None  # one side all tied
    assert kendall_tau_b({"x": 1}, {"x": 1}) is None
    assert krippendorff_alpha_ordinal([[2, 2], [2, 2]]) is None  # no variation at all
