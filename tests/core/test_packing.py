"""core/packing.py: groups that share a prompt are packed with the prompt computed once, and a reward model reads
the same rewards and gradients from that layout as from each sequence alone."""

import pytest
import torch

import core.attention  # noqa: F401 (registers sdpa_segments)
from core.attention import runs_of
from core.packing import common_prefix, pack_shared_prefix


def test_common_prefix_leaves_every_sequence_a_token_of_its_own():
    assert common_prefix([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3, 9]]) == 2
    assert common_prefix([[1, 2, 3], [1, 2, 3, 4]]) == 2  # the shorter keeps its last token
    assert common_prefix([[1, 2], [1, 2]]) == 1
    assert common_prefix([[7], [7, 8]]) == 0
    assert common_prefix([[1, 2], [3, 4]]) == 0


def test_layout_hand_computed():
    p = pack_shared_prefix([[[1, 2, 3, 4], [1, 2, 5]], [[6, 7]]], pad_id=0)
    # group 1: [1 2 3 4] whole, then [5] branching at position 2; group 2 whole from position 0
    assert p.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 2, 0, 1]]
    assert p.attention_mask is None and p.real_tokens == 7
    assert p.rows.tolist() == [0, 0, 0] and p.starts.tolist() == [0, 4, 5] and p.ends.tolist() == [3, 4, 6]
    # the segment kernel reads the branch off the first sequence's two-token prefix
    assert runs_of(p.position_ids[0].tolist()) == [(0, 4, 0, 0), (4, 5, 0, 2), (5, 7, 5, 0)]


def _reward_model(tiny_model_path):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    m = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_path, num_labels=1, dtype=torch.float32, attn_implementation="sdpa_segments"
    )
    m.config.pad_token_id = 0
    return m


@pytest.mark.parametrize("collate", ["shared_prefix", "dense"])
def test_reward_groups_packed_equal_each_sequence_alone(tiny_model_path, tokenizer, collate):
    """Rewards and gradients of K-wise groups through GroupCollator equal each (prompt, response) scored alone."""
    from core.chat import render
    from lib.reward_model import GroupCollator, sequence_rewards

    def seq(prompt, reply):
        conv = [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
        return render(tokenizer, conv, 256).input_ids

    groups = [
        {
            "seqs": [
                seq("Tell me about tea.", r)
                for r in ("Tea is a drink.", "No.", "Tea grows on bushes, mostly.")
            ]
        },
        {"seqs": [seq("Hi", "Hello!"), seq("Hi", "Hello there, friend!")]},
    ]
    for g in groups:
        g["tiers"] = [[i] for i in range(len(g["seqs"]))]
    model = _reward_model(tiny_model_path)
    if collate == "dense":
        model.config._attn_implementation = "sdpa"
    batch = GroupCollator(dense_mask=collate == "dense", shared_prefix=collate == "shared_prefix")(groups)
    if collate == "shared_prefix":  # the prompts really are computed once
        alone_tokens = sum(len(s) for g in groups for s in g["seqs"])
        assert batch["input_ids"].shape[1] < alone_tokens
    packed = sequence_rewards(model, batch)
    packed.sum().backward()
    g_packed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    alone = []
    for g in groups:
        for s in g["seqs"]:
            one = GroupCollator(dense_mask=False)([{"seqs": [s], "tiers": [[0]]}])
            alone.append(sequence_rewards(model, one))
    torch.cat(alone).sum().backward()
    assert torch.allclose(packed, torch.cat(alone).detach(), atol=1e-5)
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(g_packed[n], p.grad, atol=1e-5), n
