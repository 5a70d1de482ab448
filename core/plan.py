"""Memory planning: how much memory a training stage will need at its peak, and whether it fits here.

    align plan --config configs/sft.yaml [KEY=VALUE ...] [--stage sft|reward|dpo|ppo]

The estimate adds up the terms every trainer holds at its peak (the backward pass of the largest micro-batch):
- weights: parameters x bytes of the precision (4-bit NF4 for QLoRA: 0.5 byte + its scales);
- gradients and AdamW's two moments for the trainable parameters only (fp32 for PEFT adapters, which PEFT keeps in
  fp32; the model's precision otherwise);
- activations kept for backward: per layer and token about 34 x hidden bytes at 16 bits (Korthikanti et al. 2022,
  "Reducing activation recomputation"), doubled at fp32; with `train.gradient_checkpointing`, each block's input
  (hidden x bytes per layer and token) plus one block's activations; plus, with eager attention, the attention scores and
  softmax (heads x row^2 per layer; SDPA's fused kernels do not keep them), plus the logits and their
  softmax in fp32 (tokens x vocabulary x 8 bytes: the largest single tensor for a small model with a large
  vocabulary);
- PPO: the value head's activations are shared; the rollout engine's KV cache (`rollout.vllm_kv_cache_gb`);
- the runtime: about 1.5 GiB for a CPU process with torch and the libraries, 0.6 GiB for a CUDA context.

Under N processes (`layout`, a SHARDINGS row) a process holds 1/N of what its sharding partitions, two gathered
units where the weights are partitioned, and, under DeepSpeed's ZeRO, the optimizer's fp32 master copy of its
partition of the trainable weights (4 bytes per trainable parameter / N).

The model is built from its config on the `meta` device (no weights read), so counting a 70B model takes seconds;
trainable parameters come from the same selection code the stages use (LoRA target modules, core/partial.py);
virtual-token methods count their embeddings (and P-tuning's encoder) and lengthen every sequence by them.
The brief's rule of thumb, about 2.5x the weights, is shown beside the estimate. docs/configuration.md gives the
measured error on this machine.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.config import UserError
from core.dist import capacity, memory_cap
from core.manifest import read_manifest
from core.partial import trainable_names
from core.tables import table

GIB = 1024**3
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass
class Plan:
    stage: str
    model: str
    precision: str
    device: str
    terms: dict[str, float] = field(default_factory=dict)  # bytes
    capacity: float | None = None  # bytes available on the device
    params: int = 0
    trainable: int = 0
    largest_unit: float = (
        0.0  # bytes of the largest sharding unit (a decoder layer, or the rest: embeddings, head)
    )

    @property
    def total(self) -> float:
        return sum(self.terms.values())

    @property
    def rule_of_thumb(self) -> float:
        return 2.5 * self.terms.get("weights", 0.0)

    @property
    def fits(self) -> bool | None:
        return None if self.capacity is None else self.total <= self.capacity

    def lines(self) -> list[str]:
        out = [f"{self.stage} on {self.device}: {self.model} in {self.precision}, {self.params / 1e6:.1f}M parameters, "
               f"{self.trainable / 1e6:.2f}M trainable"]  # fmt: skip
        out += [f"  {k:<24} {v / GIB:8.2f} GiB" for k, v in self.terms.items()]
        out += [f"  {'estimated peak':<24} {self.total / GIB:8.2f} GiB   (rule of thumb 2.5 x weights: "
                f"{self.rule_of_thumb / GIB:.2f} GiB)"]  # fmt: skip
        if self.capacity is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            out.append(f"  {'available':<24} {self.capacity / GIB:8.2f} GiB   -> {verdict}")
        else:
            out.append(f"  {'available':<24} unknown (no {self.device} device here to measure)")
        return out


def meta_model(name_or_path: str, trust_remote_code: bool = False):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from core.models import loading, resolve_model_path

    with loading(f"model {name_or_path}"):
        config = AutoConfig.from_pretrained(
            resolve_model_path(name_or_path), trust_remote_code=trust_remote_code
        )
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def lora_trainable(model, target_modules: list[str], r: int) -> int:
    import torch

    n = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and (
            target_modules == ["all-linear"]
            and "lm_head" not in name
            or name.split(".")[-1] in target_modules
        ):
            n += r * (mod.in_features + mod.out_features)
    return n


def ia3_trainable(model) -> int:
    import torch

    n = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            last = name.split(".")[-1]
            n += (
                mod.out_features
                if last in ("k_proj", "v_proj")
                else mod.in_features
                if last == "down_proj"
                else 0
            )
    return n


def virtual_trainable(mc, method: str, n: int) -> int:
    """Parameters of the virtual-token methods (PEFT): prompt tuning n x hidden embeddings; P-tuning the same plus
    its MLP encoder (three hidden x hidden layers with biases); prefix tuning a key and a value per layer and
    token (key/value width: kv heads x head size)."""
    h = mc.hidden_size
    if method == "prompt_tuning":
        return n * h
    if method == "p_tuning":
        return n * h + 3 * (h * h + h)
    kv = getattr(mc, "num_key_value_heads", None) or mc.num_attention_heads
    head_dim = getattr(mc, "head_dim", None) or h // mc.num_attention_heads
    return n * mc.num_hidden_layers * 2 * kv * head_dim


def _never(cfg) -> bool:
    return False


def _no_engine(cfg) -> float | None:
    return None


@dataclass(frozen=True)
class PlanShape:
    """What `estimate` needs to know of a stage's training step: a field of the stage's row (stages/registry.py)."""

    step: Callable[[Any], tuple[int, int]]  # cfg -> (sequences per micro-batch, tokens per sequence)
    scalar_head: bool = False  # a scalar head (trainable, fp32) instead of vocabulary logits: a reward model
    packed_rows: Callable[[Any], bool] = _never  # padding-free rows of up to max(seq_len, 1024) tokens
    engine_gib: Callable[[Any], float | None] = _no_engine  # a rollout engine's KV cache beside the trainer
    # a frozen second copy of the weights beside the trainer (a full-parameter policy's reference)
    reference_copy: Callable[[Any], bool] = _never
    # how align spreads this stage over processes (SHARDINGS rows) and what it can offload (OFFLOADS)
    shardings: tuple[str, ...] = ("ddp", "zero2", "zero3")
    offloads: tuple[str, ...] = ("none", "optimizer", "optimizer+weights")
    offload_shardings: tuple[str, ...] = (
        "zero2",
        "zero3",
        "fsdp2",
    )  # the shardings this stage offloads under


def base_model_name(cfg) -> tuple[str, bool]:
    """(model, trust_remote_code): the SFT artifact's base where the stage builds on one (init_from), the
    checkpoint init_from names, else cfg.model, else align's default model."""
    from core.models import DEFAULT_MODEL

    model_cfg = getattr(cfg, "model", None)
    trust = bool(getattr(model_cfg, "trust_remote_code", False))
    init = getattr(cfg, "init_from", None)
    if init is not None and (Path(init) / "manifest.json").exists():
        m = read_manifest(Path(init))
        if m.model is not None:
            return m.model.name, trust
    elif init is not None:  # a checkpoint (folder, alias or hub id)
        return str(init), trust
    return (model_cfg.name_or_path if model_cfg is not None else DEFAULT_MODEL), trust


def estimate(cfg, shape: PlanShape, device: str | None = None, precision: str | None = None) -> Plan:
    from core.models import choose_precision

    stage = cfg.stage
    name, trust = base_model_name(cfg)
    model = meta_model(name, trust)
    mc = model.config
    prec = precision or choose_precision(cfg.precision)
    params = sum(p.numel() for p in model.parameters())
    lora = getattr(cfg, "lora", None)
    peft = getattr(cfg, "peft", None)
    method = peft.method if peft is not None else "lora"
    virtual = 0  # positions prompt and P-tuning add before every sequence
    if lora is not None and lora.enabled and peft is not None and peft.virtual_tokens:
        trainable = virtual_trainable(mc, method, peft.num_virtual_tokens)
        virtual = 0 if method == "prefix_tuning" else peft.num_virtual_tokens
        grad_bytes = 4
    elif lora is not None and lora.enabled:
        r = lora.r * 3 // 2 if method == "adalora" else lora.r
        trainable = ia3_trainable(model) if method == "ia3" else lora_trainable(model, lora.target_modules, r)
        grad_bytes = 4  # PEFT keeps adapters in fp32
    else:
        partial = getattr(cfg, "partial", None)
        if partial is not None and not partial.is_default:
            names = trainable_names(model, partial, model.config.num_hidden_layers if partial.unfreeze else 0)
            trainable = sum(p.numel() for n, p in model.named_parameters() if n in names)
        else:
            trainable = params
        grad_bytes = BYTES[prec]
    if shape.scalar_head:
        trainable += mc.hidden_size  # the scalar head, fp32
    weight_bytes = 0.5 + 2 / 64 if method == "qlora" else BYTES[prec]  # NF4 + a bf16 scale per 64 weights
    unit = largest_unit(model) * weight_bytes
    seqs, seq_len = shape.step(cfg)
    seq_len += virtual
    tokens = seqs * seq_len
    act_scale = BYTES[prec] / 2
    L, h, heads = mc.num_hidden_layers, mc.hidden_size, mc.num_attention_heads
    # eager attention keeps each row's scores and softmax for backward (a packed row holds up to
    # max(seq_len, 1024) tokens); SDPA's fused kernels (CPU and CUDA) and flash attention do not
    row = max(seq_len, 1024) if shape.packed_rows(cfg) else seq_len
    rows = math.ceil(tokens / row)
    eager = getattr(getattr(cfg, "model", None), "attn_implementation", "sdpa") == "eager"
    terms = {
        "weights": params * weight_bytes,
        "gradients": trainable * grad_bytes,
        "optimizer (AdamW)": 2 * trainable * grad_bytes,
        "activations": (
            # checkpointing keeps each block's input and recomputes one block at a time during backward
            L * tokens * h * BYTES[prec] + tokens * 34 * h * act_scale
            if getattr(cfg.train, "gradient_checkpointing", False)
            else L * tokens * 34 * h * act_scale
        )
        + (L * rows * heads * row * row * 2 * BYTES[prec] if eager else 0),
        "logits (fp32)": 0.0 if shape.scalar_head else tokens * mc.vocab_size * 8,
    }
    if shape.reference_copy(cfg):
        terms["reference (frozen copy)"] = params * weight_bytes
    engine = shape.engine_gib(cfg)
    if engine is not None:
        terms["rollout engine (KV)"] = engine * GIB
    dev = device or _device()
    terms["runtime"] = (0.6 if dev.startswith("cuda") else 1.5) * GIB
    return Plan(stage, name, prec, dev, terms, capacity(dev), params, trainable, unit)


def largest_unit(model) -> int:
    """Parameters of the largest unit FSDP2 and ZeRO-3 gather at once: one decoder layer (the longest ModuleList
    holds them), or everything outside the layers (embeddings, final norm, LM head: the root unit)."""
    from core.sharded import decoder_layers  # the units core/sharded.py shards: one definition for both

    sizes = [sum(p.numel() for p in layer.parameters()) for layer in decoder_layers(model)]
    total = sum(p.numel() for p in model.parameters())
    return max([*sizes, total - sum(sizes)])


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# Terms that are upper bounds (every sequence assumed max_length long); the others are counted exactly.
BOUNDS = ("activations", "logits (fp32)")


def sharding_of(cfg) -> str:
    """The SHARDINGS row a stage's config runs under: train.sharding, or the ZeRO stage of its train.deepspeed
    config (stage 3 partitions the weights, 1 and 2 the gradients and moments), else ddp."""
    t = getattr(cfg, "train", None)
    sharding = getattr(t, "sharding", "ddp")
    if sharding != "ddp" and sharding in SHARDINGS:
        return sharding
    ds = getattr(t, "deepspeed", None)
    if ds is not None:
        try:
            stage = int(json.loads(Path(ds).read_text()).get("zero_optimization", {}).get("stage", 0))
        except (OSError, ValueError, TypeError, AttributeError):
            return "ddp"
        return "zero3" if stage >= 3 else "zero2" if stage >= 1 else "ddp"
    return "ddp"


def offload_of(cfg) -> str:
    """The OFFLOADS row a stage's config runs under: train.cpu_offload (FSDP2), or the offload sections of its ZeRO
    config (offload_optimizer, offload_param to the cpu), else none."""
    t = getattr(cfg, "train", None)
    if getattr(t, "cpu_offload", False):
        return "optimizer+weights"
    ds = getattr(t, "deepspeed", None)
    if ds is None:
        return "none"
    try:
        zero = json.loads(Path(ds).read_text()).get("zero_optimization", {})
        on_cpu = {
            k for k in ("offload_optimizer", "offload_param") if (zero.get(k) or {}).get("device") == "cpu"
        }
    except (OSError, ValueError, TypeError, AttributeError):
        return "none"
    return "optimizer+weights" if "offload_param" in on_cpu else "optimizer" if on_cpu else "none"


def check_at_start(cfg, shape: PlanShape) -> str | None:
    """Before a training stage starts: a refusal (UserError, exit 2) when what this process surely holds (weights,
    gradients, optimizer moments, a reference copy, gathered units, the runtime: everything but the activations and
    logits, which the estimate bounds from above) exceeds its hard memory cap (cgroup) on CPU, shared by the
    processes of this machine; else a warning when the whole estimate exceeds the memory available; None when it
    fits or cannot be estimated. Under several processes the process's share is the stage's sharding
    (`train.sharding`, layout())."""
    try:
        plan = estimate(cfg, shape)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        mine = layout(plan, world, sharding_of(cfg), offload_of(cfg)) if world > 1 else None
    except Exception:  # noqa: BLE001 (planning must never stop a run: only a clear excess does)
        return None
    terms = dict(mine.terms) if mine is not None else plan.terms
    if mine is not None and mine.host and plan.device == "cpu":  # offloaded to the host: the same memory here
        terms["offloaded to the host"] = mine.host
    total = sum(terms.values())
    surely = total - sum(terms.get(k, 0.0) for k in BOUNDS)
    cap = memory_cap() if plan.device == "cpu" else None
    if cap is not None and surely > cap / local:
        raise UserError(
            f"this {plan.stage} run holds at least {surely / GIB:.1f} GiB per process (weights, gradients, optimizer "
            f"state{', reference copy' if 'reference (frozen copy)' in terms else ''} and runtime, before any "
            f"activation) and each of this machine's {local} process(es) may use {cap / local / GIB:.1f} GiB (its "
            "memory limit); shard it over more processes (train.sharding=fsdp2 --num-processes N), train an "
            "adapter (lora.enabled=true), or see `align plan --gpus N`"
        )
    capacity = plan.capacity / local if plan.capacity is not None and plan.device == "cpu" else plan.capacity
    if capacity is None or total <= capacity:
        return None
    return (
        f"this {plan.stage} run needs about {total / GIB:.1f} GiB per process at its peak and "
        f"{capacity / GIB:.1f} GiB is available on {plan.device}; lower the batch or sequence length, use "
        "LoRA or QLoRA, or see `align plan`"
    )


def plan_data(plan: Plan) -> dict[str, Any]:
    return {"stage": plan.stage, "model": plan.model, "precision": plan.precision, "device": plan.device,
            "params": plan.params, "trainable": plan.trainable, "terms_gib": {k: v / GIB for k, v in plan.terms.items()},
            "total_gib": plan.total / GIB, "rule_of_thumb_gib": plan.rule_of_thumb / GIB,
            "capacity_gib": None if plan.capacity is None else plan.capacity / GIB, "fits": plan.fits}  # fmt: skip


# ==========================================================================================================
# Several processes: what one process of N holds under each way of sharding, and the smallest layout that fits
# ==========================================================================================================
@dataclass(frozen=True)
class Sharding:
    """A way of spreading training state over N processes (one per GPU): which of the weights, gradients and
    optimizer moments each process holds 1/N of. A process that shards its weights gathers one unit at a time to
    compute (two in flight: the one in use and the next, prefetched)."""

    name: str
    help: str
    weights: bool
    gradients: bool
    optimizer: bool
    how: str  # how align runs it
    offloads: tuple[str, ...] = ("none",)  # what align can move to the host under it (OFFLOADS)
    # its offload moves every sharded tensor: the weights' shards with their gradients (and a frozen reference's)
    offload_all: bool = False
    # DeepSpeed's ZeRO optimizer keeps an fp32 copy of each process's partition of the trainable weights beside the
    # weights themselves (its master copy, whatever the training precision): 4 bytes per trainable parameter / N
    master_copy: bool = False


# Where optimizer moments (and, with sharded weights, the weights) live between steps: the accelerator, or the host.
OFFLOADS = ("none", "optimizer", "optimizer+weights")

SHARDINGS: dict[str, Sharding] = table(
    Sharding("ddp", "every process holds every weight, gradient and moment", False, False, False,
             "--num-processes N"),
    Sharding("zero2", "DeepSpeed ZeRO-2: gradients and optimizer moments partitioned", False, True, True,
             "train.deepspeed=configs/deepspeed/zero2.json --num-processes N", ("none", "optimizer"),
             master_copy=True),
    Sharding("zero3", "DeepSpeed ZeRO-3: weights too (a frozen reference copy as well)", True, True, True,
             "train.deepspeed=configs/deepspeed/zero3.json --num-processes N", OFFLOADS, master_copy=True),
    Sharding("fsdp2", "torch FSDP2 (fully_shard): as ZeRO-3 (full-parameter or a LoRA's base); its offload "
             "(train.cpu_offload) moves weights, gradients and moments", True, True, True,
             "train.sharding=fsdp2 --num-processes N", ("none", "optimizer+weights"), offload_all=True),
)  # fmt: skip


@dataclass
class Layout:
    """One process of `processes` under `sharding` and `offload`: bytes on its accelerator, term by term, and on
    the host (offloaded state). `capacity`: the accelerator memory a process may use; `host_capacity`: the host
    memory it may use (its machine's, shared by the processes on it), None where unknown."""

    processes: int
    sharding: str
    offload: str
    terms: dict[str, float]
    host: float
    capacity: float | None
    host_capacity: float | None = None

    @property
    def total(self) -> float:
        return sum(self.terms.values())

    @property
    def fits(self) -> bool | None:
        """Whether both its accelerator share and what it offloads fit (None: either is unknown)."""
        if self.capacity is None or (self.host and self.host_capacity is None):
            return None
        return self.total <= self.capacity and (not self.host or self.host <= self.host_capacity)


# Accelerators per machine where a layout's processes share a host (HGX/DGX nodes: 8 GPUs, one host memory).
PER_MACHINE = 8


def layout(
    plan: Plan,
    processes: int,
    sharding: str,
    offload: str = "none",
    capacity: float | None = None,
    host_memory: float | None = None,
) -> Layout:
    """What one process holds when `plan` runs in `processes` processes under `sharding` (SHARDINGS) and `offload`
    (OFFLOADS). Activations, logits, a rollout engine's cache and the runtime are per process whatever the
    sharding (each process runs its own micro-batch); a frozen reference copy is sharded with the weights.
    `host_memory`: one machine's host memory, shared by its processes (PER_MACHINE at most)."""
    s, n, t = SHARDINGS[sharding], processes, plan.terms
    if offload not in s.offloads:
        raise ValueError(f"align offloads {' or '.join(s.offloads)} under {sharding}, not {offload}")
    per = {
        "weights": t["weights"] / n if s.weights else t["weights"],
        "gradients": t["gradients"] / n if s.gradients else t["gradients"],
        "optimizer (AdamW)": t["optimizer (AdamW)"] / n if s.optimizer else t["optimizer (AdamW)"],
    }
    master = "master weights (fp32, DeepSpeed)"
    if s.master_copy:  # without it the plan was 15% under a 2-process ZeRO-3 peak (bench/sharding.py)
        per[master] = plan.trainable * 4 / n
    host = 0.0
    if offload in ("optimizer", "optimizer+weights"):
        host, per["optimizer (AdamW)"] = host + per["optimizer (AdamW)"], 0.0
        if s.master_copy:  # the master copy lives where the optimizer steps
            host, per[master] = host + per[master], 0.0
    if offload == "optimizer+weights":
        host, per["weights"] = host + per["weights"], 0.0
        if s.offload_all:
            host, per["gradients"] = host + per["gradients"], 0.0
    if s.weights:
        per["gathered units (2 in flight)"] = 2 * plan.largest_unit
    if "reference (frozen copy)" in t:
        per["reference (frozen copy)"] = t["reference (frozen copy)"] / (n if s.weights else 1)
        if offload == "optimizer+weights" and s.offload_all:
            host, per["reference (frozen copy)"] = host + per["reference (frozen copy)"], 0.0
    for k in ("activations", "logits (fp32)", "rollout engine (KV)", "runtime"):
        if k in t:
            per[k] = t[k]
    host_capacity = None if host_memory is None else host_memory / min(n, PER_MACHINE)
    return Layout(n, sharding, offload, per, host, capacity, host_capacity)


def layouts(
    plan: Plan,
    gpus: int,
    capacity: float | None,
    shardings=None,
    offloads=None,
    offload_shardings=None,
    host_memory: float | None = None,
) -> list[Layout]:
    """Every layout of 1, 2, 4, ... up to `gpus` processes (and `gpus` itself), in the order a team would try them:
    fewer processes first, then less sharding, then no offload before offload. `shardings`, `offloads`,
    `offload_shardings`: what the stage offers (PlanShape), narrowed by the user; `host_memory`: a machine's
    (`layout`), which what a layout offloads must fit."""
    counts = sorted({*(2**k for k in range(gpus.bit_length()) if 2**k <= gpus), gpus})
    out = []
    for n in counts:
        for name, s in SHARDINGS.items():
            if shardings and name not in shardings:
                continue
            for off in OFFLOADS:
                if (offloads and off not in offloads) or off not in s.offloads:
                    continue
                if off != "none" and offload_shardings is not None and name not in offload_shardings:
                    continue  # this stage offloads nothing under this sharding
                if n == 1 and name != "ddp":
                    continue  # one process shards nothing
                out.append(layout(plan, n, name, off, capacity, host_memory))
    return out


def smallest_fit(rows: list[Layout]) -> Layout | None:
    """The first layout that fits, in `layouts` order: the fewest processes, the least sharding, no offload."""
    return next((r for r in rows if r.fits), None)


def cluster_lines(plan: Plan, rows: list[Layout], gpus: int) -> list[str]:
    cap = rows[0].capacity if rows else None
    head = (f"{plan.stage}: {plan.model} in {plan.precision}, {plan.params / 1e9:.2f}B parameters, "
            f"{plan.trainable / 1e6:.1f}M trainable; up to {gpus} processes of "
            f"{'?' if cap is None else f'{cap / GIB:.0f}'} GiB each")  # fmt: skip
    host = rows[0].host_capacity if rows else None
    if host is not None:
        head += f"; {host * min(rows[0].processes, PER_MACHINE) / GIB:.0f} GiB of host memory per machine"
    out = [head, f"  {'processes':>9}  {'sharding':<8} {'offload':<18} {'per process':>12} {'host':>9}  fits"]
    for r in rows:
        fits = "?" if r.fits is None else ("yes" if r.fits else "no")
        out.append(f"  {r.processes:>9}  {r.sharding:<8} {r.offload:<18} {r.total / GIB:>8.1f} GiB "
                   f"{r.host / GIB:>5.1f} GiB  {fits}")  # fmt: skip
    best = smallest_fit(rows)
    if best is None:
        out.append(
            "  nothing fits: more processes, LoRA (lora.enabled=true), a shorter max length or a smaller batch"
        )
    else:
        how = SHARDINGS[best.sharding].how.replace("N", str(best.processes))
        off = (
            ""
            if best.offload == "none"
            else f", offloading the {best.offload.replace('+', ' and ')} to the host"
        )
        out.append(f"  smallest that fits: {best.processes} x {best.sharding}{off} ({how})")
    return out


def layout_data(r: Layout) -> dict[str, Any]:
    return {"processes": r.processes, "sharding": r.sharding, "offload": r.offload,
            "terms_gib": {k: v / GIB for k, v in r.terms.items()}, "total_gib": r.total / GIB,
            "host_gib": r.host / GIB, "host_capacity_gib": None if r.host_capacity is None else r.host_capacity / GIB,
            "fits": r.fits}  # fmt: skip
