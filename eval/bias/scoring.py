"""Scoring with the models' own likelihoods, in a context: plain text, the assistant's reply under the chat
template, or the assistant's answer when asked to choose. Rows that share a context run it once (its cached keys
and values copied to each continuation), equal to scoring each row whole within 1e-4 (tested)."""

from __future__ import annotations

import numpy as np
import torch

from core.chat import neutralise, neutralise_messages, render_prompt, special_strings
from core.models import is_prompt_learning
from lib.logprobs import input_logits, token_logprobs

CONTEXTS = ("text", "chat", "choice")


Row = tuple[list[int], list[int]]  # (context token ids, continuation token ids)


def text_rows(tokenizer, contexts: list[str], continuations: list[str]) -> list[Row]:
    """Plain text: the continuation after its context (or after a BOS/EOS token when the context is empty, so the
    first word is scored too)."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    specials = special_strings(tokenizer)
    rows = []
    for c, x in zip(contexts, continuations, strict=True):
        # benchmark text is data: a control-token string inside it must not become a control token
        c, x = neutralise(c, specials), neutralise(x, specials)
        ctx = [start] + (tokenizer(c, add_special_tokens=False)["input_ids"] if c else [])
        rows.append((ctx, tokenizer((" " if c else "") + x, add_special_tokens=False)["input_ids"]))
    return rows


def chat_rows(tokenizer, prompts: list[str], replies: list[str]) -> list[Row]:
    """The deployment context: `prompt` as the user's turn under the model's own chat template, `reply` as the
    assistant's answer (its content tokens; the end-of-turn marker is the same for every candidate reply)."""
    specials = special_strings(tokenizer)
    rows = []
    for p, x in zip(prompts, replies, strict=True):
        ctx = render_prompt(tokenizer, neutralise_messages([{"role": "user", "content": p}], specials))
        rows.append((ctx, tokenizer(neutralise(x, specials), add_special_tokens=False)["input_ids"]))
    return rows


@torch.no_grad()
def score_rows(model, tokenizer, rows: list[Row], batch_size: int = 16) -> tuple[list[float], list[int]]:
    """(sum of log p(continuation tokens | context), continuation token count) per row, log-probs in fp32.

    Rows that share a context (every minimal pair after the same chat prompt, the three answers of a BBQ question)
    run that context once: its keys and values are cached and copied to each continuation (`score_shared`). Rows
    with contexts of their own run whole, in length-sorted batches (`score_whole`)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, _) in enumerate(rows):
        groups.setdefault(tuple(ctx), []).append(i)
    # a virtual-token adapter must see its tokens before every context: no cache built without them is reused
    shared = [] if is_prompt_learning(model) else [i for g in groups.values() if len(g) > 1 for i in g]
    sums, counts = [0.0] * len(rows), [0] * len(rows)
    alone = sorted(set(range(len(rows))) - set(shared))
    for part, fn in ((alone, score_whole), (shared, score_shared)):
        if part:
            s, n = fn(model, tokenizer, [rows[i] for i in part], batch_size)
            for i, x, k in zip(part, s, n, strict=True):
                sums[i], counts[i] = x, k
    return sums, counts


@torch.no_grad()
def score_whole(model, tokenizer, rows: list[Row], batch_size: int = 16) -> tuple[list[float], list[int]]:
    """Each row as one sequence, right-padded, in length-sorted batches."""
    model.eval()
    sums, counts = [0.0] * len(rows), [0] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    dev = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        n = max(len(rows[i][0]) + len(rows[i][1]) for i in idx)
        ids = torch.full((len(idx), n), pad, dtype=torch.long)
        att = torch.zeros((len(idx), n), dtype=torch.long)
        for j, i in enumerate(idx):
            s = rows[i][0] + rows[i][1]
            ids[j, : len(s)] = torch.tensor(s)
            att[j, : len(s)] = 1
        logits = input_logits(model, ids.to(dev), att.to(dev))
        nxt = torch.zeros_like(ids)
        nxt[:, :-1] = ids[:, 1:]  # logits at t-1 predict token t
        lp = token_logprobs(logits, nxt.to(dev)).cpu()  # [B, n]: log p of each next token, fp32 row by row
        for j, i in enumerate(idx):
            ctx, cont = rows[i]
            sums[i] = float(lp[j, len(ctx) - 1 : len(ctx) - 1 + len(cont)].sum())
            counts[i] = len(cont)
    return sums, counts


@torch.no_grad()
def score_shared(model, tokenizer, rows: list[Row], batch_size: int = 16) -> tuple[list[float], list[int]]:
    """Rows grouped by context: a batch holds up to `batch_size` continuations of a few contexts. The contexts run
    once, left-padded so that each ends at the last column (only the last position's logits are computed), and
    their cached keys/values are copied to each continuation's row (`reorder_cache`); the continuations run on
    top, right-padded. Left padding shifts a context's absolute positions by a constant, which rotary position
    embeddings do not see (attention depends on relative positions), so the scores equal `score_whole`'s."""
    model.eval()
    dev = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    by_ctx: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, _) in enumerate(rows):
        by_ctx.setdefault(tuple(ctx), []).append(i)
    units = [
        (ctx, idx[k : k + batch_size]) for ctx, idx in by_ctx.items() for k in range(0, len(idx), batch_size)
    ]
    units.sort(key=lambda u: len(u[0]))
    batches, cur = [], []
    for u in units:
        if cur and sum(len(x[1]) for x in cur) + len(u[1]) > batch_size:
            batches.append(cur)
            cur = []
        cur.append(u)
    if cur:
        batches.append(cur)
    sums, counts = [0.0] * len(rows), [0] * len(rows)
    for batch in batches:
        width = max(len(c) for c, _ in batch)
        ctx_ids = torch.tensor([[pad] * (width - len(c)) + list(c) for c, _ in batch], device=dev)
        ctx_att = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c, _ in batch], device=dev)
        out = model(input_ids=ctx_ids, attention_mask=ctx_att, use_cache=True, logits_to_keep=1)
        which = [u for u, (_, idx) in enumerate(batch) for _ in idx]
        members = [i for _, idx in batch for i in idx]
        cache = out.past_key_values
        cache.reorder_cache(torch.tensor(which, device=dev))
        n = max(max(len(rows[i][1]) for i in members), 1)
        ids = torch.full((len(members), n), pad, dtype=torch.long)
        att = torch.zeros((len(members), n), dtype=torch.long)
        for j, i in enumerate(members):
            cont = rows[i][1]
            ids[j, : len(cont)] = torch.tensor(cont, dtype=torch.long)
            att[j, : len(cont)] = 1
        ids, att = ids.to(dev), att.to(dev)
        logits = model(
            input_ids=ids, attention_mask=torch.cat([ctx_att[which], att], dim=1), past_key_values=cache
        ).logits
        nxt = torch.zeros_like(ids)
        nxt[:, :-1] = ids[:, 1:]
        lp = token_logprobs(logits, nxt).cpu()  # [R, n]: position t predicts continuation token t + 1
        # log p(continuation token 0 | context): the context's last position predicts it
        head = token_logprobs(out.logits[which][:, -1:], ids[:, :1])[:, 0].cpu()
        for j, i in enumerate(members):
            k = len(rows[i][1])
            sums[i] = float(head[j] + lp[j, : k - 1].sum()) if k else 0.0
            counts[i] = k
    return sums, counts


def continuation_logprobs(
    model, tokenizer, contexts: list[str], continuations: list[str], batch_size: int = 16
) -> tuple[list[float], list[int]]:
    """Plain-text scores: (sum of log p(continuation | context), token count) per item."""
    return score_rows(model, tokenizer, text_rows(tokenizer, contexts, continuations), batch_size)


def _rows(tokenizer, context: str, prompts: list[str], continuations: list[str]) -> list[Row]:
    if context == "chat":
        return chat_rows(tokenizer, prompts, continuations)
    return text_rows(tokenizer, prompts, continuations)


def score_pairs(
    model,
    tokenizer,
    pairs: list[dict],
    batch_size: int = 16,
    context: str = "text",
    prompt: str = "",
    choice_prompt: str = "",
) -> list[float]:
    """Per pair: log p(stereotyping sentence) - log p(other sentence), > 0 when the model prefers the stereotype.
    text: the sentences alone; chat: each as the assistant's reply to the neutral user `prompt`; choice: each as the
    assistant's reply to `choice_prompt` showing both sentences, the mean over the two orders they can be shown in
    (a model that prefers the first or the second position moves both sentences alike)."""
    n = len(pairs)
    if context == "choice":
        shown = [choice_prompt.format(a=p["stereo"], b=p["anti"]) for p in pairs]
        shown += [choice_prompt.format(a=p["anti"], b=p["stereo"]) for p in pairs]
        replies = [p["stereo"] for p in pairs] * 2 + [p["anti"] for p in pairs] * 2
        lp, _ = score_rows(model, tokenizer, chat_rows(tokenizer, shown * 2, replies), batch_size)
        return [(lp[i] - lp[2 * n + i] + lp[n + i] - lp[3 * n + i]) / 2 for i in range(n)]
    texts = [p["stereo"] for p in pairs] + [p["anti"] for p in pairs]
    rows = _rows(tokenizer, context, [prompt if context == "chat" else ""] * len(texts), texts)
    lp, _ = score_rows(model, tokenizer, rows, batch_size)
    return [lp[i] - lp[n + i] for i in range(n)]


def bbq_prompt(e: dict, context: str) -> str:
    """text: context, question and 'Answer:'; chat: the user asks the question and lists the options."""
    if context == "chat":
        options = "\n".join(f"- {a}" for a in e["answers"])
        return f"{e['context']}\n{e['question']}\nOptions:\n{options}\nAnswer with one of the options."
    return f"{e['context']} {e['question']}\nAnswer:"


def score_bbq(
    model, tokenizer, examples: list[dict], batch_size: int = 16, context: str = "text"
) -> list[int]:
    """The chosen answer index per example: highest mean per-token log-likelihood of the answer."""
    ctx, cont = [], []
    for e in examples:
        for a in e["answers"]:
            ctx.append(bbq_prompt(e, context))
            cont.append(a)
    lp, n = score_rows(model, tokenizer, _rows(tokenizer, context, ctx, cont), batch_size)
    per = [x / max(k, 1) for x, k in zip(lp, n, strict=True)]
    return [int(np.argmax(per[3 * i : 3 * i + 3])) for i in range(len(examples))]


def counterfactual_logprobs(
    model, tokenizer, probes: list[dict], batch_size: int = 16, context: str = "text"
) -> list[list[float]]:
    """Per counterfactual probe: mean per-token log-likelihood of its response under each prompt variant (chat:
    the variant is the user's turn and the response the assistant's reply)."""
    ctx, cont, where = [], [], []
    for i, p in enumerate(probes):
        for v in p["variants"]:
            ctx.append(v)
            cont.append(p["response"])
            where.append(i)
    lp, n = score_rows(model, tokenizer, _rows(tokenizer, context, ctx, cont), batch_size)
    out: list[list[float]] = [[] for _ in probes]
    for i, x, k in zip(where, lp, n, strict=True):
        out[i].append(x / max(k, 1))
    return out
