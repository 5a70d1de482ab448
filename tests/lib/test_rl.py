"""The RL tables (lib/rl.py): every row's numbers against the functions they wrap, a bad name refused in one
sentence. The toy estimator registered as one module and one row, trained with end to end through `align ppo`, is
in tests/stages/test_ppo.py (it shares that file's toy SFT artifact)."""

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
    assert set(POLICY_LOSSES) == {"ppo_clip"}


def test_an_unknown_row_is_one_sentence():
    with pytest.raises(
        UserError, match="train.advantage_estimator='nope' is not a row.*known: gae, grpo, rloo"
    ):
        advantage_estimator("nope")
    with pytest.raises(UserError, match="train.policy_loss"):
        policy_loss_row("nope")
