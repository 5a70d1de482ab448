import math

import pytest
import torch

from eval.perplexity import sequence_nll


class FixedLM(torch.nn.Module):
    """A 'model' whose next-token distribution is the same fixed table at every position (vocab 3)."""

    def __init__(self, probs):
        super().__init__()
        self.logp = torch.nn.Parameter(torch.log(torch.tensor(probs)), requires_grad=False)

    def forward(self, input_ids, attention_mask=None):
        b, n = input_ids.shape
        return type("Out", (), {"logits": self.logp.expand(b, n, -1).clone()})()


def test_token_weighted_perplexity_by_hand():
    model = FixedLM([0.5, 0.25, 0.25])
    rows = [
        # unshifted labels; position 0 is never predicted. scored targets: 0 (p=.5), 1 (p=.25)
        {"input_ids": [2, 0, 1], "labels": [-100, 0, 1]},
        # one scored target: 2 (p=.25); the prompt token 1 is not scored
        {"input_ids": [0, 1, 2], "labels": [-100, -100, 2]},
    ]
    nlls, counts = sequence_nll(model, rows, batch_size=2, pad_token_id=0)
    assert counts == [2, 1]
    assert nlls[0] == pytest.approx(-(math.log(0.5) + math.log(0.25)))
    assert nlls[1] == pytest.approx(-math.log(0.25))
    ppl = math.exp(sum(nlls) / sum(counts))
    # by hand: exp((ln2 + ln4 + ln4)/3) = exp(5 ln2 / 3) = 2^(5/3)
    assert ppl == pytest.approx(2 ** (5 / 3))
    # token-weighted, not the mean of per-example perplexities (which would be (2^1.5 + 4) / 2)
    assert ppl != pytest.approx((2**1.5 + 4) / 2)


def test_batching_and_padding_do_not_change_scores():
    model = FixedLM([0.2, 0.3, 0.5])
    rows = [{"input_ids": [1] * n, "labels": [-100] + [1] * (n - 1)} for n in (2, 5, 3)]
    a = sequence_nll(model, rows, batch_size=1, pad_token_id=2)
    b = sequence_nll(model, rows, batch_size=3, pad_token_id=2)
    assert a[1] == b[1] == [1, 4, 2]
    assert a[0] == pytest.approx(b[0])
