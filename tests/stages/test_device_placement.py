"""Every tensor of the PPO, DPO and reward code paths lives on the model's device, checked without a GPU.

The models are built on the `meta` device: PyTorch refuses any operation that mixes a meta tensor with a CPU one
("Tensor on device cpu is not on the expected device meta"), so a tensor created on the CPU where the model is
elsewhere (the bug a CUDA run would hit) fails here exactly as it would there. Meta tensors have shapes but no
values, so these are the tensor paths (forward passes, losses, backward), not the sampling loops; those run on CUDA
in scripts/gpu_smoke.sh.
"""

from __future__ import annotations

import pytest
import torch

META = torch.device("meta")


def _tiny_config():
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, pad_token_id=0,
    )  # fmt: skip
    cfg._attn_implementation = "eager"  # sdpa's mask shortcut reads values (.item()), which meta tensors lack
    return cfg


def _meta_policy():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    with META:
        model = LlamaForCausalLM(_tiny_config())
        return get_peft_model(
            model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        )


def test_mixing_devices_is_refused_here():
    """The premise: a CPU tensor meeting a meta tensor is an error, as it would be with a CUDA tensor."""
    with pytest.raises(RuntimeError):
        torch.ones(2, device=META) + torch.ones(2)


def test_ppo_tensor_path_stays_on_the_model_device():
    from lib.rl import gae, masked_whiten, policy_loss, token_rewards, value_loss
    from stages.ppo import Learner, PolicyWithValue, _pad_rows, _to, collate

    policy = _meta_policy()
    with META:
        head = torch.nn.Linear(32, 1)
    learner = Learner(policy, head, None, [], None, "")
    assert learner.device == META and isinstance(learner.module, PolicyWithValue)
    batch = _to(collate([[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]], pad=0), learner.device)
    mask = batch["mask"]
    with torch.no_grad():
        old, values, _ = learner.module(batch)
        ref, none, _ = learner.module(batch, reference=True)
    assert none is None
    gathered = _pad_rows([torch.zeros(2), torch.zeros(3)], mask)  # rows gathered from the processes (CPU)
    scores = torch.zeros(2, device=mask.device)
    rewards, kl = token_rewards(scores, gathered, ref, mask, 0.05)
    adv, returns = gae(rewards, values, mask, 1.0, 0.95)
    adv = masked_whiten(adv, mask)
    lp, v, ent = learner.model(batch)
    pl, stats = policy_loss(lp, old, adv, mask, 0.2)
    vl, _ = value_loss(v, values, returns, mask, 0.2)
    (pl + 0.1 * vl).backward()
    for t in (old, values, ref, gathered, rewards, kl, adv, returns, lp, v, ent, pl, vl, *stats.values()):
        assert t.device == META
    assert head.weight.grad.device == META and v.dtype == torch.float32  # the value head computes in fp32


def test_dpo_response_logprob_on_the_model_device():
    from lib.logprobs import response_logprob

    policy = _meta_policy()
    ids = torch.zeros((1, 4), dtype=torch.long, device=META)
    resp = torch.zeros((1, 3), dtype=torch.long, device=META)
    assert response_logprob(policy, ids, resp).device == META


def test_reward_forward_on_the_model_device():
    """The packed reward forward (through the model's own forward, as DDP needs) on a meta model and batch."""
    from peft import get_peft_model
    from transformers import LlamaForSequenceClassification

    from core.models import lora_config
    from data_schemas.config import LoraSettings
    from lib.reward_model import GroupCollator, sequence_rewards

    with META:
        cfg = _tiny_config()
        cfg.num_labels = 1
        model = get_peft_model(
            LlamaForSequenceClassification(cfg),
            lora_config(LoraSettings(r=2), "SEQ_CLS", modules_to_save=["score"]),
        )
    groups = [
        {"seqs": [[5, 6, 7], [5, 6]], "tiers": [[0], [1]]},
        {"seqs": [[8, 9, 10, 11], [8]], "tiers": [[1], [0]]},
    ]
    batch = GroupCollator(max_row_tokens=16)(groups)
    batch = {k: (v.to(META) if torch.is_tensor(v) else v) for k, v in batch.items()}
    r = sequence_rewards(model, batch)
    assert r.shape == (4,) and r.device == META
