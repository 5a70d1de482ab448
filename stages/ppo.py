"""`align ppo`: PPO with a KL penalty to the SFT model, vLLM rollouts and a LoRA policy.

Reads top to bottom: prompts -> policy (SFT merged + fresh LoRA + value head) -> rollout engine -> for each
iteration: sample, score, recompute log-probs/values/reference log-probs, GAE, several clipped PPO epochs, push
the new weights to the engine -> evaluate (win rate vs SFT) -> artifact -> perplexity gate.

The algorithm follows Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences"), Ouyang et al.
2022 (InstructGPT) and Huang et al. 2024 ("The N+ Implementation Details of RLHF with PPO"):
- the score of a response is given at its last token; every token also pays -kl_coef * (log pi - log pi_ref);
- GAE over response tokens, advantages whitened per batch, returns = advantages + values;
- clipped policy ratio and clipped value objectives; several epochs over minibatches of the batch;
- a response that never emits EOS loses `missing_eos_penalty` from its score;
- fixed or adaptive KL coefficient.

Design choices, and why:
- Reference = the policy with its adapter disabled: the SFT adapter is merged into the weights first, so the
  reference is exactly SFT and costs no second copy of the model.
- Value head = one linear layer on the policy trunk's last hidden state (shared trunk, as in Ziegler et al.):
  one forward gives log-probs and values, which on a CPU or a single GPU halves the cost of a separate critic.
  `vf_coef` keeps value gradients from dominating the LoRA update.
- Logits are computed only at response positions (the trunk runs over the whole sequence, the 49k-wide LM head
  only where a loss is taken).
- Every iteration's randomness (prompt order, sampling seeds, minibatch order, dropout) is derived from
  (seed, iteration), so a resumed run draws exactly what the uninterrupted one would have.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from align.chat import neutralise, render_prompt, special_strings
from align.config import UserError, dump_config
from align.manifest import ArtifactWriter, atomic_write_json, atomic_write_text, replace_dir
from align.models import choose_precision, load_causal_lm, load_tokenizer, model_identity, resolve_model_path
from data_schemas.config import PPOConfig
from stages.common import (
    key_config,
    policy_perplexity_gate,
    prepare_output_dir,
    sft_base,
)

console = Console(stderr=True)


# ==========================================================================================================
# Pure functions: KL penalty, GAE, whitening, the two clipped losses, the KL controller
# ==========================================================================================================
def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked entries (unbiased variance, as in Ziegler et al.'s reference code)."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = ((x - mean) ** 2 * mask).sum() / (n - 1).clamp(min=1)
    w = (x - mean) * torch.rsqrt(var + 1e-8)
    return (w if shift_mean else w + mean) * mask


def token_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards r_t = -kl_coef * (log pi(y_t) - log pi_ref(y_t)), plus the score at the last token.

    scores [B]; logprobs, ref_logprobs, mask [B, R] (mask 1 on response tokens, left-aligned).
    Returns (rewards [B, R], kl [B, R]) where kl is the per-token estimate k1 = log pi - log pi_ref."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(1).long() - 1).clamp(min=0)  # [B] index of each response's final token
    rewards[torch.arange(len(scores)), last] += scores
    return rewards * mask, kl


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), over left-aligned response tokens.

    delta_t = r_t + gamma * V_{t+1} - V_t  (V_{t+1} = 0 after the last token)
    A_t = delta_t + gamma * lam * A_{t+1};   returns_t = A_t + V_t.
    rewards, values, mask [B, R] -> (advantages [B, R], returns [B, R]), zero outside the mask."""
    B, R = rewards.shape
    adv = torch.zeros_like(rewards)
    next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_adv = torch.zeros_like(next_value)
    for t in reversed(range(R)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = a * m
        # positions past the end of a response carry nothing back
        next_value = torch.where(m > 0, values[:, t], torch.zeros_like(next_value))
        next_adv = torch.where(m > 0, a, torch.zeros_like(next_adv))
    return adv, (adv + values) * mask


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise:
    L = mean_t max(-A_t * rho_t, -A_t * clip(rho_t, 1-eps, 1+eps)),  rho_t = exp(log pi - log pi_old).
    All inputs [B, R]. Also returns the clip fraction and the approximate KL(old || new) = mean((rho-1) - log rho).
    """
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean((ratio - 1) - log_ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: 0.5 * mean_t max((V - G)^2, (V_old + clip(V - V_old, -eps, eps) - G)^2).
    All inputs [B, R]. Returns (loss, fraction of tokens where the clipped term was larger)."""
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    a = (values - returns) ** 2
    b = (v_clipped - returns) ** 2
    return 0.5 * masked_mean(torch.maximum(a, b), mask), masked_mean((b > a).float(), mask).detach()


class KLController:
    """Fixed KL coefficient, or the adaptive controller of Ziegler et al. 2019 (section 2.2):
    e = clip(KL / target - 1, -0.2, 0.2);  beta <- beta * (1 + e * n / horizon), n = responses in the batch."""

    def __init__(self, coef: float, target: float | None, horizon: int):
        self.value, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.target is None:
            return
        e = max(-0.2, min(0.2, kl / self.target - 1.0))
        self.value *= 1.0 + e * n / self.horizon


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(G - V) / Var(G) over response tokens (1 = perfect critic, <= 0 = no better than a constant)."""
    var_g = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    diff = returns - values
    var_d = masked_mean((diff - masked_mean(diff, mask)) ** 2, mask)
    return float(1 - var_d / var_g) if var_g > 0 else float("nan")


# ==========================================================================================================
# Data: prompts
# ==========================================================================================================
def load_prompts(cfg: PPOConfig, tokenizer) -> tuple[list[list[dict]], list[list[dict]], dict[str, int]]:
    """(train prompts, held-out prompts, counts). A prompt is a conversation up to, not including, its last
    assistant turn; control-token text in it is neutralised; prompts over max_prompt_length are skipped."""
    from stages.data import has_split, load_instructions

    p = cfg.prompts
    specials = special_strings(tokenizer)

    skipped: list[str] = []

    def prompts_of(path: Path, split: str) -> list[list[dict]]:
        convs, report = load_instructions(path, split=split)
        skipped.extend(report.problems)
        out = []
        for c in convs:
            msgs = [m.model_dump() for m in c.messages]
            last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
            out.append([{**m, "content": neutralise(m["content"], specials)} for m in msgs[:last]])
        return out

    train = prompts_of(Path(p.train_file), "train")
    if p.validation_file is not None:
        held = prompts_of(Path(p.validation_file), "train")
    elif Path(p.train_file).is_dir() and has_split(Path(p.train_file), "validation"):
        held = prompts_of(Path(p.train_file), "validation")
    else:  # hold out the tail of the training prompts
        k = min(p.heldout_prompts, len(train) // 4)
        held, train = train[len(train) - k :] if k else [], train[: len(train) - k]
    for problem in skipped[:20]:  # bad rows are named (file:line: field: reason); good rows still load
        console.print(f"[yellow]skipped[/] {problem}")
    if len(skipped) > 20:
        console.print(f"[yellow]... and {len(skipped) - 20} more skipped rows[/]")
    counts = {"prompts_given": len(train), "rows_skipped": len(skipped)}
    keep = [m for m in train if len(render_prompt(tokenizer, m)) <= p.max_prompt_length]
    counts["prompts_too_long"] = len(train) - len(keep)
    train = keep[: p.max_prompts] if p.max_prompts else keep
    held = [m for m in held if len(render_prompt(tokenizer, m)) <= p.max_prompt_length][: p.heldout_prompts]
    counts.update({"train_prompts": len(train), "heldout_prompts": len(held)})
    if not train:
        raise UserError(f"{p.train_file}: no prompts of at most {p.max_prompt_length} tokens to train on")
    return train, held, counts


# ==========================================================================================================
# Reward
# ==========================================================================================================
class Reward:
    """Scores finished responses: a reward model artifact or a rule; EOS penalty and clipping applied here."""

    def __init__(self, settings):
        self.s = settings
        self.scorer = None
        if settings.artifact is not None:
            from stages.reward import RewardScorer

            self.scorer = RewardScorer(settings.artifact)

    def raw(self, prompts: list[list[dict]], responses: list[str]) -> list[float]:
        if self.scorer is not None:
            return self.scorer.score(prompts, responses)
        text = self.s.rule.text.lower()
        if self.s.rule.kind == "contains":
            return [1.0 if text in r.lower() else 0.0 for r in responses]
        return [r.lower().count(text) / max(len(r), 1) for r in responses]

    def __call__(self, prompts, responses: list[str], finished: list[bool]) -> torch.Tensor:
        s = torch.tensor(self.raw(prompts, responses), dtype=torch.float32)
        if self.s.missing_eos_penalty is not None:
            s = s - self.s.missing_eos_penalty * (~torch.tensor(finished)).float()
        if self.s.clip is not None:
            s = s.clamp(-self.s.clip, self.s.clip)
        return s


# ==========================================================================================================
# Policy with value head
# ==========================================================================================================
def build_policy(cfg: PPOConfig, precision: str):
    """(peft model: SFT merged + fresh LoRA, value head, base checkpoint path)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    base_cfg, sft_dir = sft_base(cfg.init_from, cfg.precision)
    model = load_causal_lm(base_cfg, precision)
    model = PeftModel.from_pretrained(model, sft_dir / "adapter").merge_and_unload()
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(cfg.train.seed)
    policy = get_peft_model(model, lora)
    hidden = model.config.hidden_size
    value_head = torch.nn.Linear(hidden, 1).to(dtype=next(model.parameters()).dtype)
    torch.nn.init.zeros_(value_head.weight)  # start predicting 0: no spurious advantages at step 1
    torch.nn.init.zeros_(value_head.bias)
    return policy, value_head, resolve_model_path(base_cfg.name_or_path)


def forward_response(
    policy, value_head, batch: dict[str, torch.Tensor], with_values: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Log-probs [B, R], values [B, R] (or None) and entropies [B, R] of the response tokens.

    batch: input_ids/attention_mask [B, T] (right-padded prompt+response), pos [B, R] = index of the hidden state
    that predicts each response token (the position before it), resp [B, R] the response ids, mask [B, R]."""
    base = policy.get_base_model()
    hidden = base.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    idx = batch["pos"].unsqueeze(-1).expand(-1, -1, hidden.shape[-1])  # [B, R, H]
    h = hidden.gather(1, idx)  # [B, R, H]: only where a token is predicted
    logits = base.lm_head(h).float()  # [B, R, V]
    logp_all = torch.log_softmax(logits, -1)
    logprobs = logp_all.gather(-1, batch["resp"].unsqueeze(-1)).squeeze(-1)  # [B, R]
    entropy = -(logp_all.exp() * logp_all).sum(-1)  # [B, R]
    values = value_head(h).squeeze(-1).float() if with_values else None  # [B, R]
    return logprobs, values, entropy


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
def run(cfg: PPOConfig, resume: bool = False) -> tuple[Path, dict[str, Any]]:
    out = Path(cfg.output_dir)
    if prepare_output_dir(out, "ppo", resume):
        gate = out / "gates" / "perplexity" / "gate.json"
        return out, json.loads(gate.read_text()) if gate.exists() else {}
    base_cfg, sft_dir = sft_base(cfg.init_from, cfg.precision)
    tokenizer = load_tokenizer(base_cfg)
    train_prompts, held_prompts, counts = load_prompts(cfg, tokenizer)
    console.print(f"prompts: {counts['train_prompts']} train / {counts['heldout_prompts']} held out")
    precision = choose_precision(cfg.precision)
    parents = [sft_dir] + ([Path(cfg.reward.artifact)] if cfg.reward.artifact else [])
    writer = ArtifactWriter(
        out,
        "ppo",
        key_config(cfg),
        [(cfg.prompts.train_file, "prompts")],
        parents=parents,
        seed=cfg.train.seed,
    )
    writer.start(model_identity(base_cfg, precision, adapter="adapter"))
    atomic_write_text(out / "config.yaml", dump_config(cfg))
    with writer.guard():
        return _train(
            cfg, resume, out, writer, tokenizer, precision, train_prompts, held_prompts, counts, sft_dir
        )


def _make_engine(cfg: PPOConfig, policy, tokenizer, base_path, precision: str):
    from stages.rollout import GenerateEngine, VLLMEngine, vllm_available

    want = cfg.rollout.engine
    if want == "auto":
        want = "vllm" if vllm_available() else "generate"
    if want == "vllm":
        if not vllm_available():
            raise UserError(
                "rollout.engine=vllm but vLLM is not installed (see docs/install.md), or use 'generate'"
            )
        return VLLMEngine(
            base_path,
            tokenizer,
            max_model_len=cfg.prompts.max_prompt_length + cfg.rollout.max_new_tokens + 8,
            precision=precision,
            seed=cfg.train.seed,
            kv_cache_gb=cfg.rollout.vllm_kv_cache_gb,
            gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
        )
    return GenerateEngine(policy, tokenizer)


def _train(cfg, resume, out, writer, tokenizer, precision, train_prompts, held_prompts, counts, sft_dir):
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    from safetensors.torch import load_file, save_file

    from stages.rollout import merged_state_dict

    t = cfg.train
    policy, value_head, base_path = build_policy(cfg, precision)
    params = [p for p in policy.parameters() if p.requires_grad] + list(value_head.parameters())
    opt = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    kl_ctl = KLController(t.kl_coef, t.kl_target, t.kl_horizon)
    start = 0
    ckpts = out / "checkpoints"
    if resume and ckpts.exists() and (latest := _latest_checkpoint(ckpts)) is not None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(policy, load_file(latest / "adapter.safetensors"))
        value_head.load_state_dict(load_file(latest / "value_head.safetensors"))
        opt.load_state_dict(torch.load(latest / "optimizer.pt", weights_only=True))
        state = json.loads((latest / "state.json").read_text())
        start, kl_ctl.value = state["step"], state["kl_coef"]
        for log in (out / "metrics.jsonl", out / "samples.jsonl"):  # drop what the lost iterations had logged
            if log.exists():
                keep = [
                    x for x in log.read_text().splitlines() if x.strip() and json.loads(x)["step"] <= start
                ]
                atomic_write_text(log, "".join(k + "\n" for k in keep))
        console.print(f"resuming from {latest} (iteration {start})")
    elif not resume:
        (out / "metrics.jsonl").unlink(missing_ok=True)
        (out / "samples.jsonl").unlink(missing_ok=True)

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    prompt_ids_all = [render_prompt(tokenizer, m) for m in train_prompts]
    reward = Reward(cfg.reward)
    engine = _make_engine(cfg, policy, tokenizer, base_path, precision)
    engine.update_weights(merged_state_dict(policy))
    console.print(f"rollout engine: {engine.name}")
    tb = None
    if "tensorboard" in t.report_to:
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(log_dir=str(out / "logs"))

    step = start
    progress = Progress(
        TextColumn("ppo"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} {task.fields[info]}"),
        TimeRemainingColumn(),
        console=console,
    )
    with progress:
        task = progress.add_task("ppo", total=t.steps, completed=start, info="")
        while step < t.steps:
            ts = time.perf_counter()
            # ---- rollouts ------------------------------------------------------------------------------
            idx = _prompt_indices(len(prompt_ids_all), t.rollout_batch_size, step, t.seed)
            prompts = [train_prompts[i] for i in idx]
            p_ids = [prompt_ids_all[i] for i in idx]
            responses = engine.generate(
                p_ids,
                cfg.rollout.max_new_tokens,
                cfg.rollout.temperature,
                cfg.rollout.top_p,
                t.seed * 1000 + step,
            )
            t_gen = time.perf_counter() - ts
            finished = [bool(r) and r[-1] == eos for r in responses]
            texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
            ts = time.perf_counter()
            scores = reward(prompts, texts, finished)  # [B]
            t_score = time.perf_counter() - ts

            # ---- what the rollouts were worth, under the current policy -----------------------------------
            ts = time.perf_counter()
            batch = collate(p_ids, responses, pad)
            mask = batch["mask"]
            policy.eval()
            with torch.no_grad():
                old_logprobs, old_values, _ = forward_response(policy, value_head, batch)
                with policy.disable_adapter():
                    ref_logprobs, _, _ = forward_response(policy, value_head, batch, with_values=False)
            rewards, kl = token_rewards(scores, old_logprobs, ref_logprobs, mask, kl_ctl.value)
            adv, returns = gae(rewards, old_values, mask, t.gamma, t.lam)
            if t.whiten_advantages:
                adv = masked_whiten(adv, mask)

            # ---- PPO epochs --------------------------------------------------------------------------
            policy.train()
            torch.manual_seed(t.seed * 1000 + step)  # dropout, reproducible across resume
            g = torch.Generator().manual_seed(t.seed * 1000 + step)
            stats: dict[str, list[float]] = {}
            B = len(responses)
            for _ in range(t.ppo_epochs):
                for mb in torch.randperm(B, generator=g).split(t.mini_batch_size):
                    sub = _sub(batch, mb)
                    lp, v, ent = forward_response(policy, value_head, sub)
                    pl, pstats = policy_loss(lp, old_logprobs[mb], adv[mb], sub["mask"], t.clip_range)
                    vl, vclip = value_loss(v, old_values[mb], returns[mb], sub["mask"], t.clip_range_value)
                    loss = pl + t.vf_coef * vl
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    gn = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
                    opt.step()
                    for k, x in {
                        "policy_loss": pl,
                        "value_loss": vl,
                        "value_clipfrac": vclip,
                        "grad_norm": gn,
                        "entropy": masked_mean(ent.detach(), sub["mask"]),
                        **pstats,
                    }.items():
                        stats.setdefault(k, []).append(float(x))
            t_train = time.perf_counter() - ts

            # ---- push the new weights to the sampler -----------------------------------------------------
            ts = time.perf_counter()
            if engine.name != "generate":
                engine.update_weights(merged_state_dict(policy))
            t_sync = time.perf_counter() - ts

            kl_per_response = float(kl.sum(1).mean())
            kl_ctl.update(kl_per_response, B)
            step += 1
            lengths = mask.sum(1)
            row = {
                "step": step,
                "reward_mean": float(scores.mean()),
                "reward_std": float(scores.std()) if B > 1 else 0.0,
                "kl": kl_per_response,
                "kl_coef": kl_ctl.value,
                "response_length": float(lengths.mean()),
                "finished_share": sum(finished) / B,
                "explained_variance": explained_variance(old_values, returns, mask),
                **{k: sum(v) / len(v) for k, v in stats.items()},
                "time_generate": t_gen,
                "time_score": t_score,
                "time_train": t_train,
                "time_sync": t_sync,
            }
            with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            if t.logging_samples:
                with open(out / "samples.jsonl", "a", encoding="utf-8") as f:
                    for i in range(min(t.logging_samples, B)):
                        f.write(
                            json.dumps(
                                {
                                    "step": step,
                                    "prompt": prompts[i],
                                    "response": texts[i],
                                    "score": float(scores[i]),
                                }
                            )
                            + "\n"
                        )
            if tb is not None:
                for k, x in row.items():
                    if k != "step" and isinstance(x, float) and math.isfinite(x):
                        tb.add_scalar(f"ppo/{k}", x, step)
            progress.update(task, completed=step, info=f"reward {row['reward_mean']:.3f} kl {row['kl']:.3f}")
            if step % t.save_steps == 0 or step == t.steps or step == t.stop_after_steps:
                _save_checkpoint(ckpts, step, policy, value_head, opt, kl_ctl, save_file)
            if t.stop_after_steps is not None and step >= t.stop_after_steps and step < t.steps:
                console.print(f"stopped after iteration {step} of {t.steps}; continue with --resume")
                if tb is not None:
                    tb.close()
                return out, {}
    if tb is not None:
        tb.close()

    # ---- evaluate, save -------------------------------------------------------------------------------
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    final: dict[str, Any] = {
        "iterations": step,
        "rollout_engine": engine.name,
        "reward_mean_first": history[0]["reward_mean"] if history else None,
        "reward_mean_last": history[-1]["reward_mean"] if history else None,
        "kl_last": history[-1]["kl"] if history else None,
        "precision": precision,
    }
    if held_prompts:
        final.update(win_rate_vs_sft(policy, tokenizer, engine, reward, held_prompts, cfg))
    _save_policy(out, policy, value_head, tokenizer)
    atomic_write_json(out / "stack.json", {"merge": [str(sft_dir / "adapter")], "adapter": "adapter"})
    atomic_write_json(out / "metrics.json", {**final, "history": history})
    _plot(history, out / "training.png")
    writer.complete(final, counts)
    del engine, policy
    import gc

    gc.collect()
    gate = policy_perplexity_gate(
        out,
        sft_dir,
        cfg.gate_data,
        cfg.perplexity_gate,
        writer,
        final,
        counts,
    )
    colour = "green" if gate["verdict"] == "pass" else "red"
    console.print(
        f"ppo complete: {out}; mean reward {final['reward_mean_first']} -> {final['reward_mean_last']}; "
        f"perplexity gate [bold {colour}]{gate['verdict'].upper()}[/] ({out / 'gates/perplexity/gate.md'})"
    )
    return out, gate


def _save_policy(out: Path, policy, value_head, tokenizer) -> None:
    from safetensors.torch import save_file

    def save_head(p: Path) -> None:
        p.mkdir(parents=True, exist_ok=True)
        save_file(value_head.state_dict(), str(p / "value_head.safetensors"))

    replace_dir(lambda p: (policy.save_pretrained(p), tokenizer.save_pretrained(p)), out / "adapter")
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


def _save_checkpoint(ckpts: Path, step: int, policy, value_head, opt, kl_ctl, save_file) -> None:
    from peft import get_peft_model_state_dict

    def save(p: Path) -> None:
        p.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.contiguous() for k, v in get_peft_model_state_dict(policy).items()},
            str(p / "adapter.safetensors"),
        )
        save_file(value_head.state_dict(), str(p / "value_head.safetensors"))
        torch.save(
            opt.state_dict(), p / "optimizer.pt"
        )  # tensors and numbers only: reloads with weights_only
        (p / "state.json").write_text(json.dumps({"step": step, "kl_coef": kl_ctl.value}))

    replace_dir(save, ckpts / f"step-{step}")
    for old in ckpts.glob("step-*"):  # keep the latest only: a checkpoint is the whole resumable state
        if old.name != f"step-{step}":
            import shutil

            shutil.rmtree(old, ignore_errors=True)


@torch.no_grad()
def win_rate_vs_sft(
    policy, tokenizer, engine, reward: Reward, prompts: list[list[dict]], cfg
) -> dict[str, Any]:
    """Greedy answers of the policy and of the SFT model (adapter disabled) to held-out prompts, scored by the
    same reward; win = higher score, tie = half."""
    from stages.rollout import GenerateEngine

    ids = [render_prompt(tokenizer, m) for m in prompts]
    n = cfg.rollout.max_new_tokens
    pol = (
        engine.generate(ids, n, 0.0, 1.0, 0)
        if engine.name != "generate"
        else GenerateEngine(policy, tokenizer).generate(ids, n, 0.0, 1.0, 0)
    )
    with policy.disable_adapter():
        ref = GenerateEngine(policy, tokenizer).generate(ids, n, 0.0, 1.0, 0)
    eos = tokenizer.eos_token_id
    dec = lambda rs: [tokenizer.decode(r, skip_special_tokens=True) for r in rs]  # noqa: E731
    sp = reward(prompts, dec(pol), [bool(r) and r[-1] == eos for r in pol]).tolist()
    sr = reward(prompts, dec(ref), [bool(r) and r[-1] == eos for r in ref]).tolist()
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(sp, sr, strict=True))
    return {
        "heldout_prompts": len(prompts),
        "win_rate_vs_sft": wins / len(prompts),
        "heldout_reward_policy": sum(sp) / len(sp),
        "heldout_reward_sft": sum(sr) / len(sr),
    }


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
