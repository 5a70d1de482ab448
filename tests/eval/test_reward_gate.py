"""The reward gate on hand-made held-out rewards: pairs, accuracy, the length baseline, failing closed."""

import math

import pytest

from data_schemas.config import RewardGateSettings
from eval.reward_gate import decide_reward_gate, implied_pairs_of, pair_hits, pairwise_metrics


def test_implied_pairs_skip_ties():
    assert implied_pairs_of([[1], [0, 2]]) == [(1, 0), (1, 2)]
    assert implied_pairs_of([[0, 1, 2]]) == []


def _groups():
    # two groups; response lengths make longer = better in group 0, worse in group 1
    return [
        {"tiers": [[0], [1], [2]], "lengths": [30, 20, 10], "agreement": 0.9, "annotators": 3},
        {"tiers": [[0], [1]], "lengths": [5, 50], "agreement": None, "annotators": 1},
    ]


def test_metrics_and_gate_fail_a_length_only_reward():
    groups = _groups() * 30
    length_rewards = [[float(x) for x in g["lengths"]] for g in groups]
    m = pairwise_metrics(groups, length_rewards)
    assert m["accuracy"] == pytest.approx(m["length_baseline_accuracy"]) == pytest.approx(0.75)
    d = decide_reward_gate(m, RewardGateSettings(min_accuracy=0.5))
    assert d.verdict == "fail" and "length-only baseline" in d.reasons[0]


def test_gate_passes_a_good_reward_and_fails_closed_on_few_pairs():
    groups = _groups() * 30
    perfect = [[-float(i) for i in range(len(g["lengths"]))] for g in groups]
    m = pairwise_metrics(groups, perfect)
    assert m["accuracy"] == 1.0
    assert m["accuracy_by_agreement"] == {"W >= 0.8": 1.0, "single annotator": 1.0}
    assert decide_reward_gate(m, RewardGateSettings()).verdict == "pass"
    few = pairwise_metrics(groups[:2], perfect[:2])
    d = decide_reward_gate(few, RewardGateSettings(min_pairs=50))
    assert d.verdict == "fail" and "only 4 held-out pairs" in d.reasons[0]


def test_pair_hits_count_ties_half():
    groups = [{"tiers": [[0], [1], [2]]}]
    assert pair_hits(groups, [[1.0, 1.0, 0.0]]) == [[0.5, 1.0, 1.0]]


def test_nan_accuracy_fails_closed():
    m = {"pairs": 100, "accuracy": float("nan"), "length_baseline_accuracy": 0.5}
    d = decide_reward_gate(m, RewardGateSettings())
    assert d.verdict == "fail" and not any(c.passed for c in d.checks[1:])
    assert math.isnan(d.checks[1].candidate)
