"""Token-weighted perplexity of a causal LM (or an adapter on one) on instruction data.

    PPL = exp( sum_i sum_{t in S_i} -log p(x_{i,t} | x_{i,<t}) / sum_i |S_i| )

where S_i is the set of scored positions of example i: its assistant tokens (scope="assistant") or every
token after the first (scope="all"). Weighting by tokens, not by examples, is what makes the number the
exponentiated cross-entropy of the data; per-example sums are returned too, for paired bootstrap tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from core.chat import neutralise_messages, render, render_text, special_strings
from core.models import input_device
from core.progress import steps
from data_schemas.records import PlainText
from lib.logprobs import input_logits, token_logprobs


@dataclass
class PerplexityResult:
    perplexity: float
    nll_sum: float
    tokens: int
    examples: int
    truncated: int
    per_example_nll: list[float]  # summed NLL per example
    per_example_tokens: list[int]

    def as_dict(self) -> dict:
        return {
            "perplexity": self.perplexity,
            "mean_nll": self.nll_sum / max(self.tokens, 1),
            "tokens": self.tokens,
            "examples": self.examples,
            "truncated_examples": self.truncated,
        }


def encode_for_scoring(tokenizer, conversations, scope: str, max_length: int) -> tuple[list[dict], int]:
    specials = special_strings(tokenizer)
    rows, truncated = [], 0
    for conv in conversations:
        if isinstance(conv, PlainText):  # a language-modelling example: every token is scored, either scope
            r = render_text(tokenizer, conv.text, max_length)
        else:
            msgs = neutralise_messages(conv.messages, specials)
            r = render(tokenizer, msgs, max_length, "right", assistant_only=(scope == "assistant"))
        truncated += int(r.truncated)
        if any(lbl != -100 for lbl in r.labels[1:]):
            rows.append({"input_ids": r.input_ids, "labels": r.labels})
    return rows, truncated


@torch.no_grad()
def sequence_nll(
    model, rows: list[dict], batch_size: int, pad_token_id: int, progress: str | None = None
) -> tuple[list[float], list[int]]:
    """Summed next-token NLL and scored-token count per row (rows: input_ids + labels, unshifted); `progress`:
    what a bar over the rows says (core.progress)."""
    model.eval()
    dev = input_device(model)
    nlls: list[float] = [0.0] * len(rows)
    counts: list[int] = [0] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))  # less padding per batch
    with steps(progress or "", len(rows), show=progress is not None) as advance:
        for b in range(0, len(order), batch_size):
            _nll_batch(model, rows, order[b : b + batch_size], pad_token_id, dev, nlls, counts)
            advance(len(order[b : b + batch_size]))
    return nlls, counts


def _nll_batch(model, rows, idx, pad_token_id, dev, nlls, counts) -> None:
    """Fill nlls[i], counts[i] for the rows `idx` (one right-padded batch)."""
    n = max(len(rows[i]["input_ids"]) for i in idx)
    ids = torch.full((len(idx), n), pad_token_id, dtype=torch.long)
    labels = torch.full((len(idx), n), -100, dtype=torch.long)
    att = torch.zeros((len(idx), n), dtype=torch.long)
    for j, i in enumerate(idx):
        k = len(rows[i]["input_ids"])
        ids[j, :k] = torch.as_tensor(rows[i]["input_ids"])
        labels[j, :k] = torch.as_tensor(rows[i]["labels"])
        att[j, :k] = 1
    logits = input_logits(model, ids.to(dev), att.to(dev))
    # logits [B, n, V] predict positions 1..n-1
    tgt = labels[:, 1:].to(dev)
    valid = tgt != -100
    tok_lp = token_logprobs(logits[:, :-1], tgt.clamp(min=0)) * valid
    for j, i in enumerate(idx):
        nlls[i] = float(-tok_lp[j].sum())
        counts[i] = int(valid[j].sum())


def perplexity(
    model,
    tokenizer,
    conversations,
    scope: str = "assistant",
    max_length: int = 512,
    batch_size: int = 8,
    progress: str | None = "perplexity",
) -> PerplexityResult:
    rows, truncated = encode_for_scoring(tokenizer, conversations, scope, max_length)
    nlls, counts = sequence_nll(model, rows, batch_size, tokenizer.pad_token_id, progress)
    total_nll, total_tok = sum(nlls), sum(counts)
    ppl = math.exp(total_nll / total_tok) if total_tok else float("nan")
    return PerplexityResult(ppl, total_nll, total_tok, len(rows), truncated, nlls, counts)
