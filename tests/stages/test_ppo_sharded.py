"""GRPO full-parameter under FSDP2 (`train.sharding=fsdp2`) in two real processes through the CLI, against the same
run in one process holding the whole model: every iteration's reward, KL, loss and gradient norm agree, a run
paused and resumed from its per-process checkpoint equals the uninterrupted one, and the artifact is a plain
checkpoint consolidated from the shards."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import EXAMPLES, ROOT
from tests.stages.test_any_start import checkpoint  # noqa: F401 (the fixture: a user's own checkpoint folder)

GATE_DATA = EXAMPLES / "instructions_validation.jsonl"


def _grpo(out, start, *extra, processes: int = 1):
    args = ["ppo", "--config", "configs/ppo.yaml", f"output_dir={out}", f"init_from={start}", "reward.artifact=null",
            "reward.rule={kind: contains, text: Road}", "reward.missing_eos_penalty=null", "rollout.engine=generate",
            "rollout.max_new_tokens=16", "train.rollout_batch_size=4", "train.group_size=4",
            "train.advantage_estimator=grpo", "train.mini_batch_size=8", "train.kl_coef=0.05", "train.steps=3",
            "perplexity_gate.min_examples=5", "perplexity_gate.max_relative_increase=10.0", "policy_gate.min_prompts=2",
            "prompts.heldout_prompts=4", f"gate_data={GATE_DATA}", "lora.enabled=false", "train.learning_rate=1e-4",
            *extra]  # fmt: skip
    launch = ["--num-processes", str(processes)] if processes > 1 else []
    return subprocess.run([sys.executable, "-m", "align", *args, *launch], cwd=ROOT, env=dict(os.environ),
                          capture_output=True, text=True, timeout=900)  # fmt: skip


def _rows(out):
    keys = ("reward_mean", "kl", "policy_loss", "grad_norm")
    return [[json.loads(x)[k] for k in keys] for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, checkpoint):  # noqa: F811
    d = tmp_path_factory.mktemp("grpo-fsdp2")
    one = _grpo(d / "one", checkpoint)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _grpo(d / "two", checkpoint, "train.sharding=fsdp2", processes=2)
    assert two.returncode == 0, two.stderr[-3000:]
    return d, two


def test_two_sharded_processes_equal_one_whole(runs):
    d, two = runs
    one, sharded = _rows(d / "one"), _rows(d / "two")
    assert len(sharded) == 3 and sharded[0][1] == pytest.approx(
        0.0, abs=1e-6
    )  # iteration 1: policy = reference
    for a, b in zip(one, sharded, strict=True):
        assert b == pytest.approx(a, rel=1e-3, abs=1e-5)
    assert "returned a view tensor" not in two.stderr  # no output of a unit loses its backward hook
    m = json.loads((d / "two" / "manifest.json").read_text())
    assert m["status"] == "complete" and [g["gate"] for g in m["gates"]] == ["policy", "perplexity"]


def test_the_artifact_is_a_plain_checkpoint_of_the_trained_policy(runs, checkpoint):  # noqa: F811
    from transformers import AutoModelForCausalLM

    d, _ = runs
    whole, sharded = (load_file(str(d / run / "model" / "model.safetensors")) for run in ("one", "two"))
    assert set(sharded) == set(whole) - {"lm_head.weight"} or set(sharded) == set(whole)
    for k, v in sharded.items():
        assert (v - whole[k]).abs().max().item() < 1e-4, k
    before = load_file(str(checkpoint / "model.safetensors"))
    assert any(not torch.equal(sharded[k], before[k]) for k in before)
    AutoModelForCausalLM.from_pretrained(d / "two" / "model")  # plain transformers loads it
    assert (d / "two" / "value_head" / "value_head.safetensors").exists()


def test_a_sharded_run_paused_and_resumed_equals_the_uninterrupted_one(runs, checkpoint, tmp_path):  # noqa: F811
    d, _ = runs
    cut = _grpo(tmp_path / "cut", checkpoint, "train.sharding=fsdp2", "train.stop_after_steps=1", processes=2)
    assert cut.returncode == 3, cut.stderr[-3000:]  # paused
    step = tmp_path / "cut" / "checkpoints" / "step-1"
    assert len(list((step / "sharded").glob("*.distcp"))) == 2  # one file per process, nothing gathered
    again = subprocess.run(
        [sys.executable, "-m", "align", "ppo", "--config", str(tmp_path / "cut" / "config.yaml"),
         "train.stop_after_steps=null", "--resume", "--num-processes", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert _rows(tmp_path / "cut") == _rows(d / "two")  # bit for bit


@pytest.mark.parametrize(
    "extra, said",
    [
        (["lora.enabled=true"], "set lora.enabled=false"),
        (["rollout.engine=vllm"], "set rollout.engine=generate"),
    ],
)
def test_what_fsdp2_does_not_shard_yet_is_one_sentence(tmp_path, checkpoint, extra, said, capsys):  # noqa: F811
    from align.cli import main

    args = ["ppo", "--config", "configs/ppo.yaml", f"output_dir={tmp_path / 'x'}", f"init_from={checkpoint}",
            "reward.artifact=null", "reward.rule={kind: contains, text: Road}", "lora.enabled=false",
            "rollout.engine=generate", "train.sharding=fsdp2", *extra]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err


def test_an_sft_adapter_start_is_refused_under_fsdp2_before_training(tmp_path, checkpoint):  # noqa: F811
    from align.cli import main

    sft = tmp_path / "sft"
    assert main(["sft", "--config", "configs/sft.yaml", f"output_dir={sft}", f"model.name_or_path={checkpoint}",
                 f"data.train_file={EXAMPLES / 'instructions_train.jsonl'}", f"data.validation_file={GATE_DATA}",
                 "train.max_steps=1", "train.early_stopping_patience=null"]) == 0  # fmt: skip
    r = _grpo(tmp_path / "x", sft, "train.sharding=fsdp2")
    assert r.returncode == 2 and "align export" in r.stderr and "Traceback" not in r.stderr
