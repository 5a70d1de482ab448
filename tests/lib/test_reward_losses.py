"""Reward losses against numbers computed by hand."""

import math

import pytest
import torch

from lib.reward_losses import bradley_terry_loss, centering_penalty, kwise_loss, plackett_luce_loss


def nls(x):  # -log sigmoid(x)
    return math.log1p(math.exp(-x))


def test_kwise_loss_normalises_per_group():
    # group 0: r = [1, 0, -1], strict ranking -> pairs (0,1) (0,2) (1,2): diffs 1, 2, 1
    # group 1: r = [0.5, 0.5], ranking a > b -> one pair, diff 0
    r = torch.tensor([1.0, 0.0, -1.0, 0.5, 0.5])
    pairs = torch.tensor([[0, 1], [0, 2], [1, 2], [3, 4]])
    group = torch.tensor([0, 0, 0, 1])
    g0 = (nls(1) + nls(2) + nls(1)) / 3
    g1 = nls(0)
    assert kwise_loss(r, pairs, group, 2).item() == pytest.approx((g0 + g1) / 2, rel=1e-6)
    # pooling all pairs instead would weight the 3-pair group 3x: a different number
    assert kwise_loss(r, pairs, group, 2).item() != pytest.approx((3 * g0 + g1) / 4, rel=1e-3)
    # margin shifts every difference
    assert kwise_loss(r, pairs[3:], group[3:] * 0, 1, margin=0.5).item() == pytest.approx(nls(-0.5), rel=1e-6)


def test_bradley_terry_with_margin():
    r = torch.tensor([2.0, 1.0, 0.0, 3.0])
    pairs = torch.tensor([[0, 1], [2, 3]])
    assert bradley_terry_loss(r, pairs).item() == pytest.approx((nls(1) + nls(-3)) / 2, rel=1e-6)
    assert bradley_terry_loss(r, pairs, margin=1.0).item() == pytest.approx((nls(0) + nls(-4)) / 2, rel=1e-6)


def test_plackett_luce_strict_and_tied():
    r = torch.tensor([2.0, 1.0, 0.0])
    lse = lambda *xs: math.log(sum(math.exp(x) for x in xs))  # noqa: E731
    strict = -((2 - lse(2, 1, 0)) + (1 - lse(1, 0))) / 2
    assert plackett_luce_loss(r, [[[0], [1], [2]]]).item() == pytest.approx(strict, rel=1e-6)
    # tiers [[0, 1], [2]]: each tied item must only beat item 2
    tied = -((2 - lse(2, 0)) + (1 - lse(1, 0))) / 2
    assert plackett_luce_loss(r, [[[0, 1], [2]]]).item() == pytest.approx(tied, rel=1e-6)
    # strict PL of 2 items equals Bradley-Terry
    assert plackett_luce_loss(r, [[[0], [1]]]).item() == pytest.approx(nls(1), rel=1e-6)


def test_centering_penalty():
    assert centering_penalty(torch.tensor([1.0, -3.0]), 0.01).item() == pytest.approx(0.01 * 5)


def test_the_loss_table_names_its_rows():
    """train.loss is a row of REWARD_LOSSES; another name is one sentence listing them (the stage checks it before
    any model loads)."""
    from core.config import UserError
    from lib.reward_losses import REWARD_LOSSES, reward_loss

    assert list(REWARD_LOSSES) == ["kwise", "plackett_luce", "bradley_terry"]
    assert reward_loss("bradley_terry").pairwise and not reward_loss("kwise").pairwise
    with pytest.raises(
        UserError, match="train.loss='listnet' is not a row.*kwise, plackett_luce, bradley_terry"
    ):
        reward_loss("listnet")
