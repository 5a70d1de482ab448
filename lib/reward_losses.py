"""Reward-model losses, as pure functions and one table (`REWARD_LOSSES`): `train.loss` in the reward config names a
row, and the reward stage neither knows nor branches on which.

Shapes: rewards [N] (one per response in the micro-batch); pairs [P, 2] (winner, loser) indices into rewards;
pair_group [P] the group each pair belongs to; G groups. A row's `fn(rewards, batch, margin)` reads what it needs
from the collated batch (lib.reward_model.GroupCollator). `pairwise` rows train on every implied pair as its
own two-response example (how pair trainers see the data); the others on whole K-wise groups.

Adding a loss is one function and one row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from core.config import UserError
from core.tables import table


# ==========================================================================================================
# Losses. Shapes: rewards [N] (one per response in the micro-batch); pairs [P, 2] (winner, loser) indices into
# rewards; pair_group [P] the group each pair belongs to; G groups.
# ==========================================================================================================
def kwise_loss(
    rewards: torch.Tensor, pairs: torch.Tensor, pair_group: torch.Tensor, n_groups: int, margin: float = 0.0
) -> torch.Tensor:
    """InstructGPT all-pairs loss (Ouyang et al. 2022, eq. 1), normalised per group:

        loss = -(1/G') sum_g (1/|P_g|) sum_{(w,l) in P_g} log sigmoid(r_w - r_l - m)

    P_g holds every pair of group g whose members sit in different tiers (tied responses form no pair); G' counts
    the groups with at least one pair. With K responses and no ties |P_g| = C(K,2), the paper's 1/C(K,2).
    """
    per_pair = -F.logsigmoid(rewards[pairs[:, 0]] - rewards[pairs[:, 1]] - margin)  # [P]
    sums = torch.zeros(n_groups, dtype=per_pair.dtype, device=per_pair.device).index_add(
        0, pair_group, per_pair
    )
    counts = torch.bincount(pair_group, minlength=n_groups)
    has = counts > 0
    return (sums[has] / counts[has]).mean()


def bradley_terry_loss(rewards: torch.Tensor, pairs: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Bradley-Terry (1952) on independent pairs, with an optional margin (Touvron et al. 2023, Llama 2):

    loss = -(1/P) sum_p log sigmoid(r_chosen - r_rejected - m)
    """
    return -F.logsigmoid(rewards[pairs[:, 0]] - rewards[pairs[:, 1]] - margin).mean()


def plackett_luce_loss(rewards: torch.Tensor, group_tiers: list[list[list[int]]]) -> torch.Tensor:
    """Plackett-Luce listwise loss (Plackett 1975; Luce 1959), with tiers:

        loss_g = -(1/|T_g|) sum_{t < last} sum_{i in tier t} [ r_i - log( e^{r_i} + sum_{j in tiers > t} e^{r_j} ) ]

    For a strict ranking this is the exact negative log-likelihood of the ordering, normalised per term. A tied
    response is only required to beat every response below its tier, never its tie partners. The loss is the
    mean of loss_g over groups with at least one term. `group_tiers[g]` lists tiers of indices into `rewards`.
    """
    losses = []
    for tiers in group_tiers:
        terms = []
        for t, tier in enumerate(tiers[:-1]):
            below = [j for lower in tiers[t + 1 :] for j in lower]
            below_r = rewards[below]
            for i in tier:
                terms.append(rewards[i] - torch.logsumexp(torch.cat([rewards[i : i + 1], below_r]), dim=0))
        if terms:
            losses.append(-torch.stack(terms).mean())
    return torch.stack(losses).mean()


def centering_penalty(rewards: torch.Tensor, coefficient: float) -> torch.Tensor:
    """Auxiliary loss coefficient * mean(r^2) that keeps rewards centred on 0 (Eisenstein et al. 2023)."""
    return coefficient * rewards.pow(2).mean()


@dataclass(frozen=True)
class RewardLoss:
    name: str
    fn: Callable[[torch.Tensor, dict[str, Any], float], torch.Tensor]  # (rewards, batch, margin) -> loss
    pairwise: bool  # trains on implied pairs as separate examples (else on whole groups)
    help: str


REWARD_LOSSES: dict[str, RewardLoss] = table(
    RewardLoss(
        "kwise",
        lambda r, b, m: kwise_loss(r, b["pairs"], b["pair_group"], len(b["group_tiers"]), m),
        False,
        "InstructGPT all-pairs loss per group (Ouyang et al. 2022)",
    ),
    RewardLoss(
        "plackett_luce",
        lambda r, b, m: plackett_luce_loss(r, b["group_tiers"]),
        False,
        "listwise likelihood of the ranking (Plackett 1975)",
    ),
    RewardLoss(
        "bradley_terry",
        lambda r, b, m: bradley_terry_loss(r, b["pairs"], m),
        True,
        "independent pairs (Bradley and Terry 1952)",
    ),
)


def reward_loss(name: str) -> RewardLoss:
    """The row named `name`, or one sentence naming the known ones."""
    if name not in REWARD_LOSSES:
        raise UserError(f"train.loss={name!r} is not a row of its table; known: {', '.join(REWARD_LOSSES)} "
                        "(lib/reward_losses.py)")  # fmt: skip
    return REWARD_LOSSES[name]
