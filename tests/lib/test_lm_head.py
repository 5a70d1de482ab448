"""lib/lm_head.py: per-token log-probabilities (and TRL's optional outputs) through a frozen head, with the
gradient computed in the forward, equal the full-logits computation and TRL's chunked function; what it does not
cover goes to TRL's function."""

from __future__ import annotations

import pytest
import torch

import lib.lm_head as lm_head
from lib.lm_head import OUTPUTS, LabelledLogProbs, covers, labelled_logprobs

N, H, V = 37, 24, 101


def _inputs(seed: int = 0, bias: bool = False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.7
    b = torch.randn(V, generator=g) if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[:5] = (hidden[:5] @ weight.t() + (0 if b is None else b)).argmax(
        -1
    )  # some labels are the top-1 token
    upstream = torch.randn(N, generator=g)
    return hidden, weight, b, labels, upstream


def _reference(hidden, weight, bias, labels, upstream):
    """Every output from the full [N, V] logits, the gradient by autograd."""
    h = hidden.clone().requires_grad_()
    z = h @ weight.t() + (0 if bias is None else bias)
    logp_all = torch.log_softmax(z, -1)
    logp = logp_all.gather(-1, labels[:, None])[:, 0]
    (logp * upstream).sum().backward()
    p = logp_all.exp().detach()
    extra = {
        "entropy": -(p * logp_all.detach()).sum(-1),
        "log_sum_sq_probs": (p * p).sum(-1).log(),
        "mean_logits": z.detach().mean(-1),
        "is_top1": z.argmax(-1) == labels,
    }
    return logp.detach(), extra, h.grad


def _ours(hidden, weight, bias, labels, upstream):
    h = hidden.clone().requires_grad_()
    logp, *rest = LabelledLogProbs.apply(h, weight, bias, labels, OUTPUTS)
    (logp * upstream).sum().backward()
    return logp.detach(), dict(zip(OUTPUTS, rest, strict=True)), h.grad


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_bytes", [lm_head.CHUNK_BYTES, 4 * V * 5])  # one chunk; chunks of 5 tokens
def test_equals_the_full_logits_computation(monkeypatch, bias, chunk_bytes):
    monkeypatch.setattr(lm_head, "CHUNK_BYTES", chunk_bytes)
    args = _inputs(bias=bias)
    (logp, extra, grad), (ref_logp, ref_extra, ref_grad) = _ours(*args), _reference(*args)
    assert torch.allclose(logp, ref_logp, atol=1e-5)
    assert torch.allclose(grad, ref_grad, atol=1e-5)
    for k in ("entropy", "log_sum_sq_probs", "mean_logits"):
        assert torch.allclose(extra[k], ref_extra[k], atol=1e-5), k
    assert torch.equal(extra["is_top1"], ref_extra["is_top1"]) and extra["is_top1"][:5].all()


def test_only_the_outputs_asked_for_are_computed():
    hidden, weight, _, labels, _ = _inputs()
    logp, entropy, sq, mean, top1 = LabelledLogProbs.apply(hidden, weight, None, labels, ("is_top1",))
    assert logp.shape == (N,) and top1.shape == (N,) and entropy is None and sq is None and mean is None


def test_equals_trls_chunked_function():
    from trl.kernels import ChunkedLogProbFunction

    hidden, weight, bias, labels, upstream = _inputs(seed=1, bias=True)
    h1, h2 = (hidden.clone().requires_grad_() for _ in range(2))
    ours = labelled_logprobs(h1, weight, bias, labels, 1.0, 32, None, 1.0, OUTPUTS)
    trl = ChunkedLogProbFunction.apply(h2, weight, bias, labels, 1.0, 32, None, 1.0, OUTPUTS)
    (ours[0] * upstream).sum().backward()
    (trl[0] * upstream).sum().backward()
    for k, (a, b) in enumerate(zip(ours, trl, strict=True)):
        assert torch.equal(a, b) if a.dtype == torch.bool else torch.allclose(a, b, atol=1e-5), k
    assert torch.allclose(h1.grad, h2.grad, atol=1e-5)


def test_what_it_does_not_cover_is_left_to_trl(monkeypatch):
    w = torch.zeros(V, H)
    assert covers(w, None, 1.0, None, 1.0)
    assert not covers(w.clone().requires_grad_(), None, 1.0, None, 1.0)  # a head that trains
    assert not covers(w, torch.zeros(V, requires_grad=True), 1.0, None, 1.0)
    assert not covers(w, None, 0.7, None, 1.0)  # temperature
    assert not covers(w, None, 1.0, 30.0, 1.0)  # soft-capping
    assert not covers(w, None, 1.0, None, 0.5)  # logit scale
    # and a scaled head really goes to TRL's function, with TRL's numbers
    calls = []
    monkeypatch.setattr(LabelledLogProbs, "apply", lambda *a: calls.append(a))
    hidden, weight, _, labels, _ = _inputs(seed=3)
    got = labelled_logprobs(hidden, weight, None, labels, 0.7, 32, None, 1.0, ())[0]
    ref = torch.log_softmax(hidden @ weight.t() / 0.7, -1).gather(-1, labels[:, None])[:, 0]
    assert not calls and torch.allclose(got, ref, atol=1e-5)


def test_a_trainable_head_still_gets_its_gradient_inside_compact_lm_head():
    """Full fine-tuning trains the (tied) head: inside the context TRL's function runs and the head's weight gets a
    gradient equal to the full-logits one."""
    import trl.trainer.utils as trl_utils

    from lib.trainer import compact_lm_head

    hidden, weight, _, labels, upstream = _inputs(seed=2)
    w = weight.clone().requires_grad_()
    with compact_lm_head():
        logp = trl_utils._ChunkedLogProbFunction.apply(
            hidden, w, None, labels, 1.0, 64, None, 1.0, ("entropy",)
        )[0]
    (logp * upstream).sum().backward()
    w_ref = weight.clone().requires_grad_()
    ref = torch.log_softmax(hidden @ w_ref.t(), -1).gather(-1, labels[:, None])[:, 0]
    (ref * upstream).sum().backward()
    assert torch.allclose(w.grad, w_ref.grad, atol=1e-5)
    assert trl_utils._ChunkedLogProbFunction.__name__ == "ChunkedLogProbFunction"  # restored on exit
