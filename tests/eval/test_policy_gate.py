"""The policy gate on answers with known properties: a policy that wins only by getting longer fails, a policy that
wins at equal length passes, too few prompts / KL spikes / reward drift / degenerate answers fail, NaN fails."""

import math

import numpy as np
import pytest

from data_schemas.config import PolicyGateSettings
from eval.policy_gate import (
    PolicySamples,
    decide_policy,
    degenerate,
    length_controlled_win_rate,
    run_policy_gate,
    spearman,
    wins,
)

S = PolicyGateSettings(bootstrap_samples=200)


def _samples(n=120, seed=0, length_gain=0.0, quality_gain=0.0, length_weight=0.0, **kw) -> PolicySamples:
    """Parent answers of random length; the policy's are `length_gain` tokens longer on average and `quality_gain`
    better in what the reward sees besides length; reward = quality + length_weight * length + noise."""
    rng = np.random.default_rng(seed)
    lr = rng.integers(20, 80, n)
    lp = np.maximum(1, lr + rng.normal(length_gain, 10, n)).astype(int)
    qr, qp = rng.normal(0, 1, n), rng.normal(quality_gain, 1, n)
    rr, rp = qr + length_weight * lr, qp + length_weight * lp
    words = lambda k: " ".join(f"w{j}" for j in range(k))  # noqa: E731  distinct words: not degenerate
    return PolicySamples(
        prompts=[f"q{i}" for i in range(n)],
        policy=[words(int(k)) for k in lp],
        parent=[words(int(k)) for k in lr],
        policy_lengths=[int(x) for x in lp],
        parent_lengths=[int(x) for x in lr],
        policy_rewards=[float(x) for x in rp],
        parent_rewards=[float(x) for x in rr],
        **kw,
    )


def test_wins_and_the_length_controlled_win_rate_by_hand():
    assert wins([2, 1, 1], [1, 1, 3]).tolist() == [1.0, 0.5, 0.0]
    # no length difference: the logistic fit's intercept gives back the plain win rate
    w = np.array([1, 1, 1, 0.0])
    assert length_controlled_win_rate(w, np.zeros(4)) == pytest.approx(0.75, abs=1e-3)
    # every win longer, every loss shorter: at equal length the policy would be a coin flip
    w = np.array([1.0] * 50 + [0.0] * 50)
    d = np.array([30.0] * 50 + [-30.0] * 50)
    assert length_controlled_win_rate(w, d) == pytest.approx(0.5, abs=1e-6)


def former_newton_lc(w, dlen, iters=50, ridge=1e-3):
    """align's former hand-written fit (Newton's method, the same ridge): the reference the library fit must equal."""
    s = float(np.std(dlen))
    x = np.stack([np.ones_like(dlen), dlen / s if s > 0 else np.zeros_like(dlen)], axis=1)
    theta = np.zeros(2)
    for _ in range(iters):
        p = 1 / (1 + np.exp(-(x @ theta)))
        step = np.linalg.solve(
            x.T @ (x * (p * (1 - p))[:, None]) + ridge * np.eye(2), x.T @ (p - w) + ridge * theta
        )
        theta -= step
    return float(1 / (1 + np.exp(-theta[0])))


def test_the_length_controlled_win_rate_equals_the_former_newton_fit():
    rng = np.random.default_rng(0)
    for n in (3, 10, 100, 400):
        d = rng.normal(size=n) * 20
        w = (rng.uniform(size=n) < 1 / (1 + np.exp(-(0.4 + d / 20)))).astype(float)
        w[rng.uniform(size=n) < 0.1] = 0.5
        assert length_controlled_win_rate(w, d) == pytest.approx(former_newton_lc(w, d), abs=2e-5)
    separable = np.arange(10.0)
    assert length_controlled_win_rate((separable > 4).astype(float), separable) == pytest.approx(
        former_newton_lc((separable > 4).astype(float), separable), abs=1e-6
    )
    assert np.isnan(length_controlled_win_rate(np.array([]), np.array([])))


def test_spearman_and_degeneration():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) == 0.0  # constant side: nothing to exploit, not NaN
    assert degenerate("the cat sat on the mat " * 3)
    assert degenerate(" ".join(["yes"] * 15))
    assert not degenerate("Paris is the capital of France, and it sits on the Seine river in the north.")


def test_a_policy_that_only_got_longer_fails():
    s = _samples(length_gain=40, quality_gain=0.0, length_weight=0.1)
    r = decide_policy(s, S)
    m = r.metrics
    assert m["win_rate"] > 0.8 and abs(m["length_controlled_win_rate"] - 0.5) < 0.2
    assert r.verdict == "fail"
    failed = [c.metric for c in r.checks if not c.passed]
    assert "length-controlled win rate" in failed
    assert any("the win comes from length" in x for x in r.reasons)


def test_a_policy_better_at_equal_length_passes():
    s = _samples(length_gain=0, quality_gain=1.0, length_weight=0.01)
    r = decide_policy(s, S)
    assert r.verdict == "pass", r.reasons
    assert r.metrics["win_rate"] > 0.65 and r.metrics["length_controlled_win_rate"] > 0.65


def test_a_policy_shown_worse_fails_and_an_even_one_passes():
    worse = decide_policy(_samples(quality_gain=-1.0), S)
    assert worse.verdict == "fail" and "loses to its parent" in worse.reasons[0]
    even = decide_policy(_samples(quality_gain=0.0, seed=3), S)
    assert even.verdict == "pass", even.reasons


def test_too_few_prompts_fail_closed():
    r = decide_policy(_samples(n=8, quality_gain=2.0), S)
    assert r.verdict == "fail" and "only 8 held-out prompts" in r.reasons[0]


def test_kl_spike_and_kl_ceiling_fail():
    spike = decide_policy(_samples(quality_gain=1.0, kl_history=[0.5, 1.0, 1.4, 14.0]), S)
    assert spike.verdict == "fail" and any("jumped by 12.60" in x for x in spike.reasons)
    high = decide_policy(_samples(quality_gain=1.0, kl_history=[60.0]), S)
    assert high.verdict == "fail" and any("KL to the parent reached 60.00" in x for x in high.reasons)
    calm = decide_policy(_samples(quality_gain=1.0, kl_history=[0.5, 1.0, 1.5, 2.0]), S)
    assert calm.verdict == "pass", calm.reasons


def test_reward_drift_against_a_held_out_reward_fails():
    s = _samples(quality_gain=1.0)
    rng = np.random.default_rng(1)
    s.heldout_policy_rewards = list(rng.normal(0, 1, len(s.prompts)))  # the held-out judge sees no gain
    s.heldout_parent_rewards = list(rng.normal(0, 1, len(s.prompts)))
    r = decide_policy(s, S)
    assert r.verdict == "fail" and any("learned the training reward's quirks" in x for x in r.reasons)
    s.heldout_policy_rewards, s.heldout_parent_rewards = s.policy_rewards, s.parent_rewards
    assert decide_policy(s, S).verdict == "pass"


def test_degenerate_answers_fail():
    s = _samples(quality_gain=1.0)
    s.policy = ["again and again and again " * 4] * len(s.prompts)
    r = decide_policy(s, S)
    assert r.verdict == "fail" and any("repeat themselves" in x for x in r.reasons)


def test_nan_rewards_fail_closed():
    s = _samples(quality_gain=1.0)
    s.policy_rewards[3] = math.nan
    r = decide_policy(s, S)
    assert r.verdict == "fail" and "1 rewards are not finite" in r.reasons[0]


def test_run_policy_gate_writes_the_report_and_the_plot(tmp_path):
    s = _samples(length_gain=40, length_weight=0.1, kl_history=[0.2, 0.4, 0.9])
    r = run_policy_gate("cand", "parent", s, S, tmp_path / "g")
    assert r.verdict == "fail"
    for f in ("gate.json", "gate.md", "gate.html", "policy.png", "samples.json"):
        assert (tmp_path / "g" / f).exists(), f
    assert "the win comes from length" in (tmp_path / "g" / "gate.html").read_text()


def test_the_worst_examples_are_where_the_policy_lost_most_and_prompts_read_as_turns():
    """Worst examples: the five answers whose reward fell most against the parent's (not those that gained by
    growing), each prompt as chat turns a reviewer reads, not a Python repr."""
    s = _samples(n=40, seed=3, quality_gain=0.5)
    s.prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(40)]
    r = decide_policy(s, S)
    change = np.asarray(s.policy_rewards) - np.asarray(s.parent_rewards)
    want = sorted(change)[:5]
    got = [w["reward change"] for w in r.worst_examples]
    assert got == pytest.approx(want) and got[0] < 0
    assert all(w["prompt"].startswith("user: question ") and "{" not in w["prompt"] for w in r.worst_examples)
