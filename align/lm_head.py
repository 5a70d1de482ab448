"""Per-token log-probabilities through a frozen LM head, with the gradient computed in the forward pass.

For a hidden state h (one labelled position), the head's logits z = W h (+ b) over a vocabulary of V, and the
label y:

    log p(y | h) = z_y - logsumexp(z)
    d log p(y | h) / dh = W_y - sum_v p_v W_v = -(p - onehot(y))^T W
    entropy H = logsumexp(z) - sum_v p_v z_v;     top-1: argmax_v z_v == y

The gradient is a row of H elements per token and does not depend on the upstream gradient except through one
scalar factor, so it is computed in the forward, chunk by chunk, while the chunk's probabilities are at hand; the
backward only scales the stored rows (the fused linear cross-entropy of Liger-Kernel, Hsu et al. 2024). The head's
matrix product runs twice per token (logits, then the gradient), where TRL's chunked function
(`trl.kernels.ChunkedLogProbFunction`) runs it three times, because its backward recomputes the logits; and each
[tokens x vocabulary] chunk is passed over about six times here, against about twenty-five in TRL's torch fallback
(it applies logit scale and temperature as separate passes, and builds the one-hot and its gradient in fresh
tensors). Measured in bench/sft_throughput.py (docs/benchmarks.md).

What it does not cover, and then TRL's function runs instead (`stages.common.compact_lm_head` chooses): a head
that trains (its weight gradient needs every probability again), logit soft-capping, a logit scale or
temperature other than 1, and outputs other than log-probabilities, entropy and top-1. The entropy it returns is
for logging: no gradient flows through it. On devices with Triton, TRL's one-pass kernel runs.

Memory: one chunk of [tokens x vocabulary] logits and one of probabilities (at most `CHUNK_BYTES` each), and the
stored gradient rows, [labelled tokens x hidden] in fp32.
"""

from __future__ import annotations

import torch

CHUNK_BYTES = 128 * 2**20  # per [tokens x vocabulary] fp32 buffer


class LabelledLogProbs(torch.autograd.Function):
    """(hidden [N, H], weight [V, H], bias [V] | None, labels [N], want_entropy) -> (log p [N], entropy [N] | None,
    is_top1 [N] | None). Differentiable in `hidden` only."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, want_entropy: bool, want_top1: bool):
        n, vocab = hidden.shape[0], weight.shape[0]
        dev = hidden.device
        dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else hidden.dtype
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        need_grad = ctx.needs_input_grad[0]
        logp = torch.empty(n, device=dev, dtype=torch.float32)
        entropy = torch.empty(n, device=dev, dtype=torch.float32) if want_entropy else None
        top1 = torch.empty(n, device=dev, dtype=torch.bool) if want_top1 else None
        dlogp_dh = torch.empty(n, hidden.shape[1], device=dev, dtype=torch.float32) if need_grad else None
        step = max(1, CHUNK_BYTES // (4 * vocab))
        for s in range(0, n, step):
            e = min(n, s + step)
            lab = labels[s:e, None]
            z = hidden[s:e].to(dtype) @ w.t()  # [c, V]
            if b is not None:
                z += b
            z = z.float()
            best, arg = z.max(-1, keepdim=True)  # one pass: the maximum and the first index that holds it
            if top1 is not None:
                top1[s:e] = arg[:, 0] == lab[:, 0]
            target = z.gather(-1, lab) - best  # [c, 1]
            z.sub_(best)  # z - max: exp cannot overflow
            p = torch.exp(z)
            total = p.sum(-1, keepdim=True)
            lse = total.log()
            logp[s:e] = (target - lse)[:, 0]
            if entropy is not None:  # H = lse - sum p z / sum p, the dot product without a [c, V] temporary
                pz = torch.bmm(p.unsqueeze(1), z.unsqueeze(2))[:, 0]
                entropy[s:e] = (lse - pz / total)[:, 0]
            if dlogp_dh is not None:
                p.div_(total)
                p.scatter_add_(-1, lab, torch.full_like(target, -1.0))  # p - onehot(y)
                dlogp_dh[s:e] = torch.mm(p.to(dtype), w).float().neg_()
        ctx.save_for_backward(dlogp_dh)
        ctx.hidden_dtype = hidden.dtype
        ctx.mark_non_differentiable(*(x for x in (entropy, top1) if x is not None))
        ctx.set_materialize_grads(False)
        return logp, entropy, top1

    @staticmethod
    def backward(ctx, grad_logp, *_):
        (dlogp_dh,) = ctx.saved_tensors
        if grad_logp is None or dlogp_dh is None:
            return None, None, None, None, None, None
        return (grad_logp.float()[:, None] * dlogp_dh).to(ctx.hidden_dtype), None, None, None, None, None


FAST_OUTPUTS = {"log_probs", "entropy", "is_top1"}


def covers(weight, bias, temperature: float, softcap, logit_scale: float, outputs) -> bool:
    """Whether LabelledLogProbs computes what TRL's ChunkedLogProbFunction would be asked for (module docstring)."""
    frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
    return (
        frozen
        and temperature == 1.0
        and softcap is None
        and logit_scale == 1.0
        and set(outputs) <= FAST_OUTPUTS
    )


def trl_compatible(hidden, weight, bias, labels, outputs) -> tuple:
    """TRL's five per-token outputs (log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)."""
    logp, entropy, top1 = LabelledLogProbs.apply(
        hidden, weight, bias, labels, "entropy" in outputs, "is_top1" in outputs
    )
    return logp, entropy, None, None, top1
