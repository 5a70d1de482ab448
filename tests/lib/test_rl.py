"""The RL tables (lib/rl.py): every row's numbers against the functions they wrap, a bad name refused in one
sentence. The toy estimator registered as one module and one row, trained with end to end through `align ppo`, is
in tests/stages/test_ppo.py (it shares that file's toy SFT artifact)."""

import math

import pytest
import torch

from core.config import UserError
from lib.rl import (
    ADVANTAGE_ESTIMATORS,
    POLICY_LOSSES,
    Rollouts,
    advantage_estimator,
    gae,
    grpo_advantages,
    masked_whiten,
    policy_loss_row,
    rloo_advantages,
)


def _rollouts(group_size=2, whiten=False):
    scores = torch.tensor([1.0, 0.0, 2.0, 2.0])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    kl = torch.tensor([[0.1, 0.2, 0.0], [0.0, 0.3, 0.1], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0]])
    rewards = -0.1 * kl
    rewards[torch.arange(4), mask.sum(1).long() - 1] += scores
    values = torch.full((4, 3), 0.5) * mask
    return Rollouts(scores, rewards * mask, kl, values, mask, group_size, 0.1, 1.0, 0.95, whiten)


def test_rows_compute_what_their_functions_compute():
    x = _rollouts()
    adv, ret = advantage_estimator("gae").advantages(x)
    want_adv, want_ret = gae(x.rewards, x.values, x.mask, 1.0, 0.95)
    assert torch.allclose(adv, want_adv) and torch.allclose(ret, want_ret)
    adv, _ = advantage_estimator("gae").advantages(_rollouts(whiten=True))
    assert torch.allclose(adv, masked_whiten(want_adv, x.mask))
    adv, ret = advantage_estimator("grpo").advantages(x)
    assert torch.allclose(adv, grpo_advantages(x.scores, 2)[:, None] * x.mask) and not ret.any()
    adv, _ = advantage_estimator("rloo").advantages(x)
    assert torch.allclose(adv, rloo_advantages(x.scores, x.kl.sum(1), 0.1, 2)[:, None] * x.mask)
    # RLOO by hand: rewards 1 - 0.03, 0 - 0.04 | 2 - 0.05, 2; A = 2 * (r - mean) = r_i - r_other
    assert torch.allclose(adv[:, 0], torch.tensor([1.01, -1.01, -0.05, 0.05]), atol=1e-6)
    assert {e.name for e in ADVANTAGE_ESTIMATORS.values() if e.critic} == {"gae"}
    assert set(POLICY_LOSSES) == {"ppo_clip", "gspo"}


def test_an_unknown_row_is_one_sentence():
    with pytest.raises(
        UserError, match="train.advantage_estimator='nope' is not a row.*known: gae, grpo, rloo, dr_grpo"
    ):
        advantage_estimator("nope")
    with pytest.raises(UserError, match="train.policy_loss"):
        policy_loss_row("nope")


def test_the_grpo_family_by_hand():
    """Dr. GRPO, DAPO's advantages and REINFORCE++-baseline on the rollouts above, computed by hand."""
    x = _rollouts()  # scores 1, 0 | 2, 2; summed KL 0.3, 0.4 | 0.5, 0; kl_coef 0.1
    adv, ret = advantage_estimator("dr_grpo").advantages(x)
    assert torch.allclose(adv[:, 0], torch.tensor([0.5, -0.5, 0.0, 0.0])) and not ret.any()  # no std division
    assert torch.allclose(adv, adv[:, :1] * x.mask)
    adv, _ = advantage_estimator("dapo").advantages(x)
    assert torch.allclose(
        adv[:, 0], torch.tensor([0.5, -0.5, 0.0, 0.0]) / (2**-0.5 + 1e-4)
    )  # GRPO: std sqrt(0.5)
    assert not advantage_estimator("dapo").kl_loss and advantage_estimator("dr_grpo").kl_loss
    # REINFORCE++-baseline: r = 0.97, -0.04 | 1.95, 2.0; minus group means -> 0.505, -0.505 | -0.025, 0.025;
    # then (a - mean) / std over the batch (mean 0; std = sqrt((2 * 0.505^2 + 2 * 0.025^2) / 3))
    adv, _ = advantage_estimator("reinforce_pp_baseline").advantages(x)
    a = torch.tensor([0.505, -0.505, -0.025, 0.025])
    std = ((2 * 0.505**2 + 2 * 0.025**2) / 3) ** 0.5
    assert torch.allclose(adv[:, 0], a / (std + 1e-8), atol=1e-5)


def test_clip_higher_lets_a_likely_token_grow_further_only_on_the_upper_side():
    """DAPO's clip-higher: with eps_high > eps_low, a positive advantage is clipped at 1 + eps_high (not 1 + eps),
    a negative one still at 1 - eps_low."""
    from lib.rl import policy_loss

    mask = torch.ones(1, 2)
    old = torch.zeros(1, 2)
    up = torch.log(torch.tensor([[1.25, 1.25]]))  # ratio 1.25
    down = torch.log(torch.tensor([[0.7, 0.7]]))  # ratio 0.7
    pos, neg = torch.ones(1, 2), -torch.ones(1, 2)
    assert policy_loss(up, old, pos, mask, 0.2)[0].item() == pytest.approx(-1.2)  # symmetric: clipped at 1.2
    assert policy_loss(up, old, pos, mask, (0.2, 0.28))[0].item() == pytest.approx(-1.25)  # inside 1.28
    assert policy_loss(down, old, neg, mask, (0.2, 0.28))[0].item() == pytest.approx(0.8)  # low side: 1 - 0.2


def test_gspo_clips_the_sequence_ratio_and_gives_every_token_its_gradient():
    """GSPO by hand: two responses of 2 and 1 tokens; log ratios (0.1, 0.3) and (0.5,): s = exp(0.2), exp(0.5).
    With eps 0.25 the first is inside (1.221 < 1.25) and the second clipped (1.649 > 1.25): with A = 1 both, the
    loss is -(1.2214 + 1.25) / 2. The gradient of the first response's loss reaches each of its tokens with
    weight s_1 / (2 tokens) / (2 responses); the clipped one passes none."""
    from lib.rl import gspo_loss

    lp = torch.tensor([[0.1, 0.3], [0.5, 0.0]], requires_grad=True)
    old = torch.zeros(2, 2)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.ones(2, 2) * mask
    loss, stats = gspo_loss(lp, old, adv, mask, 0.25)
    s1 = torch.exp(torch.tensor(0.2)).item()
    assert loss.item() == pytest.approx(-(s1 + 1.25) / 2, rel=1e-5)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    loss.backward()
    assert torch.allclose(lp.grad, torch.tensor([[-s1 / 4, -s1 / 4], [0.0, 0.0]]), atol=1e-6)


def test_dapo_overlong_shaping_by_hand():
    from lib.rl import overlong_shaping

    # max 20 tokens, the last 8 a buffer: free up to 12, then -(L - 12) / 8, -1 at 20
    got = overlong_shaping(torch.tensor([5, 12, 13, 16, 20]), 20, 8)
    assert torch.allclose(got, torch.tensor([0.0, 0.0, -1 / 8, -0.5, -1.0]))


def test_truncated_is_weights_by_hand_and_the_gradient_they_give():
    """Issue 37: where the engine's and the trainer's log-probs differ, each token's policy gradient is scaled by
    min(pi_old / pi_sampler, cap), exactly: at ratio 1 (no clipping) d loss / d logprob_t = -w_t A_t / N."""
    from lib.rl import policy_loss, truncated_is_weights

    old = torch.log(torch.tensor([[0.5, 0.2, 0.9], [0.3, 0.6, 0.1]]))
    sampler = torch.log(torch.tensor([[0.25, 0.2, 0.3], [0.3, 0.1, 0.1]]))
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    w, stats = truncated_is_weights(old, sampler, mask, cap=2.0)
    # ratios 2, 1, 3 (capped to 2), 1, 6 (capped to 2); padding 1
    assert torch.allclose(w, torch.tensor([[2.0, 1.0, 2.0], [1.0, 2.0, 1.0]]))
    assert stats["engine_is_truncated"] == pytest.approx(2 / 5)
    d = torch.log(torch.tensor([2.0, 1.0, 3.0, 1.0, 6.0]))
    assert stats["engine_logprob_diff"] == pytest.approx(float(d.abs().mean()))
    assert stats["engine_kl"] == pytest.approx(float(((d.exp() - 1) - d).mean()))
    assert stats["engine_logprob_diff_max"] == pytest.approx(math.log(6.0))
    none, measured = truncated_is_weights(old, sampler, mask, cap=None)
    assert none is None and measured["engine_kl"] == stats["engine_kl"]

    adv = torch.tensor([[1.0, -2.0, 0.5], [3.0, 1.0, 7.0]])
    lp = old.clone().requires_grad_(True)
    loss, _ = policy_loss(lp, old, adv * w, mask, clip=0.2)
    loss.backward()
    assert torch.allclose(lp.grad, -(w * adv * mask) / mask.sum(), atol=1e-7)
