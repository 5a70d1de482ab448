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

It returns TRL's optional per-token outputs too (entropy, log sum p^2, the mean logit, top-1), for logging and
weighting: no gradient flows through them (TRL's SFT and DPO trainers detach the entropy, the only one TRL's function
differentiates). What it does not cover, and then TRL's function runs instead (`labelled_logprobs` chooses): a
head that trains (its weight gradient needs every probability again), logit soft-capping, a logit scale or a
temperature other than 1. On devices with Triton, TRL's one-pass kernel runs. Used by SFT
(`lib.trainer.compact_lm_head`) and DPO (`stages.dpo.shared_prefix_forward`).

Memory: one chunk of [tokens x vocabulary] logits and one of probabilities (at most `CHUNK_BYTES` each), and the
stored gradient rows, [labelled tokens x hidden] in fp32.
"""

from __future__ import annotations

import torch

CHUNK_BYTES = 128 * 2**20  # per [tokens x vocabulary] fp32 buffer


OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")  # TRL's optional outputs, in its order


class LabelledLogProbs(torch.autograd.Function):
    """(hidden [N, H], weight [V, H], bias [V] | None, labels [N], outputs) -> log p [N] and TRL's four optional
    per-token outputs (entropy, log sum p^2, mean logit, is_top1; None where not in `outputs`). Differentiable in
    `hidden` through log p only: the others are for logging and weighting, as TRL's trainers use them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, outputs: tuple[str, ...]):
        n, vocab = hidden.shape[0], weight.shape[0]
        dev = hidden.device
        dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else hidden.dtype
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        need_grad = ctx.needs_input_grad[0]

        def vec(name: str, kind=torch.float32):
            return torch.empty(n, device=dev, dtype=kind) if name in outputs else None

        entropy, sq, top1 = vec("entropy"), vec("log_sum_sq_probs"), vec("is_top1", torch.bool)
        logp = torch.empty(n, device=dev, dtype=torch.float32)
        mean = None
        if "mean_logits" in outputs:  # the mean over the vocabulary of W h + b is (mean of W) h + mean of b
            mean = (hidden.to(dtype) @ w.float().mean(0).to(dtype)).float() + (
                0.0 if b is None else b.float().mean()
            )
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
            # dot products over the vocabulary as batched matrix products: no [c, V] temporaries
            if entropy is not None:  # H = lse - sum p z / sum p
                entropy[s:e] = (lse - torch.bmm(p.unsqueeze(1), z.unsqueeze(2))[:, 0] / total)[:, 0]
            if sq is not None:  # log sum (p / total)^2
                sq[s:e] = (torch.bmm(p.unsqueeze(1), p.unsqueeze(2))[:, 0].log() - 2 * lse)[:, 0]
            if dlogp_dh is not None:
                p.div_(total)
                p.scatter_add_(-1, lab, torch.full_like(target, -1.0))  # p - onehot(y)
                dlogp_dh[s:e] = torch.mm(p.to(dtype), w).float().neg_()
        ctx.save_for_backward(dlogp_dh)
        ctx.hidden_dtype = hidden.dtype
        ctx.mark_non_differentiable(*(x for x in (entropy, sq, mean, top1) if x is not None))
        ctx.set_materialize_grads(False)
        return logp, entropy, sq, mean, top1

    @staticmethod
    def backward(ctx, grad_logp, *_):
        (dlogp_dh,) = ctx.saved_tensors
        if grad_logp is None or dlogp_dh is None:
            return None, None, None, None, None
        return (grad_logp.float()[:, None] * dlogp_dh).to(ctx.hidden_dtype), None, None, None, None


def covers(weight, bias, temperature: float, softcap, logit_scale: float) -> bool:
    """Whether LabelledLogProbs computes what TRL's ChunkedLogProbFunction would be asked for (module docstring)."""
    frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
    return frozen and temperature == 1.0 and softcap is None and logit_scale == 1.0


def labelled_logprobs(hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs):
    """TRL's `ChunkedLogProbFunction.apply`, same arguments (by position) and five outputs: align's function where
    it applies and Triton does not run (module docstring), TRL's otherwise."""
    from trl.kernels import ChunkedLogProbFunction
    from trl.kernels.chunked_logprob import _use_triton

    if not _use_triton(hidden.device) and covers(weight, bias, temperature, softcap, logit_scale):
        return LabelledLogProbs.apply(hidden, weight, bias, targets, tuple(outputs))
    return ChunkedLogProbFunction.apply(
        hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, tuple(outputs)
    )
