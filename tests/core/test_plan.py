"""Memory planning: the terms from hand-computed counts, the CLI, and the warning before a run that cannot fit."""

from __future__ import annotations

import json

import pytest
import torch

from align.cli import main
from core.plan import GIB, estimate, lora_trainable, meta_model
from data_schemas.config import SFTConfig
from stages.registry import STAGES

SFT = STAGES["sft"].plan  # the SFT row's step shape


def _cfg(**kw):
    base = {"output_dir": "x", "data": {"train_file": "t.jsonl", "max_length": 64}, "precision": "fp32",
            "model": {"name_or_path": "tiny-random-llama"}, "train": {"per_device_train_batch_size": 2}}  # fmt: skip
    for k, v in kw.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return SFTConfig(**base)


def test_terms_from_hand_counts(tiny_model_path):
    m = meta_model("tiny-random-llama")
    c = m.config  # hidden 128, intermediate 256, 2 layers, 2 heads (head 64), 1 KV head
    q = 8 * (128 + 128)  # r=8 on q_proj: 128 -> 128
    v = 8 * (128 + 64)  # v_proj: 128 -> 64 (one KV head of 64)
    assert lora_trainable(m, ["q_proj", "v_proj"], 8) == c.num_hidden_layers * (q + v)
    plan = estimate(_cfg(lora={"r": 8, "target_modules": ["q_proj", "v_proj"]}), SFT, device="cpu")
    params = sum(p.numel() for p in m.parameters())
    assert plan.params == params and plan.trainable == c.num_hidden_layers * (q + v)
    assert plan.terms["weights"] == params * 4 and plan.terms["optimizer (AdamW)"] == 2 * plan.trainable * 4
    tokens = 2 * 64
    assert plan.terms["logits (fp32)"] == tokens * c.vocab_size * 8
    assert plan.terms["activations"] == 2 * tokens * 34 * 128 * 2  # 2 layers x 34 h per token, fp32 (SDPA)
    eager = estimate(
        _cfg(model={"name_or_path": "tiny-random-llama", "attn_implementation": "eager"}), SFT, device="cpu"
    )
    # + one packed row of max(64, 1024) tokens: 2 layers x 2 heads x 1024^2 x (scores, softmax) x 4 bytes
    assert eager.terms["activations"] == plan.terms["activations"] + 2 * 1 * 2 * 1024 * 1024 * 2 * 4
    full = estimate(_cfg(lora={"enabled": False}), SFT, device="cpu")
    assert full.trainable == params and full.terms["gradients"] == params * 4
    head = estimate(_cfg(lora={"enabled": False}, partial={"trainable": "head"}), SFT, device="cpu")
    assert 0 < head.trainable < params
    assert head.rule_of_thumb == 2.5 * head.terms["weights"]


def test_plan_cli_and_the_warning_at_start(tiny_model_path, capsys, monkeypatch):
    assert (
        main(["plan", "--config", "configs/sft.yaml", "model.name_or_path=tiny-random-llama", "--json"]) == 0
    )
    d = json.loads(capsys.readouterr().out)
    assert d["stage"] == "sft" and d["total_gib"] > d["terms_gib"]["weights"] and d["fits"] in (True, False)
    import core.plan
    import core.stage

    assert core.stage.check_at_start is core.plan.check_at_start  # the check every training stage runs
    if not torch.cuda.is_available():  # planning for a GPU from a machine without one: no capacity, no crash
        argv = [
            "plan",
            "--config",
            "configs/sft.yaml",
            "model.name_or_path=tiny-random-llama",
            "--device",
            "cuda",
        ]
        assert main(argv) == 0
        assert "unknown (no cuda device here to measure)" in capsys.readouterr().out
    monkeypatch.setattr(core.plan, "capacity", lambda dev: 0.01 * GIB)
    warning = core.plan.check_at_start(_cfg(), SFT)
    assert (
        "GiB per process at its peak" in warning
        and "0.0 GiB is available on cpu" in warning
        and "align plan" in warning
    )
    monkeypatch.setattr(core.plan, "capacity", lambda dev: 1000 * GIB)
    assert core.plan.check_at_start(_cfg(), SFT) is None


@pytest.fixture(scope="module")
def sft_artifact(tmp_path_factory, tiny_model_path):
    from tests.stages.test_sft_cli import sft

    out = tmp_path_factory.mktemp("plan") / "sft"
    assert sft(out, "train.max_steps=1") == 0
    return out


@pytest.mark.parametrize("stage", ["reward", "dpo", "ppo"])
def test_every_training_stage_can_be_planned(stage, sft_artifact, capsys):
    """DPO and PPO build on an SFT artifact: its base model is the one planned."""
    capsys.readouterr()
    assert main(["plan", "--config", f"configs/{stage}.yaml", f"init_from={sft_artifact}", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["stage"] == stage and d["model"] == "tiny-random-llama" and d["total_gib"] > 0


def test_a_checkpoint_start_is_planned_as_itself_and_a_full_parameter_reference_counts(tiny_model_path):
    """DPO/PPO from a checkpoint plan that checkpoint (not align's default model); a full-parameter policy's frozen
    reference copy is one more set of weights, an adapter policy's reference costs nothing (the adapter disabled)."""
    from data_schemas.config import DPOConfig, PPOConfig

    dpo = {"output_dir": "x", "init_from": str(tiny_model_path), "precision": "fp32",
           "data": {"pairs_file": "p.jsonl", "max_length": 64, "max_prompt_length": 32}}  # fmt: skip
    params = sum(p.numel() for p in meta_model(str(tiny_model_path)).parameters())
    lora = estimate(DPOConfig(**dpo), STAGES["dpo"].plan, device="cpu")
    assert lora.model == str(tiny_model_path) and lora.params == params
    assert "reference (frozen copy)" not in lora.terms
    full = estimate(DPOConfig(**dpo, lora={"enabled": False}), STAGES["dpo"].plan, device="cpu")
    assert full.terms["reference (frozen copy)"] == params * 4 and full.trainable == params
    pre = estimate(
        DPOConfig(**dpo, lora={"enabled": False}, reference="precomputed"), STAGES["dpo"].plan, device="cpu"
    )
    assert "reference (frozen copy)" not in pre.terms
    ppo = {"output_dir": "x", "init_from": str(tiny_model_path), "precision": "fp32",
           "prompts": {"train_file": "p.jsonl"}, "reward": {"rule": {"kind": "contains", "text": "a"}},
           "rollout": {"engine": "generate"}}  # fmt: skip
    assert "reference (frozen copy)" not in estimate(PPOConfig(**ppo), STAGES["ppo"].plan, device="cpu").terms
    full_ppo = estimate(PPOConfig(**ppo, lora={"enabled": False}), STAGES["ppo"].plan, device="cpu")
    assert full_ppo.terms["reference (frozen copy)"] == params * 4


def test_layouts_per_process_from_hand_counts_and_the_smallest_that_fits(tiny_model_path, capsys):
    """One process of N holds 1/N of what its sharding partitions, plus two gathered units when the weights are
    partitioned; activations and the runtime stay whole. The smallest layout that fits is named."""
    from core.plan import largest_unit, layout, layouts, smallest_fit

    plan = estimate(_cfg(lora={"enabled": False}), SFT, device="cpu")
    m = meta_model("tiny-random-llama")
    layer = sum(p.numel() for p in m.model.layers[0].parameters())
    rest = (
        sum(p.numel() for p in m.parameters()) - len(m.model.layers) * layer
    )  # embeddings (tied head), norm
    assert largest_unit(m) == max(layer, rest) and plan.largest_unit == max(layer, rest) * 4
    t = plan.terms
    ddp = layout(plan, 4, "ddp")
    assert ddp.total == pytest.approx(plan.total)  # DDP replicates everything
    z2 = layout(plan, 4, "zero2")
    assert z2.terms["weights"] == t["weights"] and z2.terms["gradients"] == t["gradients"] / 4
    assert z2.terms["optimizer (AdamW)"] == t["optimizer (AdamW)"] / 4
    z3 = layout(plan, 4, "zero3", "optimizer")
    assert z3.terms["weights"] == t["weights"] / 4 and z3.terms["optimizer (AdamW)"] == 0
    master = plan.trainable * 4 / 4  # DeepSpeed's fp32 copy of the trainable partition, with the optimizer
    assert z2.terms["master weights (fp32, DeepSpeed)"] == master
    assert (
        z3.host == t["optimizer (AdamW)"] / 4 + master
        and z3.terms["master weights (fp32, DeepSpeed)"] == 0
        and z3.terms["gathered units (2 in flight)"] == 2 * plan.largest_unit
    )
    assert "master weights (fp32, DeepSpeed)" not in layout(plan, 4, "fsdp2").terms
    assert z3.terms["activations"] == t["activations"] and z3.terms["runtime"] == t["runtime"]
    with pytest.raises(ValueError, match="not optimizer\\+weights"):
        layout(
            plan, 2, "zero2", "optimizer+weights"
        )  # ZeRO-2 holds the weights whole: nothing to offload of them
    # FSDP2's CPU offload (train.cpu_offload) moves the weights' shards with their gradients and moments
    f = layout(plan, 4, "fsdp2", "optimizer+weights")
    moved = t["weights"] / 4 + t["gradients"] / 4 + t["optimizer (AdamW)"] / 4
    assert f.host == pytest.approx(moved) and f.terms["weights"] == f.terms["gradients"] == 0
    assert f.total == pytest.approx(layout(plan, 4, "fsdp2").total - moved)
    with pytest.raises(ValueError, match="not optimizer"):
        layout(plan, 4, "fsdp2", "optimizer")  # FSDP2 offloads all of a shard or nothing
    # the search names the first layout, in its order (fewer processes, less sharding, no offload), that fits
    shape = STAGES["sft"].plan
    host = 64 * GIB  # a machine's host memory: what an offloading layout moves there fits it
    rows = layouts(plan, 8, None, shape.shardings, shape.offloads, host_memory=host)  # what align offers SFT
    assert [r.processes for r in rows] == sorted(r.processes for r in rows) and rows[0].processes == 1
    cap = (
        min(r.total for r in rows if r.processes == 2) + 1.0
    )  # nothing on 1 process fits this, one on 2 does
    assert all(r.total > cap for r in rows if r.processes == 1)
    best = smallest_fit(layouts(plan, 8, cap, shape.shardings, shape.offloads, host_memory=host))
    assert best.processes == 2 and best.total <= cap
    first = next(r for r in rows if r.total <= cap)
    assert (best.sharding, best.offload) == (first.sharding, first.offload)
    # what an offloading layout moves to the host must fit the host memory its machine's processes share
    offloading = next(r for r in rows if r.host > 0)
    tight = layouts(plan, 8, cap, shape.shardings, shape.offloads, host_memory=offloading.host * 0.5)
    same = next(
        r
        for r in tight
        if (r.processes, r.sharding, r.offload)
        == (offloading.processes, offloading.sharding, offloading.offload)
    )
    assert same.host_capacity == offloading.host * 0.5 / min(same.processes, 8) and same.fits is False
    unknown = layouts(plan, 8, cap, shape.shardings, shape.offloads)  # no host memory given: offload unknown
    assert all(r.fits is None for r in unknown if r.host > 0)
    args = ["plan", "--config", "configs/sft.yaml", "model.name_or_path=tiny-random-llama", "lora.enabled=false",
            "precision=fp32", "data.max_length=64", "train.per_device_train_batch_size=2", "--device", "cpu",
            "--gpus", "8", "--gpu-memory", f"{cap / GIB}", "--host-memory", "64", "--json"]  # fmt: skip
    assert main(args) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["smallest_fit"]["processes"], d["smallest_fit"]["sharding"]) == (2, best.sharding)
    assert len(d["layouts"]) == len(rows)


def test_fsdp2_is_offered_with_and_without_offload_and_deepspeed_is_read(tmp_path):
    """`align plan` offers FSDP2 without offload and with its CPU offload (weights, gradients and moments together),
    full-parameter and for a LoRA's base (every training stage shards it); a stage under train.deepspeed is checked
    at start as the ZeRO stage and offload its config names, under FSDP2 as train.cpu_offload says."""
    from core.plan import layout, layouts, offload_of, sharding_of

    shape = STAGES["sft"].plan
    full = estimate(_cfg(lora={"enabled": False}), shape, device="cpu")
    adapter = estimate(_cfg(), shape, device="cpu")
    full_rows = layouts(full, 4, None, shape.shardings, shape.offloads)
    assert {(r.sharding, r.offload) for r in full_rows if r.sharding == "fsdp2"} == {
        ("fsdp2", "none"),
        ("fsdp2", "optimizer+weights"),
    }
    assert all("fsdp2" in STAGES[s].plan.shardings for s in ("sft", "reward", "dpo", "ppo"))
    offered = layouts(adapter, 4, None, shape.shardings, shape.offloads)
    assert "fsdp2" in {r.sharding for r in offered}
    assert layout(adapter, 4, "fsdp2").terms["weights"] < layout(adapter, 4, "ddp").terms["weights"]
    assert sharding_of(_cfg(lora={"enabled": False}, train={"sharding": "fsdp2"})) == "fsdp2"
    for stage, name in ((3, "zero3"), (2, "zero2"), (0, "ddp")):
        ds = tmp_path / f"z{stage}.json"
        ds.write_text(json.dumps({"zero_optimization": {"stage": stage}}))
        assert sharding_of(_cfg(train={"deepspeed": str(ds)})) == name
    assert sharding_of(_cfg()) == "ddp" and offload_of(_cfg()) == "none"
    assert offload_of(_cfg(lora={"enabled": False}, train={"sharding": "fsdp2", "cpu_offload": True})) == (
        "optimizer+weights"
    )
    for sections, offload in (
        ({"offload_optimizer": {"device": "cpu"}}, "optimizer"),
        ({"offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}, "optimizer+weights"),
        ({"offload_optimizer": {"device": "none"}}, "none"),
    ):
        ds = tmp_path / "offload.json"
        ds.write_text(json.dumps({"zero_optimization": {"stage": 3, **sections}}))
        assert offload_of(_cfg(train={"deepspeed": str(ds)})) == offload


def test_ppo_is_planned_under_fsdp2_and_zero3_with_a_lora_policy_too():
    """PPO shards a LoRA policy's base under FSDP2 and ZeRO-3: `align plan` offers both for it, with the base's
    weights split across the processes."""
    from core.plan import layout, layouts
    from data_schemas.config import PPOConfig

    ppo = PPOConfig(output_dir="x", init_from="tiny-random-llama", precision="fp32",
                    prompts={"train_file": "p.jsonl", "max_prompt_length": 16}, rollout={"engine": "generate"},
                    reward={"rule": {"kind": "contains", "text": "a"}})  # fmt: skip
    shape = STAGES["ppo"].plan
    plan = estimate(ppo, shape, device="cpu")
    assert plan.trainable < plan.params  # a LoRA policy
    rows = layouts(plan, 4, None, shape.shardings, shape.offloads, shape.offload_shardings)
    assert {"fsdp2", "zero3"} <= {r.sharding for r in rows if r.processes == 4}
    offloaded = {(r.sharding, r.offload) for r in rows if r.offload != "none"}
    assert offloaded == {("fsdp2", "optimizer+weights")}  # train.cpu_offload; not yet under its ZeRO-3 engine
    assert layout(plan, 4, "fsdp2").terms["weights"] < layout(plan, 4, "ddp").terms["weights"]


def test_a_hard_memory_cap_refuses_what_surely_does_not_fit_and_sharding_divides_it(monkeypatch):
    """Under a cgroup limit, a run whose weights, gradients and optimizer state alone exceed it is refused in a
    sentence (exit 2) before it starts; the same run's share under FSDP2 in 4 processes on 4 machines fits."""
    import core.plan
    from core.config import UserError
    from data_schemas.config import PPOConfig

    ppo = PPOConfig(output_dir="x", init_from="tiny-random-llama", precision="fp32", lora={"enabled": False},
                    prompts={"train_file": "p.jsonl", "max_prompt_length": 16}, rollout={"engine": "generate"},
                    reward={"rule": {"kind": "contains", "text": "a"}})  # fmt: skip
    plan = estimate(ppo, STAGES["ppo"].plan, device="cpu")
    bounds = ("activations", "logits (fp32)")
    surely = plan.total - sum(plan.terms[k] for k in bounds)
    share = core.plan.layout(plan, 4, "fsdp2")
    share_surely = share.total - sum(share.terms[k] for k in bounds)
    assert share_surely < surely  # 1/4 of the state, plus two gathered units
    cap = (surely + share_surely) / 2
    monkeypatch.setattr(core.plan, "memory_cap", lambda: cap)
    with pytest.raises(
        UserError, match="holds at least .* GiB per process .* reference copy .* memory limit"
    ):
        core.plan.check_at_start(ppo, STAGES["ppo"].plan)
    sharded = ppo.model_copy(update={"train": ppo.train.model_copy(update={"sharding": "fsdp2"})})
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    core.plan.check_at_start(sharded, STAGES["ppo"].plan)  # no refusal (at most a warning)
    # on a CPU the host is the same memory: offloading a share to it (train.cpu_offload) frees nothing
    offloaded = sharded.model_copy(update={"train": sharded.train.model_copy(update={"cpu_offload": True})})
    monkeypatch.setattr(core.plan, "memory_cap", lambda: 0.9 * share_surely)
    for run in (sharded, offloaded):
        with pytest.raises(UserError, match="holds at least"):
            core.plan.check_at_start(run, STAGES["ppo"].plan)
    monkeypatch.setattr(core.plan, "memory_cap", lambda: None)
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setattr(core.plan, "capacity", lambda dev: 1000 * GIB)
    assert core.plan.check_at_start(ppo, STAGES["ppo"].plan) is None  # no cap: never refused


def test_the_memory_cap_is_read_from_this_process_cgroup():
    from core.plan import memory_cap

    cap = memory_cap()
    assert cap is None or cap > 0
