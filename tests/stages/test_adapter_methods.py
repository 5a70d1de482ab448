"""PEFT methods in reward and DPO (peft.method): IA3 and AdaLoRA train their own adapters, which load back for
scoring and gating; the methods these stages cannot take are refused in a sentence."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from align.cli import main
from tests.stages.test_dpo import _pairs_file, dpo, sft  # noqa: F401 (sft: module fixture)
from tests.stages.test_reward_cli import prefs, reward  # noqa: F401 (prefs: module fixture)

MARKERS = {"ia3": ("IA3", "ia3_l"), "adalora": ("ADALORA", "lora_E")}


@pytest.mark.parametrize(
    "method", ["ia3", pytest.param("adalora", marks=pytest.mark.slow)]
)  # one of each stage in the default run; both methods in -m slow
def test_reward_model_with_each_adapter(tmp_path, prefs, method):  # noqa: F811
    from lib.reward_model import RewardScorer

    out = tmp_path / method
    code = reward(out, prefs, "train.max_steps=8", f"peft.method={method}", "gate.min_accuracy=0.0")
    assert code == 0
    peft_type, marker = MARKERS[method]
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == peft_type
    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any(marker in k for k in weights) and any(".score." in k for k in weights)  # the head trains fully
    assert not any("lora_A" in k for k in weights) or method == "adalora"
    scorer = RewardScorer(out)  # the artifact loads back and scores
    r = scorer.score(
        [[{"role": "user", "content": "Tell me about tea"}]] * 2, ["gladly here is help", "sorry, no"]
    )
    assert len(r) == 2 and all(torch.isfinite(torch.tensor(r)))


@pytest.mark.parametrize("method", [pytest.param("ia3", marks=pytest.mark.slow), "adalora"])
def test_dpo_policy_with_each_adapter(tmp_path, sft, method):  # noqa: F811
    from core.models import load_for_eval

    _pairs_file(tmp_path / "pairs.jsonl")
    out = tmp_path / method
    assert dpo(out, sft, tmp_path / "pairs.jsonl", "train.max_steps=6", f"peft.method={method}") == 0
    peft_type, marker = MARKERS[method]
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == peft_type
    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert weights and all(marker in k or "lora_" in k for k in weights)
    # the policy (SFT merged, then this adapter) differs from the SFT model it started from
    policy, tok, _ = load_for_eval(str(out), merge=True)
    parent, _, _ = load_for_eval(str(sft), merge=True)
    ids = torch.tensor([tok("Tell me about tea please")["input_ids"]])
    with torch.no_grad():
        assert not torch.allclose(policy(input_ids=ids).logits, parent(input_ids=ids).logits)


@pytest.mark.parametrize(
    "stage, extra",
    [("reward", ["data.preferences_dir=x"]), ("dpo", ["init_from=x", "data.pairs_file=x", "data.preferences_dir=null"])],
)  # fmt: skip
def test_methods_the_stage_cannot_take_are_refused(tmp_path, capsys, stage, extra):
    args = [stage, "--config", f"configs/{stage}.yaml", f"output_dir={tmp_path / 'o'}", *extra]
    assert main([*args, "peft.method=prefix_tuning"]) == 2
    err = capsys.readouterr().err
    assert "offered in align sft only" in err and "lora, adalora, ia3" in err and "Traceback" not in err
    assert main([*args, "peft.method=adalora", "train.max_steps=-1"]) == 2
    assert "train.max_steps" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["lora", "adalora", "ia3", "prompt_tuning"])
def test_weights_for_vllm_hold_each_adapter(tiny_model_path, method):
    """merged_state_dict (the weights vLLM is given: PPO's and the annotation sampler's engine) makes a plain model
    compute what the adapted one does, for every weight adapter; virtual tokens are refused in a sentence."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from core.config import UserError
    from core.models import peft_config
    from data_schemas.config import LoraSettings, PeftSettings
    from lib.rollout import merged_state_dict

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_path),
        peft_config(LoraSettings(r=4), PeftSettings(method=method, num_virtual_tokens=4), total_steps=10),
    ).eval()
    if method == "prompt_tuning":
        with pytest.raises(UserError, match="virtual tokens"):
            merged_state_dict(model)
        return
    with torch.no_grad():  # move every adapter weight off its identity start
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    missing, unexpected = plain.load_state_dict(merged_state_dict(model), strict=False)
    assert not unexpected and all("lm_head" in k for k in missing)  # tied head
    ids = torch.tensor([[1, 504, 3060, 314, 260, 11, 3456]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
        assert not torch.allclose(
            want, AutoModelForCausalLM.from_pretrained(tiny_model_path)(input_ids=ids).logits
        )
        assert torch.allclose(plain(input_ids=ids).logits, want, atol=1e-4)
