"""Partial fine-tuning: which parameters train, when blocks unfreeze, and the layer-wise learning rates."""

from __future__ import annotations

import json

import pytest
import torch

from core.partial import apply_trainable, depth, param_groups, trainable_names, unfrozen_at
from data_schemas.config import PartialSettings, SFTConfig


def _llama(bias: bool = False, tied: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, attention_bias=bias, tie_word_embeddings=tied,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def test_depth_from_names():
    assert depth("model.layers.2.self_attn.q_proj.weight", 3) == 2
    assert depth("model.embed_tokens.weight", 3) == -1 and depth("model.norm.weight", 3) == 3


def test_each_selection_trains_what_it_names():
    m = _llama()
    top = trainable_names(m, PartialSettings(trainable="top_blocks", top_blocks=1))
    assert all(".layers.2." in n or n in {"model.norm.weight", "model.embed_tokens.weight"} for n in top)
    assert any(".layers.2." in n for n in top) and not any(".layers.1." in n for n in top)
    # tied: the head is the embedding matrix, so it trains with the head
    assert trainable_names(m, PartialSettings(trainable="head")) == {
        "model.norm.weight",
        "model.embed_tokens.weight",
    }
    untied = trainable_names(_llama(tied=False), PartialSettings(trainable="head"))
    assert untied == {"model.norm.weight", "lm_head.weight"}
    norms = trainable_names(m, PartialSettings(trainable="layernorm"))
    assert norms and all("norm" in n for n in norms) and len(norms) == 2 * 3 + 1
    with pytest.raises(ValueError, match="no bias terms"):
        trainable_names(m, PartialSettings(trainable="bias"))
    biases = trainable_names(_llama(bias=True), PartialSettings(trainable="bias"))
    assert biases and all(n.endswith(".bias") for n in biases)
    counts = apply_trainable(m, PartialSettings(trainable="head"))
    assert counts["trainable"] == 16 + 32 * 16 and counts["total"] == sum(p.numel() for p in m.parameters())
    assert [n for n, p in m.named_parameters() if p.requires_grad] == [
        "model.embed_tokens.weight",
        "model.norm.weight",
    ]


def test_unfreezing_schedule_steps():
    s = PartialSettings(trainable="head", unfreeze={"every_steps": 3, "blocks_per_step": 1})
    assert [unfrozen_at(k, s, 3) for k in (0, 2, 3, 5, 6, 9, 30)] == [0, 0, 1, 1, 2, 3, 3]
    m = _llama()
    apply_trainable(m, s, step=3)  # block 2 (the top) joins the head
    on = {n for n, p in m.named_parameters() if p.requires_grad}
    assert any(".layers.2." in n for n in on) and not any(".layers.1." in n for n in on)


def test_layerwise_rates():
    m = _llama()
    groups = param_groups(m, 1.0, 0.1, PartialSettings(layerwise_lr_decay=0.5))
    rate = {g["depth"]: g["lr"] for g in groups}
    assert rate == {
        0: 0.125,
        1: 0.25,
        2: 0.5,
        3: 1.0,
    }  # block i of 3: 0.5^(3 - i); head (and tied embeddings) 1.0
    assert all(g["weight_decay"] == 0.0 for g in groups if all(p.dim() == 1 for p in g["params"]))
    assert sum(len(g["params"]) for g in groups) == len(list(m.parameters()))
    frozen_now = param_groups(m, 1.0, 0.0, PartialSettings(trainable="head", unfreeze={"every_steps": 2}))
    assert sum(len(g["params"]) for g in frozen_now) == len(
        list(m.parameters())
    )  # ready for later unfreezing


def test_partial_needs_lora_off():
    with pytest.raises(ValueError, match="set lora.enabled=false"):
        SFTConfig(output_dir="x", data={"train_file": "t.jsonl"}, partial={"trainable": "head"})


def test_sft_unfreezes_from_the_top_at_the_right_steps(tmp_path, tiny_model_path):
    """head only for steps 0-1, the top block from step 2: after 4 steps block 1 (top of 2) and the head moved,
    block 0 did not."""
    from safetensors.torch import load_file

    from align.cli import main
    from tests.stages.test_sft_cli import BASE

    out = tmp_path / "sft"
    args = ["sft", "--config", "configs/sft.yaml", f"output_dir={out}", *BASE, "lora.enabled=false",
            "train.max_steps=4", "train.learning_rate=1e-2", "partial.trainable=head",
            "partial.unfreeze={every_steps: 2, blocks_per_step: 1}", "partial.layerwise_lr_decay=0.5"]  # fmt: skip
    assert main(args) == 0
    before = load_file(str(tiny_model_path / "model.safetensors"))
    after = load_file(str(out / "model" / "model.safetensors"))
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(".layers.1." in k for k in moved) and not any(".layers.0." in k for k in moved)
    assert "model.norm.weight" in moved
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
