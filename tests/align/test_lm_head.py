"""align/lm_head.py: per-token log-probabilities, entropy and top-1 through a frozen head, with the gradient computed
in the forward, equal the full-logits computation and TRL's chunked function; what it does not cover goes to TRL."""

from __future__ import annotations

import pytest
import torch

import align.lm_head as lm_head
from align.lm_head import LabelledLogProbs, covers

N, H, V = 37, 24, 101


def _inputs(seed: int = 0, bias: bool = False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64).float().requires_grad_()
    weight = torch.randn(V, H, generator=g) * 0.7
    b = torch.randn(V, generator=g) if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[:5] = (hidden[:5].detach() @ weight.t() + (0 if b is None else b)).argmax(-1)  # some are the top-1 token
    upstream = torch.randn(N, generator=g)
    return hidden, weight, b, labels, upstream


def _reference(hidden, weight, bias, labels, upstream):
    h = hidden.detach().clone().requires_grad_()
    z = h @ weight.t() + (0 if bias is None else bias)
    logp_all = torch.log_softmax(z, -1)
    logp = logp_all.gather(-1, labels[:, None])[:, 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    (logp * upstream).sum().backward()
    return logp.detach(), entropy.detach(), z.argmax(-1) == labels, h.grad


def _ours(hidden, weight, bias, labels, upstream):
    h = hidden.detach().clone().requires_grad_()
    logp, entropy, top1 = LabelledLogProbs.apply(h, weight, bias, labels, True, True)
    (logp * upstream).sum().backward()
    return logp.detach(), entropy, top1, h.grad


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_bytes", [lm_head.CHUNK_BYTES, 4 * V * 5])  # one chunk; chunks of 5 tokens
def test_equals_the_full_logits_computation(monkeypatch, bias, chunk_bytes):
    monkeypatch.setattr(lm_head, "CHUNK_BYTES", chunk_bytes)
    args = _inputs(bias=bias)
    for got, want in zip(_ours(*args), _reference(*args), strict=True):
        if want.dtype == torch.bool:
            assert torch.equal(got, want)
        else:
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert _ours(*args)[2][:5].all()  # the planted top-1 labels


def test_equals_trls_chunked_function():
    from trl.kernels import ChunkedLogProbFunction

    hidden, weight, bias, labels, upstream = _inputs(seed=1)
    h1, h2 = (hidden.detach().clone().requires_grad_() for _ in range(2))
    ours = lm_head.trl_compatible(h1, weight, bias, labels, ("log_probs", "entropy", "is_top1"))
    trl = ChunkedLogProbFunction.apply(h2, weight, bias, labels, 1.0, 32, None, 1.0, ("entropy", "is_top1"))
    (ours[0] * upstream).sum().backward()
    (trl[0] * upstream).sum().backward()
    assert torch.allclose(ours[0], trl[0], atol=1e-5)
    assert torch.allclose(ours[1], trl[1], atol=1e-5)
    assert torch.equal(ours[4], trl[4])
    assert ours[2] is None and ours[3] is None
    assert torch.allclose(h1.grad, h2.grad, atol=1e-5)


def test_what_it_does_not_cover_is_left_to_trl():
    w = torch.zeros(V, H)
    assert covers(w, None, 1.0, None, 1.0, ("log_probs", "entropy", "is_top1"))
    assert not covers(w.clone().requires_grad_(), None, 1.0, None, 1.0, ("log_probs",))  # a head that trains
    assert not covers(w, torch.zeros(V, requires_grad=True), 1.0, None, 1.0, ("log_probs",))
    assert not covers(w, None, 0.7, None, 1.0, ("log_probs",))  # temperature
    assert not covers(w, None, 1.0, 30.0, 1.0, ("log_probs",))  # soft-capping
    assert not covers(w, None, 1.0, None, 0.5, ("log_probs",))  # logit scale
    assert not covers(w, None, 1.0, None, 1.0, ("log_probs", "mean_logits"))


def test_a_trainable_head_still_gets_its_gradient_inside_compact_lm_head():
    """Full fine-tuning trains the (tied) head: inside the context TRL's function runs and the head's weight gets a
    gradient equal to the full-logits one."""
    import trl.trainer.utils as trl_utils

    from stages.common import compact_lm_head

    hidden, weight, bias, labels, upstream = _inputs(seed=2)
    w = weight.clone().requires_grad_()
    with compact_lm_head():
        logp = trl_utils._ChunkedLogProbFunction.apply(hidden, w, None, labels, 1.0, 64, None, 1.0, ("entropy",))[0]
    (logp * upstream).sum().backward()
    w_ref = weight.clone().requires_grad_()
    ref = torch.log_softmax(hidden.detach() @ w_ref.t(), -1).gather(-1, labels[:, None])[:, 0]
    (ref * upstream).sum().backward()
    assert torch.allclose(w.grad, w_ref.grad, atol=1e-5)
    assert trl_utils._ChunkedLogProbFunction.__name__ == "ChunkedLogProbFunction"  # restored on exit
