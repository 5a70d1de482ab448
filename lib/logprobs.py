"""Per-token log-probabilities: the one copy every stage and gate computes them with.

For logits z over a vocabulary of V at a position and its target y:

    log p(y) = z_y - logsumexp(z);      entropy H = logsumexp(z) - sum_v softmax(z)_v z_v

always in fp32, a row (or a chunk of positions) at a time, so the full-vocabulary fp32 log-softmax of a whole batch
(B x n x 150k x 4 bytes: gigabytes at 1k tokens) is never built.

- `token_logprobs(logits, targets)`: from logits the model already computed (perplexity, bias scoring, DPO's KL).
- `head_logprobs(hidden, lm_head, targets)`: from hidden states, running the LM head only where a token is predicted
  (PPO's policy and reference forwards), with the entropy.
- `input_logits`, `response_logprob`: the forwards around them.
Training through a frozen LM head has its own function with the gradient computed in the forward
(lib/lm_head.py), which TRL's SFT and DPO trainers call.
"""

from __future__ import annotations

import torch

LOGIT_CHUNK = 512  # positions per LM-head chunk in head_logprobs: [chunk x vocabulary] fp32 logits at once


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) at every position: logits [B, n, V] (any dtype), targets [B, n] -> [B, n] fp32, one row at a
    time."""
    out = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
    for j in range(logits.shape[0]):
        z = logits[j].float()  # [n, V]
        out[j] = z.gather(-1, targets[j].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, -1)
    return out


def head_logprobs(
    hidden: torch.Tensor, lm_head, targets: torch.Tensor, chunk: int = LOGIT_CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target), entropy), each [N], from hidden states [N, H] through `lm_head`, `chunk` positions at a time
    in fp32. Differentiable in `hidden` (and the head)."""
    logprobs, entropy = [], []
    for hc, yc in zip(hidden.split(chunk), targets.split(chunk), strict=True):
        z = lm_head(hc).float()  # [c, V]
        lse = torch.logsumexp(z, -1)
        logprobs.append(z.gather(-1, yc.unsqueeze(-1)).squeeze(-1) - lse)
        entropy.append(lse - (torch.softmax(z, -1) * z).sum(-1))
    return torch.cat(logprobs), torch.cat(entropy)


def input_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The logits at the input's own positions [B, n, V]. Prompt and P-tuning adapters (PEFT) put their virtual
    tokens before the input, so their logits are longer by that many; those positions are dropped."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return logits[:, -input_ids.shape[1] :]


def response_logprob(model, prompt_ids: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
    """log p(response | prompt), summed over the response's tokens: prompt_ids [1, P], response [1, R] -> scalar."""
    full = torch.cat([prompt_ids, response], dim=1)
    logits = input_logits(model, full, torch.ones_like(full))[
        :, prompt_ids.shape[1] - 1 : -1
    ]  # predicts response
    return token_logprobs(logits, response).sum()
