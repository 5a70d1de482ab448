"""Packed attention that pays only for each sequence's own block: `attn_implementation: sdpa_segments`.

Packing several sequences into one row removes padding, but the usual way of keeping them apart, a dense 4-D
block-diagonal mask, costs attention over the whole row (O(row²) time and memory) and sends PyTorch's SDPA down
its slow "math" path, because no fused kernel takes an arbitrary mask. This module registers an attention
implementation with transformers that reads the row's layout from its position ids instead and runs SDPA once per
sequence with `is_causal=True`, which takes the fused (flash) kernel on CPU and CUDA. Cost: each sequence's own
block, nothing across sequences; no mask is built at all.

The layout rule, from the position ids alone (no extra inputs to plumb through Trainer, PEFT or the model):
- A *run* is a maximal stretch of consecutive positions (p, p+1, p+2, ...). A run that starts at position 0 is a
  sequence: its tokens attend causally within the run.
- A run that starts at position p > 0 *branches* from the nearest earlier run that starts at 0 (its root): its
  tokens see the root's first p tokens and, causally, themselves. This is DPO's shared prompt: [prompt | chosen |
  rejected] with the rejected positions restarting at len(prompt) is exactly two sequences sharing a prefix, the
  prompt computed once (stages/dpo.py). Branch attention is one small SDPA call over [root prefix | branch] with a
  lower-right causal mask the size of that pair, never of the row.
Padding at the end of a row is given consecutive positions from 0, so it is one harmless run.

Everything else is plain SDPA (transformers' own `sdpa_attention_forward`): padded batches with a 2-D mask,
prebuilt 4-D masks, decoding with a KV cache. So `sdpa_segments` is a strict superset of `sdpa` and can load every
model align uses (training, scoring, generation).

Correctness is checked in tests/core/test_attention.py: packed == unpacked logits and gradients, and the DPO
branch layout == two separate sequences. Speed: bench/attention.py (dense mask vs segments vs flex_attention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from core.packing import SEGMENT_KERNEL as NAME


def runs_of(positions: list[int]) -> list[tuple[int, int, int, int]]:
    """(start, end, root, prefix) of each run of consecutive positions in one row: a run that begins at position 0
    has root == start and prefix 0; a branch sees `prefix` tokens of the run starting at `root` (module docstring)."""
    runs: list[tuple[int, int, int, int]] = []
    start, root, root_len = 0, 0, -1
    for t in range(1, len(positions) + 1):
        if t < len(positions) and positions[t] == positions[t - 1] + 1:
            continue
        p0 = positions[start]
        if p0 == 0:
            root, root_len = start, t - start
        elif root_len < p0:
            raise ValueError(
                f"packed position ids: a run starting at position {p0} (index {start}) has no earlier sequence "
                "with that many tokens to branch from"
            )
        runs.append((start, t, root, p0))
        start = t
    return runs


class _LayoutCache:
    """The row layouts of the last position-ids tensor seen: every layer of one forward gets the same tensor
    object, so the layout (and its one device-to-host copy) is computed once per forward, not once per layer."""

    def __init__(self):
        self.key: torch.Tensor | None = None
        self.layout: list[list[tuple[int, int, int, int]]] = []

    def get(self, position_ids: torch.Tensor, batch: int) -> list[list[tuple[int, int, int, int]]]:
        if position_ids is not self.key:
            rows = position_ids.expand(batch, -1).tolist()
            self.layout = [runs_of(r) for r in rows]
            self.key = position_ids
        return self.layout


_cache = _LayoutCache()


def _sdpa(q, k, v, dropout: float, scaling, is_causal: bool = False, mask=None):
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal, scale=scaling
    )


def segments_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # [B, H, L, D]
    key: torch.Tensor,  # [B, KV, L, D]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    position_ids = kwargs.get("position_ids")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    plain = (
        attention_mask is not None
        or not causal
        or query.shape[2] != key.shape[2]  # decoding or chunked prefill with a cache
        or kwargs.get("output_attentions", False)
        or kwargs.get("cache") is not None
    )
    if plain:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
        )
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    B, _, L, _ = query.shape
    layout = _cache.get(position_ids, B) if position_ids is not None else [[(0, L, 0, 0)]] * B
    if all(len(rows) == 1 for rows in layout):  # one whole sequence per row: one batched causal call
        out = _sdpa(query, key, value, dropout, scaling, is_causal=True)
        return out.transpose(1, 2).contiguous(), None
    window = getattr(module, "sliding_window", None) or kwargs.get("sliding_window")
    outs = []
    for b, rows in enumerate(layout):
        # split, not slice: the backward of a split is one concatenation; the backward of each slice would be a
        # zero tensor the size of the whole row (quadratic in the number of sequences)
        sizes = [end - start for start, end, _, _ in rows]
        qs, ks, vs = (x[b : b + 1].split(sizes, dim=2) for x in (query, key, value))
        index = {start: i for i, (start, _, _, _) in enumerate(rows)}
        pieces = []
        for i, (start, end, root, p) in enumerate(rows):
            if p == 0:
                if window is not None and end - start > window:
                    raise ValueError(
                        f"sdpa_segments: a packed sequence of {end - start} tokens is longer than the model's "
                        f"sliding window ({window}); use model.attn_implementation=sdpa"
                    )
                pieces.append(_sdpa(qs[i], ks[i], vs[i], dropout, scaling, is_causal=True))
                continue
            r = index[root]  # the root run: its first p tokens are the shared prefix
            k = torch.cat([ks[r][:, :, :p], ks[i]], dim=2)
            v = torch.cat([vs[r][:, :, :p], vs[i]], dim=2)
            n = end - start
            # lower-right causal: branch query j sees the p prefix keys and branch keys 0..j
            mask = (
                torch.arange(p + n, device=query.device)[None, :]
                <= (p + torch.arange(n, device=query.device))[:, None]
            )
            pieces.append(_sdpa(qs[i], k, v, dropout, scaling, mask=mask))
        outs.append(torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0])
    out = torch.cat(outs, dim=0) if B > 1 else outs[0]
    return out.transpose(1, 2).contiguous(), None


def segments_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
):
    """No mask when the attention function reads the layout from the position ids (no padding mask, no cache);
    otherwise the mask plain SDPA would get."""
    if attention_mask is None and q_length == kv_length and q_offset == 0 and kv_offset == 0:
        return None
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        attention_mask=attention_mask,
        **kwargs,
    )


AttentionInterface.register(NAME, segments_attention_forward)
AttentionMaskInterface.register(NAME, segments_mask)
