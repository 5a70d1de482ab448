"""A toy advantage estimator, written as a user would add one: one function here and one row in
lib.rl.ADVANTAGE_ESTIMATORS (tests/lib/test_rl.py registers it).

REINFORCE with a batch-mean baseline: A_i = score_i - mean_j score_j on every token of response i; no critic, no
groups, the KL only in the per-token reward's bookkeeping."""

from __future__ import annotations

import torch

from lib.rl import AdvantageEstimator, Rollouts, per_response

CALLS: list[torch.Tensor] = []  # every batch's advantages, for the test to compare with the update's


def batch_baseline(x: Rollouts) -> tuple[torch.Tensor, torch.Tensor]:
    adv = x.scores - x.scores.mean()
    CALLS.append(adv.clone())
    return per_response(adv, x.mask)


ROW = AdvantageEstimator(
    "toy_batch_baseline", batch_baseline, critic=False, min_group_size=1, kl_loss=False,
    help="REINFORCE with the batch mean as baseline (a test's toy)",
)  # fmt: skip
