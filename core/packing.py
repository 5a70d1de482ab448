"""Padding-free batches that are exact on every attention kernel: sequences packed into rows.

Several sequences share a row and position ids restart at 0 for each. What keeps them from seeing each other
depends on the attention implementation (`model.attn_implementation`):
- `sdpa_segments` (core/attention.py, the default) and `flash_attention_2` read the layout from the position ids
  and attend within each sequence only: no mask is built and all sequences go into one row, with no padding.
- `sdpa` and `eager` honour only a mask: a 4-D block-diagonal causal mask is built. Rows are then bounded by
  `max_row_tokens` because a dense mask costs attention over the whole row: one row of 16 x 300 tokens would pay
  attention over 4,800 positions, as much compute as all the linear layers together. First-fit decreasing keeps
  rows full.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def pack_rows(lengths: list[int], max_row_tokens: int) -> list[list[int]]:
    """Indices of sequences grouped into rows of at most max_row_tokens (a longer sequence gets its own row)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(max_row_tokens - lengths[i])
    return rows


# align's per-sequence kernel (core/attention.py): reads sequences, and branches off a shared prefix, from the
# position ids.
SEGMENT_KERNEL = "sdpa_segments"
# Attention implementations that keep packed sequences apart only through a dense mask.
DENSE_MASK_KERNELS = ("sdpa", "eager")
# Those that can run a shared-prefix branch (DPO's [prompt | chosen | rejected]); flash_attention_2 would read the
# branch as a new sequence without its prompt.
BRANCH_KERNELS = (SEGMENT_KERNEL, *DENSE_MASK_KERNELS)


def needs_dense_mask(attn_implementation: str) -> bool:
    """Whether packed rows need a 4-D block-diagonal mask with this attention implementation (see above)."""
    return attn_implementation in DENSE_MASK_KERNELS


def row_layout(lengths: list[int], max_row_tokens: int, dense_mask: bool) -> list[list[int]]:
    """Indices of sequences per row: rows of at most max_row_tokens under a dense mask (pack_rows), else all in
    one row (the per-sequence kernels pay nothing for a long row)."""
    return pack_rows(lengths, max_row_tokens) if dense_mask else [list(range(len(lengths)))]


@dataclass
class Packed:
    input_ids: torch.Tensor  # [R, L]
    position_ids: torch.Tensor  # [R, L]
    attention_mask: torch.Tensor | None  # [R, 1, L, L] bool, True = may attend; None without dense_mask
    rows: torch.Tensor  # [N] row of each sequence (in input order)
    starts: torch.Tensor  # [N] first position of each sequence in its row
    ends: torch.Tensor  # [N] last position of each sequence in its row
    real_tokens: int

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """input_ids and position_ids, with the attention mask where there is one."""
        mask = {} if self.attention_mask is None else {"attention_mask": self.attention_mask}
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, **mask}


def pack(seqs: list[list[int]], max_row_tokens: int, pad_id: int, dense_mask: bool = True) -> Packed:
    """Pack sequences into rows (row_layout). With dense_mask, rows of at most max_row_tokens (a longer sequence
    gets its own row) and their block-diagonal mask; without, every sequence in one row and no mask."""
    lengths = [len(s) for s in seqs]
    layout = row_layout(lengths, max_row_tokens, dense_mask)
    width = max(sum(lengths[i] for i in row) for row in layout)
    n_rows = len(layout)
    ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    # a row's padding gets consecutive positions from 0: one run of its own for the segment kernels
    pos = torch.arange(width).repeat(n_rows, 1)
    # padding positions attend to themselves only: a query row with nothing to attend to would make NaNs
    mask = torch.eye(width, dtype=torch.bool).repeat(n_rows, 1, 1) if dense_mask else None
    rows, starts, ends = [0] * len(seqs), [0] * len(seqs), [0] * len(seqs)
    for r, members in enumerate(layout):
        at = 0
        for i in members:
            n = lengths[i]
            ids[r, at : at + n] = torch.as_tensor(seqs[i])
            pos[r, at : at + n] = torch.arange(n)
            if mask is not None:
                mask[r, at : at + n, at : at + n] = torch.ones(n, n, dtype=torch.bool).tril()
            rows[i], starts[i], ends[i] = r, at, at + n - 1
            at += n
        pos[r, at:] = torch.arange(width - at)
    return Packed(
        ids,
        pos,
        None if mask is None else mask[:, None],
        torch.tensor(rows),
        torch.tensor(starts),
        torch.tensor(ends),
        sum(lengths),
    )


def common_prefix(seqs: list[list[int]]) -> int:
    """Length of the longest prefix every sequence shares, leaving each at least its last token of its own."""
    n = min(len(s) for s in seqs) - 1
    first = seqs[0]
    for k in range(n):
        if any(s[k] != first[k] for s in seqs[1:]):
            return k
    return max(n, 0)


def pack_shared_prefix(groups: list[list[list[int]]], pad_id: int) -> Packed:
    """Groups of sequences that share a prefix (a prompt and its K responses), in one row for `sdpa_segments`, each
    shared prefix computed once: a group is its first sequence whole, then every other sequence's tokens after
    the prefix, with positions continuing from the prefix length. The segment kernel reads each of those runs as a
    branch that sees the first sequence's prefix and itself (core/attention.py), exactly the computation of the
    sequences apart. `rows`/`starts`/`ends` index the sequences in input order (a branch's start is its first own
    token); `real_tokens` counts the tokens computed."""
    ids: list[int] = []
    pos: list[int] = []
    starts: list[int] = []
    ends: list[int] = []
    for seqs in groups:
        p = common_prefix(seqs) if len(seqs) > 1 else 0
        for j, s in enumerate(seqs):
            own = s if j == 0 else s[p:]
            first = 0 if j == 0 else p
            starts.append(len(ids))
            ids.extend(own)
            pos.extend(range(first, first + len(own)))
            ends.append(len(ids) - 1)
    n = len(starts)
    return Packed(
        torch.tensor([ids], dtype=torch.long),
        torch.tensor([pos], dtype=torch.long),
        None,
        torch.zeros(n, dtype=torch.long),
        torch.tensor(starts),
        torch.tensor(ends),
        len(ids),
    )
