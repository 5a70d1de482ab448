"""GRPO full-parameter under FSDP2 (`train.sharding=fsdp2`), and full-parameter or LoRA under DeepSpeed ZeRO-3
(`train.deepspeed`), in two real processes through the CLI, against the same
run in one process holding the whole model: every iteration's reward, KL, loss and gradient norm agree, a run
paused and resumed from its per-process checkpoint equals the uninterrupted one, and the artifact is a plain
checkpoint consolidated from the shards."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import EXAMPLES, ROOT, big_llama
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


def _resume(out):
    """`align ppo --resume` of the paused run in `out`, to its end, in two processes."""
    return subprocess.run(
        [sys.executable, "-m", "align", "ppo", "--config", str(out / "config.yaml"), "train.stop_after_steps=null",
         "--resume", "--num-processes", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip


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


def test_one_process_without_a_launcher_shards_over_a_group_of_its_own(runs, checkpoint, tmp_path):  # noqa: F811
    d, _ = runs
    alone = _grpo(tmp_path / "alone", checkpoint, "train.sharding=fsdp2")
    assert alone.returncode == 0, alone.stderr[-3000:]
    for a, b in zip(_rows(d / "one"), _rows(tmp_path / "alone"), strict=True):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-6)


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
    """Paused after iteration 1 and resumed from its per-process checkpoints, with every shard kept in host memory
    (train.cpu_offload: FSDP2's CPUOffloadPolicy, the optimizer stepping on the host), the run equals the
    uninterrupted run without offload bit for bit (on a CPU host and device are one memory)."""
    d, _ = runs
    cut = _grpo(tmp_path / "cut", checkpoint, "train.sharding=fsdp2", "train.stop_after_steps=1",
                "train.cpu_offload=true", processes=2)  # fmt: skip
    assert cut.returncode == 3, cut.stderr[-3000:]  # paused
    step = tmp_path / "cut" / "checkpoints" / "step-1"
    assert len(list((step / "sharded").glob("*.distcp"))) == 2  # one file per process, nothing gathered
    again = _resume(tmp_path / "cut")
    assert again.returncode == 0, again.stderr[-3000:]
    assert _rows(tmp_path / "cut") == _rows(d / "two")  # bit for bit


@pytest.mark.parametrize(
    "extra, said",
    [
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


def test_an_sft_adapter_start_is_merged_file_by_file_and_trains_sharded_as_one(tmp_path, checkpoint):  # noqa: F811
    """From an SFT artifact whose LoRA is still to be merged: the main process folds it into the base one safetensors
    file at a time (lib.merge.sharded_start), every process reads its shards of that, and the run equals one
    process merging with PEFT (iteration 1's KL is 0: the sharded reference holds the merged start); the merged copy
    is gone from the artifact once training is done."""
    from align.cli import main

    sft = tmp_path / "sft"
    assert main(["sft", "--config", "configs/sft.yaml", f"output_dir={sft}", f"model.name_or_path={checkpoint}",
                 f"data.train_file={EXAMPLES / 'instructions_train.jsonl'}", f"data.validation_file={GATE_DATA}",
                 "train.max_steps=2", "train.learning_rate=1e-2", "train.early_stopping_patience=null"]) == 0  # fmt: skip
    one = _grpo(tmp_path / "one", sft, "train.steps=2")
    assert one.returncode == 0, one.stderr[-3000:]
    two = _grpo(tmp_path / "two", sft, "train.steps=2", "train.sharding=fsdp2", processes=2)
    assert two.returncode == 0, two.stderr[-3000:]
    rows = _rows(tmp_path / "two")
    assert rows[0][1] == pytest.approx(0.0, abs=1e-6)
    for a, b in zip(_rows(tmp_path / "one"), rows, strict=True):
        assert b == pytest.approx(a, rel=1e-3, abs=1e-5)
    assert not (tmp_path / "two" / ".start-merged").exists()
    m = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert m["status"] == "complete" and [p["path"] for p in m["parents"]] == [str(sft)]


# ---- a model that does not fit one capped process (slow: a 318M-parameter model, three runs, ~10 min) ------------
CGROUP_V1 = Path("/sys/fs/cgroup/memory")


def _cgroup(name: str, limit: int) -> Path:
    """A memory cgroup (v1) capped at `limit` bytes, or a skip saying why none can be made here."""
    if not (CGROUP_V1 / "cgroup.procs").exists() or not os.access(CGROUP_V1, os.W_OK):
        pytest.skip("needs a writable cgroup v1 memory controller (root) to cap a process's memory")
    group = CGROUP_V1 / name
    group.mkdir(exist_ok=True)
    (group / "memory.limit_in_bytes").write_text(str(limit))
    return group


def _in_group(group: Path, argv: list[str]) -> subprocess.CompletedProcess:
    """argv run inside `group` (the shell enters it, then becomes the command: no user text in the shell line)."""
    script = 'echo $$ > "$0/cgroup.procs" && exec "$@"'
    return subprocess.run(["sh", "-c", script, str(group), *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=3600)  # fmt: skip


@pytest.mark.slow
def test_a_model_that_does_not_fit_one_capped_process_trains_sharded_in_two(tmp_path):
    big, params = big_llama(tmp_path / "big")
    state = params * 4 * 5  # fp32 weights, gradients, two AdamW moments, and the frozen reference copy
    # per process: less than one process surely needs (the state and the runtime: the fit check refuses it), more
    # than each of two sharded processes needs (measured: 6.0 GiB, of which about 3 GiB is the fixed part: runtime,
    # activations, gathered layers, optimizer temporaries)
    cap = 7 * 2**30
    assert state + 1.5 * 2**30 > cap
    small = [
        "rollout.max_new_tokens=8",
        "train.rollout_batch_size=2",
        "train.steps=2",
        "prompts.max_prompt_length=96",
    ]
    base = [sys.executable, "-m", "align", "ppo", "--config", "configs/ppo.yaml", f"init_from={big}",
            "reward.artifact=null", "reward.rule={kind: frequency, text: e}", "reward.missing_eos_penalty=null",
            "rollout.engine=generate", "train.group_size=4", "train.advantage_estimator=grpo",
            "train.mini_batch_size=8", "train.kl_coef=0.05", "perplexity_gate.min_examples=5",
            "perplexity_gate.max_relative_increase=10.0", "policy_gate.min_prompts=2", "prompts.heldout_prompts=2",
            f"gate_data={GATE_DATA}", "lora.enabled=false", "train.learning_rate=1e-5", *small]  # fmt: skip
    one_group = _cgroup(f"align-test-{os.getpid()}-one", cap)
    two_group = _cgroup(f"align-test-{os.getpid()}-two", 2 * cap)  # two processes, each its share
    try:
        # one process under the cap: refused by align's own fit check, in a sentence, before any model loads
        refused = _in_group(one_group, [*base, f"output_dir={tmp_path / 'refused'}"])
        assert refused.returncode == 2, refused.stderr[-3000:]
        assert "holds at least" in refused.stderr and "Traceback" not in refused.stderr
        # two processes under FSDP2, each under the same cap
        two = _in_group(two_group, [*base, f"output_dir={tmp_path / 'two'}", "train.sharding=fsdp2",
                                    "--num-processes", "2"])  # fmt: skip
        assert two.returncode == 0, two.stderr[-3000:]
        group_peak = int((two_group / "memory.max_usage_in_bytes").read_text())
    finally:
        for g in (one_group, two_group):
            g.rmdir()
    # the same run in one uncapped process holding the whole model: the same numbers
    one = subprocess.run([*base, f"output_dir={tmp_path / 'one'}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=3600)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    for a, b in zip(_rows(tmp_path / "one"), _rows(tmp_path / "two"), strict=True):
        assert b == pytest.approx(a, rel=1e-3, abs=1e-5)
    peaks = json.loads((tmp_path / "two" / "manifest.json").read_text())["metrics"][
        "peak_memory_gib_per_process"
    ]
    whole = json.loads((tmp_path / "one" / "manifest.json").read_text())["metrics"][
        "peak_memory_gib_per_process"
    ]
    # the gates (policy, perplexity) read the policy and its start back offloaded beyond the run's share
    two_metrics = json.loads((tmp_path / "two" / "manifest.json").read_text())["metrics"]
    gate = json.loads((tmp_path / "two" / "gates" / "perplexity" / "gate.json").read_text())
    assert "offloaded: at most" in gate["details"]["descriptions"]["candidate"]
    record = {"params": params, "state_gib": state / 2**30, "cap_gib": cap / 2**30, "two_processes_peak_gib": peaks,
              "two_processes_group_peak_gib": group_peak / 2**30, "one_process_peak_gib": whole,
              "two_processes_gate_peak_gib": two_metrics["gate_peak_memory_gib"]}  # fmt: skip
    print("FSDP2 capped run:", json.dumps(record))  # the figures docs/benchmarks.md quotes (pytest -s)
    assert all(p < cap / 2**30 for p in peaks) and max(peaks) < 0.8 * whole[0]
    assert two_metrics["gate_peak_memory_gib"] < cap / 2**30


@pytest.mark.parametrize("sharding", ["ddp", pytest.param("fsdp2", marks=pytest.mark.slow)])
def test_gradient_checkpointing_recomputes_the_same_update(runs, checkpoint, tmp_path, sharding):  # noqa: F811
    """train.gradient_checkpointing recomputes each block's activations in backward: the same rewards, KL, losses
    and gradient norms as keeping them (one process whole, or two sharded)."""
    d, _ = runs
    extra = ["train.gradient_checkpointing=true"] + (["train.sharding=fsdp2"] if sharding == "fsdp2" else [])
    r = _grpo(tmp_path / "ckpt", checkpoint, *extra, processes=2 if sharding == "fsdp2" else 1)
    assert r.returncode == 0, r.stderr[-3000:]
    kept = _rows(d / ("two" if sharding == "fsdp2" else "one"))
    for a, b in zip(kept, _rows(tmp_path / "ckpt"), strict=True):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-6)


# ---- DeepSpeed ZeRO-3 (train.deepspeed), full-parameter and LoRA, partitioned as they are created; LoRA on FSDP2 --
ZERO3 = f"train.deepspeed={ROOT / 'configs' / 'deepspeed' / 'zero3.json'}"


@pytest.fixture(scope="module")
def zero3_runs(runs, checkpoint):  # noqa: F811
    d, _ = runs
    full = _grpo(d / "zero3", checkpoint, ZERO3, processes=2)
    assert full.returncode == 0, full.stderr[-3000:]
    lora_one = _grpo(d / "lora-one", checkpoint, "lora.enabled=true", "train.steps=2")
    assert lora_one.returncode == 0, lora_one.stderr[-3000:]
    lora = _grpo(d / "lora-zero3", checkpoint, ZERO3, "lora.enabled=true", "train.steps=2", processes=2)
    assert lora.returncode == 0, lora.stderr[-3000:]
    fsdp = _grpo(d / "lora-fsdp2", checkpoint, "train.sharding=fsdp2", "lora.enabled=true", "train.steps=2",
                 processes=2)  # fmt: skip
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    return d, full, lora


def test_full_parameter_grpo_under_zero3_is_partitioned_as_it_is_created_and_trains_as_one(zero3_runs):
    """The policy and its frozen reference are created under zero.Init (each process reads its partitions), DeepSpeed
    steps them, and every iteration's reward, KL, loss and gradient norm are those of one process holding the whole
    model; the artifact, written one gathered weight at a time, is the same policy, and plain transformers loads it."""
    from transformers import AutoModelForCausalLM

    d, full, _ = zero3_runs
    assert "policy partitioned as it is created (ZeRO-3)" in full.stdout + full.stderr
    rows = _rows(d / "zero3")
    assert len(rows) == 3 and rows[0][1] == pytest.approx(0.0, abs=1e-6)
    for a, b in zip(_rows(d / "one"), rows, strict=True):
        assert b == pytest.approx(a, rel=1e-3, abs=1e-5)
    m = json.loads((d / "zero3" / "manifest.json").read_text())
    assert m["status"] == "complete" and [g["gate"] for g in m["gates"]] == ["policy", "perplexity"]
    whole, zero = (load_file(str(d / run / "model" / "model.safetensors")) for run in ("one", "zero3"))
    assert set(zero) == set(whole)
    for k, v in zero.items():
        assert (v - whole[k]).abs().max().item() < 1e-4, k
    AutoModelForCausalLM.from_pretrained(d / "zero3" / "model")
    head = load_file(str(d / "zero3" / "value_head" / "value_head.safetensors"))
    assert head["weight"].shape == (
        1,
        AutoModelForCausalLM.from_pretrained(d / "zero3" / "model").config.hidden_size,
    )


@pytest.mark.parametrize("run", ["lora-zero3", "lora-fsdp2"])
def test_a_lora_policy_on_a_sharded_base_trains_as_one_process_and_saves_its_adapter(
    zero3_runs,
    checkpoint,  # noqa: F811
    run,
):
    """LoRA on a base partitioned by ZeRO-3 or sharded by FSDP2 (each layer's adapter a unit of its own): the
    reference is the adapter disabled, the adapter starts from the same draws (core.models.init_lora), is gathered
    alone to be saved, and equals the one a single process trains; PEFT applies it to the start."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    d, _, _ = zero3_runs
    for a, b in zip(_rows(d / "lora-one"), _rows(d / run), strict=True):
        assert b == pytest.approx(a, rel=1e-3, abs=1e-5)
    one, two = (load_file(str(d / r / "adapter" / "adapter_model.safetensors")) for r in ("lora-one", run))
    assert set(one) == set(two) and any("lora_B" in k and v.abs().max() > 0 for k, v in two.items())
    for k, v in two.items():
        assert (v - one[k]).abs().max().item() < 1e-5, k
    assert not (d / run / "model").exists()
    m = json.loads((d / run / "manifest.json").read_text())
    assert m["status"] == "complete" and [g["gate"] for g in m["gates"]] == ["policy", "perplexity"]
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(checkpoint), d / run / "adapter")


def test_a_zero3_run_paused_and_resumed_equals_the_uninterrupted_one(zero3_runs, tmp_path, checkpoint):  # noqa: F811
    d, _, _ = zero3_runs
    cut = _grpo(tmp_path / "cut", checkpoint, ZERO3, "train.stop_after_steps=1", processes=2)
    assert cut.returncode == 3, cut.stderr[-3000:]
    state = tmp_path / "cut" / "checkpoints" / "step-1" / "zero" / "state"
    assert len(list(state.glob("*optim_states.pt"))) == 2  # each process its partition, nothing gathered
    again = _resume(tmp_path / "cut")
    assert again.returncode == 0, again.stderr[-3000:]
    assert _rows(tmp_path / "cut") == _rows(d / "zero3")  # bit for bit


@pytest.mark.parametrize(
    "extra, said",
    [
        (["rollout.engine=vllm", ZERO3], "set rollout.engine=generate"),
        (
            ["rollout.engine=generate", f"train.deepspeed={ROOT / 'configs' / 'deepspeed' / 'zero2.json'}"],
            "stage 3",
        ),
    ],
)
def test_what_ppo_does_not_run_under_deepspeed_is_one_sentence(tmp_path, checkpoint, capsys, extra, said):  # noqa: F811
    from align.cli import main

    args = ["ppo", "--config", "configs/ppo.yaml", f"output_dir={tmp_path / 'x'}", f"init_from={checkpoint}",
            "reward.artifact=null", "reward.rule={kind: contains, text: Road}", *extra]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err
