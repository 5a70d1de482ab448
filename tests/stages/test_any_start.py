"""Reward, DPO and PPO/GRPO start from any transformers checkpoint as well as from an align SFT artifact, and train
full-parameter (lora.enabled false) as well as with an adapter, through the real CLI (lib.artifacts.Start).

What each test pins down is the reference: at the first step the policy *is* its start, so DPO's first loss is
-log sigmoid(0) = ln 2 and PPO's first KL is 0, exactly, only when the reference holds the start's weights (for an
SFT artifact: its adapter merged, not the raw base its config names, which is what TRL would load by itself)."""

import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file

from align.cli import main
from bench.harness import peaked_llama
from tests.conftest import EXAMPLES, export_matches_align
from tests.stages.test_dpo import _pairs_file
from tests.stages.test_reward_cli import _ranking_file

GATE_DATA = EXAMPLES / "instructions_validation.jsonl"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_model_path):
    """A user's own checkpoint folder: a tiny Llama with peaked next-token distributions (like a trained model's),
    saved with its tokenizer by plain transformers; align has never seen it."""
    return peaked_llama(tmp_path_factory.mktemp("start") / "my-checkpoint", tiny_model_path)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    _pairs_file(path)
    return path


def _dpo(out, start, pairs, *extra):
    return main(
        ["dpo", "--config", "configs/dpo.yaml", f"output_dir={out}", f"init_from={start}", "data.preferences_dir=null",
         f"data.pairs_file={pairs}", "data.validation_fraction=0.25", "train.learning_rate=5e-3",
         "train.lr_scheduler_type=constant", "train.warmup_ratio=0", "train.per_device_train_batch_size=4",
         "train.logging_steps=1", "train.eval_steps=100", "train.max_steps=6", "eval.prompts=2",
         "eval.max_new_tokens=6", "perplexity_gate.min_examples=5", "perplexity_gate.max_relative_increase=100",
         *extra]
    )  # fmt: skip


def _losses(out) -> list[float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in rows if "loss" in x and "rewards/margins" in x]


def _changed(folder, start) -> bool:
    trained, before = (
        load_file(str(folder / "model.safetensors")),
        load_file(str(start / "model.safetensors")),
    )
    return any(not torch.equal(trained[k], before[k]) for k in before)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_dpo_from_a_checkpoint_folder(tmp_path, checkpoint, pairs, mode):
    out = tmp_path / "dpo"
    extra = ["lora.enabled=false", "train.learning_rate=1e-4"] if mode == "full" else []
    assert _dpo(out, checkpoint, pairs, f"gate_data={GATE_DATA}", *extra) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and m["model"]["name"] == str(checkpoint)
    assert m["parents"] == []  # a checkpoint is no align artifact: its identity is the model record's sha256
    assert m["model"]["weights_sha256"] and m["metrics"]["kl_to_reference"] is not None
    losses = _losses(out)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)  # the reference is the checkpoint itself
    assert sum(losses[-2:]) / 2 < losses[0]
    if mode == "lora":
        assert json.loads((out / "stack.json").read_text())["merge"] == []
        # the adapter applies to the checkpoint itself, so its config names it and plain PEFT loads it right
        config = json.loads((out / "adapter" / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(checkpoint)
    else:
        assert not (out / "adapter").exists() and not (out / "stack.json").exists()
        assert _changed(out / "model", checkpoint)
        assert m["model"]["adapter"] is None
    # and it leaves align as what align computes (plain transformers, or PEFT on the checkpoint)
    export_matches_align(out, tmp_path / "export", base=str(checkpoint))


def test_full_parameter_dpo_reference_precomputed_equals_a_frozen_copy(tmp_path, checkpoint, pairs):
    """The two full-parameter references are the same numbers, one held through training, one computed once."""
    common = [f"gate_data={GATE_DATA}", "lora.enabled=false", "train.learning_rate=1e-4", "eval.prompts=0"]
    assert _dpo(tmp_path / "copy", checkpoint, pairs, *common) == 0
    assert _dpo(tmp_path / "pre", checkpoint, pairs, *common, "reference=precomputed") == 0
    assert _losses(tmp_path / "pre") == pytest.approx(_losses(tmp_path / "copy"), rel=1e-4)
    saved = yaml.safe_load((tmp_path / "copy" / "config.yaml").read_text())["reference"]
    assert saved == "model_copy"  # lora.enabled false turns the adapter-disabled default into a frozen copy


@pytest.fixture(scope="module")
def moved_sft(tmp_path_factory, checkpoint):
    """An SFT artifact on the checkpoint whose adapter moved the model far from its base (a high learning rate):
    a reference built from the raw base would not equal it."""
    sft = tmp_path_factory.mktemp("sft") / "sft"
    args = ["sft", "--config", "configs/sft.yaml", f"output_dir={sft}", f"model.name_or_path={checkpoint}",
            f"data.train_file={EXAMPLES / 'instructions_train.jsonl'}", f"data.validation_file={GATE_DATA}",
            "train.max_steps=3", "train.learning_rate=5e-2", "train.early_stopping_patience=null"]  # fmt: skip
    assert main(args) == 0
    return sft


def test_full_parameter_dpo_from_an_sft_artifact_refers_to_the_sft_model(tmp_path, moved_sft, pairs):
    out = tmp_path / "dpo"
    assert (
        _dpo(out, moved_sft, pairs, "lora.enabled=false", "train.learning_rate=1e-4", "eval.prompts=0") == 0
    )
    assert _losses(out)[0] == pytest.approx(math.log(2), abs=1e-4)  # SFT merged, not the raw base
    m = json.loads((out / "manifest.json").read_text())
    assert [p["stage"] for p in m["parents"]] == ["sft"] and (out / "model" / "config.json").exists()


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    d = tmp_path_factory.mktemp("prefs")
    _ranking_file(d / "r.jsonl")
    args = ["data", "build-preferences", str(d / "r.jsonl"), "--out", str(d / "p"), "--set",
            "validation_fraction=0.25"]  # fmt: skip
    assert main(args) == 0
    return d / "p"


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_reward_from_a_checkpoint_folder_scores_like_its_training(tmp_path, checkpoint, prefs, mode):
    from lib.reward_model import RewardScorer

    out = tmp_path / "reward"
    args = ["reward", "--config", "configs/reward.yaml", f"output_dir={out}", f"init_from={checkpoint}",
            f"data.preferences_dir={prefs}", "train.learning_rate=3e-3", "train.groups_per_batch=4",
            "train.lr_scheduler_type=constant", "train.warmup_ratio=0", "train.eval_steps=20", "train.max_steps=20",
            "gate.min_pairs=20", "gate.min_accuracy=0.8"]  # fmt: skip
    extra = ["lora.enabled=false", "train.learning_rate=1e-4"] if mode == "full" else []
    assert main(args + extra) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["model"]["name"] == str(checkpoint) and [p["stage"] for p in m["parents"]] == ["preferences"]
    saved = out / "adapter" / "adapter_config.json" if mode == "lora" else out / "model" / "config.json"
    assert saved.exists() and not (out / ("model" if mode == "lora" else "adapter")).exists()
    # the artifact, loaded back by the scorer PPO and the gates use, gives the rewards its held-out pass gave
    from datasets import load_from_disk

    val = load_from_disk(str(prefs / "kwise"))["validation"][0]
    held = json.loads((out / "heldout_rewards.json").read_text())[0]
    got = RewardScorer(out).score([val["prompt"]] * len(val["responses"]), val["responses"])
    assert got == pytest.approx(held, abs=1e-4)
    if mode == "full":  # scored with a third of its weights in memory (its head kept whole, in fp32)
        from core.models import checkpoint_bytes, resident_limit

        with resident_limit(checkpoint_bytes(out / "model", "fp32") / 3):
            scorer = RewardScorer(out)
        assert "disk" in set(scorer.model.hf_device_map.values())
        assert scorer.model.score.weight.dtype == torch.float32
        got = scorer.score([val["prompt"]] * len(val["responses"]), val["responses"])
        assert got == pytest.approx(held, abs=1e-4)
    export_matches_align(out, tmp_path / "export", base=str(checkpoint))


def _grpo(out, start, *extra):
    return main(
        ["ppo", "--config", "configs/ppo.yaml", f"output_dir={out}", f"init_from={start}", "reward.artifact=null",
         "reward.rule={kind: contains, text: Road}", "reward.missing_eos_penalty=null", "rollout.engine=generate",
         "rollout.max_new_tokens=16", "train.rollout_batch_size=4", "train.group_size=4",
         "train.advantage_estimator=grpo", "train.mini_batch_size=8", "train.kl_coef=0.05",
         "perplexity_gate.min_examples=5", "perplexity_gate.max_relative_increase=10.0", "policy_gate.min_prompts=2",
         "prompts.heldout_prompts=8", f"gate_data={GATE_DATA}", *extra]
    )  # fmt: skip


def _history(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_grpo_from_a_checkpoint_folder_learns_the_toy_reward(tmp_path, checkpoint, mode):
    out = tmp_path / "grpo"
    lr = (
        ["lora.enabled=false", "train.learning_rate=1e-4"] if mode == "full" else ["train.learning_rate=1e-3"]
    )
    assert _grpo(out, checkpoint, "train.steps=6", *lr) == 0
    h = _history(out)
    assert h[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # iteration 1 samples from the start = the reference
    assert sum(x["reward_mean"] for x in h[-2:]) / 2 > h[0]["reward_mean"] + 0.2, [
        x["reward_mean"] for x in h
    ]
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and [g["gate"] for g in m["gates"]] == ["policy", "perplexity"]
    assert m["model"]["name"] == str(checkpoint) and m["parents"] == []
    if mode == "full":
        assert _changed(out / "model", checkpoint) and not (out / "adapter").exists()
        assert (out / "value_head" / "value_head.safetensors").exists()


def test_full_parameter_grpo_resumed_equals_uninterrupted(tmp_path, checkpoint):
    common = ["lora.enabled=false", "train.learning_rate=1e-4", "train.steps=3", "policy_gate.min_prompts=2",
              "prompts.heldout_prompts=2"]  # fmt: skip
    assert _grpo(tmp_path / "whole", checkpoint, *common) == 0
    assert _grpo(tmp_path / "cut", checkpoint, *common, "train.stop_after_steps=1") == 3  # paused
    ckpt = next((tmp_path / "cut" / "checkpoints").glob("step-*"))
    assert (ckpt / "policy.safetensors").exists() and not (ckpt / "adapter.safetensors").exists()
    assert main(["ppo", "--config", str(tmp_path / "cut" / "config.yaml"), "train.stop_after_steps=null",
                 "--resume"]) == 0  # fmt: skip
    whole, cut = _history(tmp_path / "whole"), _history(tmp_path / "cut")
    keys = ("reward_mean", "kl", "policy_loss")
    flat = [r[k] for r in cut for k in keys]
    assert len(cut) == 3 and flat == pytest.approx([r[k] for r in whole for k in keys], abs=1e-5)
    a, b = (
        load_file(str(tmp_path / "whole" / "model" / "model.safetensors")),
        load_file(str(tmp_path / "cut" / "model" / "model.safetensors")),
    )
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_starts_that_are_neither_artifact_nor_checkpoint_are_one_sentence(
    tmp_path, checkpoint, pairs, capsys
):
    (tmp_path / "empty").mkdir()
    assert _dpo(tmp_path / "a", tmp_path / "empty", pairs, f"gate_data={GATE_DATA}") == 2
    err = capsys.readouterr().err
    assert "neither an align sft artifact" in err and "Traceback" not in err
    # a checkpoint has no SFT validation data: the perplexity gate's data is asked for before anything trains
    assert _dpo(tmp_path / "b", checkpoint, pairs) == 2
    err = capsys.readouterr().err
    assert "set gate_data" in err and "Traceback" not in err and not (tmp_path / "b" / "model").exists()
