"""`align dpo`: direct preference optimisation (Rafailov et al. 2023) on TRL's DPOTrainer.

Reads top to bottom: pairs -> token ids, policy and reference, train, evaluate (held-out preference accuracy,
samples for KL and win rate), write the artifact, perplexity gate against the SFT model.

What align adds to a plain DPOTrainer script, and why:
- The chat template is applied by align (once, to prompt + response) with control-token text neutralised; TRL
  would let a user message containing "<|im_start|>" become a real control token.
- Truncation is counted and reported (TRL drops pairs whose prompt fills max_length without saying so).
- Batches group pairs of similar length (TRL pads every pair in a batch to the longest one).
- The start is an `align sft` artifact or any transformers checkpoint (lib.artifacts.Start). Policy = the start +
  a fresh adapter, reference = the same weights with the adapter disabled (one copy in memory); or the SFT adapter
  itself keeps training and a frozen copy of it (adapter "ref") is the reference; or, full-parameter
  (lora.enabled false), every weight trains and the reference is a frozen second copy of the start, or its
  log-probs computed once before training (reference=precomputed: one copy held while training).
"""

from __future__ import annotations

import contextlib
import gc
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from core import dist, sharded
from core.chat import chat_ids, chat_messages, neutralise, neutralise_messages, render_prompt, special_strings
from core.config import UserError
from core.manifest import atomic_write_json, require_complete
from core.models import (
    eval_resident_limit,
    init_lora,
    input_device,
    load_causal_lm,
    load_start,
    load_tokenizer,
    model_identity,
    peft_config,
    place,
    resident_limit,
    training_share,
    write_policy_stack,
)
from core.packing import BRANCH_KERNELS, needs_dense_mask, row_layout
from core.stage import StageContext, StageResult, console, figures, print_skipped, print_verdict
from data_schemas.config import DPOConfig, ModelConfig
from eval.policy_gate import policy_gate, policy_perplexity_gate, scorer_reward
from lib import trainer as plumbing  # Trainer plumbing the Trainer stages share
from lib.artifacts import Start, policy_gate_data, resolve_start
from lib.generation import GenerateEngine
from lib.logprobs import response_logprob
from lib.merge import MERGED_START, sharded_start
from lib.rankings import read_pairs
from stages.registry import STAGES


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------
def load_pairs(cfg: DPOConfig) -> tuple[list[dict], list[dict]]:
    """(train, validation) rows of {prompt: messages, chosen: str, rejected: str}."""
    d = cfg.data
    if d.preferences_dir is not None:
        from datasets import load_from_disk

        require_complete(d.preferences_dir, "preferences")
        ds = load_from_disk(str(Path(d.preferences_dir) / "pairs"))
        train = list(ds["train"]) if "train" in ds else []
        val = list(ds["validation"]) if "validation" in ds else []
    else:  # TRL preference rows: a file, or a dataset folder (its validation split held out, else by prompt)
        lines, held, report = read_pairs(Path(d.pairs_file), d.validation_fraction, cfg.train.seed)
        print_skipped(report.problems)

        def item(line: dict) -> dict:
            return {"prompt": chat_messages(line["prompt"]), "chosen": line["responses"][0]["text"],
                    "rejected": line["responses"][1]["text"], "prompt_id": line["prompt_id"]}  # fmt: skip

        train, val = [item(x) for x in lines], [item(x) for x in held]
    if not train:
        raise UserError("dpo: no training pairs")
    return train[: d.max_pairs], val[: d.max_eval_pairs]


def tokenize_pair(tokenizer, row: dict, max_length: int, max_prompt_length: int, counts: dict) -> dict | None:
    """prompt_ids / chosen_ids / rejected_ids with the chat template applied once to prompt + response.

    The prompt keeps its last max_prompt_length tokens; each response keeps its first (max_length - prompt) tokens.
    """
    specials = special_strings(tokenizer)
    msgs = neutralise_messages(row["prompt"], specials)
    prompt_ids = render_prompt(tokenizer, msgs)
    out: dict[str, Any] = {}
    for key in ("chosen", "rejected"):
        full = chat_ids(tokenizer, [*msgs, {"role": "assistant", "content": neutralise(row[key], specials)}])
        if full[: len(prompt_ids)] != prompt_ids:
            counts["template_prefix_mismatch"] = counts.get("template_prefix_mismatch", 0) + 1
            return None
        out[f"{key}_ids"] = full[len(prompt_ids) :]
    if len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[-max_prompt_length:]
        counts["prompt_truncated"] = counts.get("prompt_truncated", 0) + 1
    room = max_length - len(prompt_ids)
    for key in ("chosen_ids", "rejected_ids"):
        if len(out[key]) > room:
            out[key] = out[key][:room]
            counts["response_truncated"] = counts.get("response_truncated", 0) + 1
    if out["chosen_ids"] == out["rejected_ids"]:
        counts["identical_after_truncation"] = counts.get("identical_after_truncation", 0) + 1
        return None
    out["prompt_ids"] = prompt_ids
    # what one pair costs in align's forward: the prompt once, then both responses (see shared_prefix_forward)
    out["length"] = len(prompt_ids) + len(out["chosen_ids"]) + len(out["rejected_ids"])
    return out


# ----------------------------------------------------------------------------------------------------------
# Policy and reference
# ----------------------------------------------------------------------------------------------------------
def build_policy(cfg: DPOConfig, start: Start, precision: str, partitioned: bool = False):
    """(model, peft_config, reference model) for TRL. new_adapter: the start's weights (an SFT adapter merged in)
    and an adapter config for TRL to add, so 'adapter disabled' is exactly the start; continue: the SFT adapter
    itself, trainable, which TRL copies into a frozen adapter named 'ref' as the reference. Full-parameter: the
    start's weights, all trainable, and (reference=model_copy) a frozen second copy of them; align builds it, since
    TRL would load the raw checkpoint its config names, without the SFT adapter merged. `partitioned`: created
    under ZeRO-3's zero.Init (lib.trainer.zero3_init) where nothing is to be merged. Under FSDP2 an SFT adapter start
    is merged file by file first, to be read shard by shard (lib.merge.sharded_start); a LoRA policy is then the
    sharded start with its adapter put on before sharding (core.sharded.build), which TRL is handed as a PEFT model
    (`fresh_adapter_reference`). A fresh LoRA is drawn from train.seed however the model is held (init_lora)."""
    from peft import PeftModel

    if cfg.policy_init == "continue_sft_adapter":
        if not start.merge:
            raise UserError(
                f"policy_init=continue_sft_adapter: init_from {cfg.init_from} has no SFT adapter to continue; use "
                "policy_init=new_adapter"
            )
        model = load_causal_lm(start.model, precision)
        return PeftModel.from_pretrained(model, start.merge[0], is_trainable=True), None, None
    if cfg.train.sharding == "fsdp2":  # 1/N of every weight per process (core/sharded.py)
        m = sharded_start(start, cfg.init_from, Path(cfg.output_dir))
        load = (m.name_or_path, precision, m.attn_implementation, m.trust_remote_code)
        if not cfg.full_parameter:  # a fresh LoRA on the sharded start; the adapter disabled is the reference
            model = sharded.load(
                *load, adapter=peft_config(cfg.lora, cfg.peft), offload=cfg.train.cpu_offload
            )
            init_lora(model, cfg.train.seed)
            return model, None, None
        offload = cfg.train.cpu_offload
        model, reference = (
            sharded.load(*load, offload=offload),
            sharded.load(*load, offload=offload),
        )  # and a frozen copy
        return model, None, reference.requires_grad_(False).eval()
    model = load_start(start, precision, partitioned)
    if cfg.full_parameter:
        reference = (
            load_start(start, precision, partitioned).eval() if cfg.reference == "model_copy" else None
        )
        return model, None, reference
    return model, peft_config(cfg.lora, cfg.peft, total_steps=cfg.train.max_steps), None


# ----------------------------------------------------------------------------------------------------------
# Sampling-based evaluation: KL(policy || reference) on policy samples, and win rate against SFT
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_kl(
    model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, seed: int, reference=None
) -> dict[str, Any]:
    """KL estimate = mean over sampled responses y ~ policy of sum_t [log pi(y_t|..) - log pi_ref(y_t|..)]
    (the reference is `reference`, else the policy with its adapter disabled)."""

    model.eval()
    dev = input_device(model)
    specials = special_strings(tokenizer)
    prompt_ids = [render_prompt(tokenizer, neutralise_messages(p, specials)) for p in prompts]
    responses = GenerateEngine(model, tokenizer).generate(prompt_ids, max_new_tokens, 1.0, 1.0, seed)
    kls = []
    for ids, resp in zip(prompt_ids, responses, strict=True):
        if resp:
            p, r = torch.tensor([ids], device=dev), torch.tensor([resp], device=dev)
            lp = response_logprob(model, p, r)
            if reference is not None:
                lp_ref = response_logprob(reference, p, r)
            else:
                with model.disable_adapter():
                    lp_ref = response_logprob(model, p, r)
            kls.append(float(lp - lp_ref))
    return {"sampled_prompts": len(prompts), "kl_to_reference": sum(kls) / len(kls) if kls else None}


# ----------------------------------------------------------------------------------------------------------
# The forward: each pair's prompt computed once, both responses attending to it
# ----------------------------------------------------------------------------------------------------------
# Vocabulary columns per tile of TRL's chunked LM head: the [tokens, tile] logits block is what it holds at once.
LM_HEAD_VOCAB_TILE = 32768


def pair_rows(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> list[dict] | None:
    """Split TRL's pair batch (rows [chosen_0..chosen_B-1, rejected_0..rejected_B-1], right-padded, labels -100 off
    the completion) into {prompt, chosen, rejected} token lists with the original label positions. None when a
    pair's two rows do not share their prompt (then the caller uses the plain forward)."""
    n = input_ids.shape[0] // 2
    out = []
    for i in range(n):
        parts = []
        for r in (i, i + n):
            valid = int(attention_mask[r].sum())
            ids = input_ids[r, :valid].tolist()
            comp = (labels[r, :valid] != -100).nonzero().flatten().tolist()
            if not comp or comp != list(range(comp[0], valid)):
                return None
            parts.append((ids[: comp[0]], ids[comp[0] :], comp))
        (pc, c, cpos), (pr, rj, rpos) = parts
        if pc != pr or not pc:
            return None
        out.append({"prompt": pc, "chosen": c, "rejected": rj, "chosen_pos": cpos, "rejected_pos": rpos})
    return out


def shared_prefix_forward(
    base_model, input_ids, attention_mask, labels, fields=(), max_row_tokens: int = 1024
):
    """Per-token log-probabilities of both responses of every pair, computing each prompt once.

    A pair becomes one packed segment [prompt | chosen | rejected]: chosen tokens attend causally to the prompt and
    to earlier chosen tokens, rejected tokens to the prompt and earlier rejected tokens (never to chosen ones), and
    the rejected positions restart at len(prompt). With `sdpa_segments` that layout is read from the position ids
    (core/attention.py: a branch) and every pair goes into one row with no mask; with `sdpa`/`eager` a dense mask
    says it, and short pairs share rows of at most max_row_tokens (by default the longest pair, so the dense mask
    never costs more attention than that pair). This is the same computation as two separate sequences, with the
    prompt's share done once; TRL runs each prompt twice and pads both rows to the longest sequence of the batch.

    Returns trl's FusedCausalLMOutput with per-token fields of shape [2B, T-1] (zero off the completion), in the
    positions TRL's own fused head would use, or None when the batch is not a pair batch."""
    from trl.trainer.utils import FusedCausalLMOutput

    kernel = base_model.config._attn_implementation
    if kernel not in BRANCH_KERNELS:  # e.g. flash_attention_2: TRL's forward instead
        return None
    pairs = pair_rows(input_ids, attention_mask, labels)
    if pairs is None:
        return None
    dev = input_ids.device
    lengths = [len(p["prompt"]) + len(p["chosen"]) + len(p["rejected"]) for p in pairs]
    dense = needs_dense_mask(kernel)
    # sdpa_segments reads the branch from the position ids (core/attention.py): one row, no mask at all
    layout = row_layout(lengths, max(max_row_tokens or 0, max(lengths)), dense)
    width = max(sum(lengths[i] for i in row) for row in layout)
    R = len(layout)
    ids = torch.zeros((R, width), dtype=torch.long)
    pos = torch.arange(width).repeat(R, 1)  # padding: consecutive positions, one run of its own
    # padding attends to itself only (no NaN rows)
    mask = torch.eye(width, dtype=torch.bool).repeat(R, 1, 1) if dense else None
    # (row, packed index of the hidden state that predicts the token, token id, output row, output position)
    pred_row, pred_idx, target, out_row, out_pos = [], [], [], [], []
    n = len(pairs)
    for r, members in enumerate(layout):
        at = 0
        for i in members:
            p = pairs[i]
            P, C, K = len(p["prompt"]), len(p["chosen"]), len(p["rejected"])
            ids[r, at : at + P + C + K] = torch.tensor(p["prompt"] + p["chosen"] + p["rejected"])
            pos[r, at : at + P + C] = torch.arange(P + C)
            pos[r, at + P + C : at + P + C + K] = torch.arange(P, P + K)
            if mask is not None:
                tri = torch.ones(P + C, P + C, dtype=torch.bool).tril()
                mask[r, at : at + P + C, at : at + P + C] = tri  # prompt + chosen: causal
                rj = slice(at + P + C, at + P + C + K)
                mask[r, rj, at : at + P] = True  # rejected sees the prompt
                mask[r, rj, rj] = torch.ones(K, K, dtype=torch.bool).tril()  # and itself, causally
            for t in range(C):
                pred_row.append(r)
                pred_idx.append(at + P - 1 + t)
                target.append(p["chosen"][t])
                out_row.append(i)
                out_pos.append(p["chosen_pos"][t] - 1)
            for t in range(K):
                pred_row.append(r)
                pred_idx.append(at + P - 1 if t == 0 else at + P + C + t - 1)
                target.append(p["rejected"][t])
                out_row.append(n + i)
                out_pos.append(p["rejected_pos"][t] - 1)
            at += P + C + K
        pos[r, at:] = torch.arange(width - at)
    hidden = base_model.model(
        input_ids=ids.to(dev),
        attention_mask=None if mask is None else mask[:, None].to(dev),
        position_ids=pos.to(dev),
        use_cache=False,
    ).last_hidden_state  # [R, width, H]
    h = hidden[torch.tensor(pred_row, device=dev), torch.tensor(pred_idx, device=dev)]  # [M, H]
    tgt = torch.tensor(target, device=dev)
    # The LM head on completion tokens only (on devices without Triton TRL's own forward scores every position,
    # prompts and padding included): lib/lm_head.py's function for a frozen head, else TRL's memory-lean one.
    from lib.lm_head import labelled_logprobs

    lm_head = base_model.lm_head
    names = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    # ChunkedLogProbFunction.apply takes its arguments by position only: name them here
    temperature, vocab_tile, top_k, logit_scale = 1.0, LM_HEAD_VOCAB_TILE, None, 1.0
    got = labelled_logprobs(
        h, lm_head.weight, lm_head.bias, tgt, temperature, vocab_tile, top_k, logit_scale, tuple(fields)
    )
    per = {"log_probs": got[0], **{k: v for k, v in zip(names, got[1:], strict=True) if k in fields}}
    shape = (input_ids.shape[0], input_ids.shape[1] - 1)
    rows_t, cols_t = torch.tensor(out_row, device=dev), torch.tensor(out_pos, device=dev)
    result = {}
    for k, flat in per.items():
        full = torch.zeros(shape, dtype=flat.dtype, device=dev)
        result[k] = full.index_put((rows_t, cols_t), flat)
    loss = -result["log_probs"].sum() / max(len(target), 1)
    return FusedCausalLMOutput(loss=loss, **result)


# ----------------------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------------------
def _trainer_class():
    from trl import DPOTrainer

    class AlignDPOTrainer(plumbing.FSDP2Accelerator, DPOTrainer):
        def __init__(self, *args, **kwargs):
            with fresh_adapter_reference(kwargs["model"], kwargs.get("ref_model")):
                super().__init__(*args, **kwargs)
            # TRL patched the base model's forward with its fused LM head; wrap that once more so pair batches take
            # the shared-prefix path (same numbers, each prompt computed once) and everything else TRL's path. A
            # full-parameter policy's frozen reference copy takes it too (its forwards are not counted).
            from peft import PeftModel

            self._route(
                self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model, True
            )
            if self.ref_model is not None:
                self._route(self.accelerator.unwrap_model(self.ref_model), False)

        def _route(self, base, count: bool) -> None:
            trl_forward = base.forward
            fields = ("entropy", "mean_logits", "is_top1") + (
                ("log_sum_sq_probs",) if self.use_weighting else ()
            )

            cfg = base.config.get_text_config()
            scaled = any(
                getattr(cfg, k, None) is not None
                for k in (
                    "final_logit_softcapping",
                    "logit_scale",
                    "output_multiplier",
                    "lm_head_multiplier",
                    "logits_scaling",
                )
            )

            def forward(*a, fused_lm_head=False, labels=None, **kw):
                # PEFT forwards its own keyword arguments, mostly None; anything set beyond ids and mask goes to TRL
                given = {k for k, v in kw.items() if v is not None and k != "use_cache"}
                plain = not a and not scaled and given <= {"input_ids", "attention_mask"}
                if fused_lm_head and labels is not None and plain and kw.get("attention_mask") is not None:
                    out = shared_prefix_forward(base, kw["input_ids"], kw["attention_mask"], labels, fields)
                    if out is not None:
                        if count:
                            self._count_forward(base, shared_prefix=True)
                        return out
                if fused_lm_head and count:
                    self._count_forward(base, shared_prefix=False)
                return trl_forward(*a, fused_lm_head=fused_lm_head, labels=labels, **kw)

            base.forward = forward

        def _count_forward(self, base, shared_prefix: bool) -> None:
            # logged as `shared_prefix_path` (share of pair forwards that computed each prompt once)
            self._metrics["train" if base.training else "eval"]["shared_prefix_path"].append(
                float(shared_prefix)
            )

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            # tokenized by align (chat template once, control tokens neutralised, cuts counted)
            return dataset

        def _get_train_sampler(self, train_dataset=None):
            if self.args.train_sampling_strategy != "group_by_length":
                return super()._get_train_sampler(train_dataset)
            ds = train_dataset if train_dataset is not None else self.train_dataset
            return SeededLengthGroupedSampler(
                ds["length"],
                self.args.train_batch_size * self.args.gradient_accumulation_steps,
                self.args.seed,
            )

    return AlignDPOTrainer


@contextlib.contextmanager
def fresh_adapter_reference(model, ref_model):
    """While TRL's DPOTrainer is built around a sharded PEFT policy (FSDP2) with a fresh adapter: the reference stays
    the adapter disabled, as TRL makes it when it adds the adapter itself.

    Handed a PEFT model and no reference, TRL adds an adapter "ref" and copies the policy's adapter into it (a
    pretrained adapter's frozen start). Under FSDP2 that copy cannot be made: the model is sharded before TRL sees
    it (so that no process ever holds it whole), and an adapter added afterwards is plain tensors beside the sharded
    units. For a fresh LoRA it is not needed either: lora_B is zero (core.models.init_lora), so the copy computes
    exactly the start, which the adapter disabled computes with no second adapter in memory. The copy is skipped (no
    adapter is added, and what TRL copies is each weight onto itself); anything else is left to TRL."""
    from peft import PeftModel
    from torch.distributed.fsdp import FSDPModule

    sharded_peft = isinstance(model, PeftModel) and isinstance(model, FSDPModule) and ref_model is None
    if not sharded_peft:
        yield
        return
    fresh = all(
        float(p.detach().abs().max().full_tensor() if hasattr(p, "full_tensor") else p.detach().abs().max())
        == 0
        for n, p in model.named_parameters()
        if ".lora_B." in n
    )
    if (
        not fresh
    ):  # a trained adapter's reference would be its copy: not built under FSDP2 (the config refuses)
        raise UserError("dpo: a sharded PEFT policy trains a fresh LoRA only (policy_init=new_adapter)")
    model.add_adapter = lambda name, config, *a, **k: None
    model.get_parameter = lambda name: type(model).get_parameter(model, name.replace(".ref.", ".default."))
    try:
        yield
    finally:
        del model.add_adapter, model.get_parameter  # the instance's overrides: the class's methods again
    if "ref" in model.peft_config:
        raise RuntimeError("dpo: TRL added a reference adapter to a sharded policy")


class SeededLengthGroupedSampler(torch.utils.data.Sampler):
    """Length-grouped order (random mega-batches, sorted by length inside) drawn from a generator seeded by
    (seed, epoch). transformers' sampler draws from the global RNG, which a resumed run has restored to the
    checkpoint's state, so a resumed epoch would visit the pairs in another order than the uninterrupted one."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed, self.epoch = list(lengths), batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        from transformers.trainer_pt_utils import get_length_grouped_indices

        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=g))


def run(cfg: DPOConfig, resume: bool = False, force: bool = False, callbacks=()) -> StageResult:
    ctx = StageContext(cfg, resume, force, STAGES[cfg.stage], callbacks)
    if ctx.finished:
        return ctx.existing_result()

    # 1. Data: pairs -> token ids (chat template once, control tokens neutralised, cuts counted)
    start = resolve_start(cfg.init_from)
    gate_data = policy_gate_data(cfg)  # known before training, not after
    tokenizer = load_tokenizer(start.model)
    train, val, val_rows = load_data(cfg, tokenizer, ctx.counts)

    # 2. Policy and reference, 3. train, 4. evaluate, write, gate
    parents = start.parents + ([Path(cfg.data.preferences_dir)] if cfg.data.preferences_dir else [])
    inputs = [(cfg.data.pairs_file, "pairs")] if cfg.data.pairs_file else []
    folder = "model" if cfg.full_parameter else "adapter"
    identity = model_identity(start.model, ctx.precision, adapter=None if cfg.full_parameter else "adapter")
    with ctx.open(inputs=inputs, parents=parents, model=identity):
        trainer, result, paused = train_policy(cfg, ctx, start, tokenizer, train, val)
        if paused:
            return ctx.paused()
        metrics = heldout_metrics(trainer, result, val, ctx.precision)  # every process (a collective pass)
        adapters = {} if cfg.full_parameter else {"selected_adapters": ["default"]}  # not TRL's "ref"
        plumbing.save_trained(trainer, ctx.out / folder, tokenizer, **adapters)
        if not ctx.is_main:
            return ctx.complete(metrics)  # the main process samples, gates and writes
        # A sharded run's gates keep no more of a model in memory than a process held in training
        share = training_share(start.model, ctx.precision, plumbing.partitioned(trainer))
        dist.reset_peak_memory()
        with resident_limit(share):
            policy, reference, prompts = eval_policy(cfg, ctx, start, trainer, val_rows)
            judged = None
            if policy is not None:
                kl_prompts = prompts[: cfg.eval.kl_prompts]
                metrics.update(
                    sample_kl(
                        policy, tokenizer, kl_prompts, cfg.eval.max_new_tokens, cfg.train.seed, reference
                    )
                )
                judged = judge_policy(cfg, ctx, policy, reference, tokenizer, prompts, start.parent, metrics)
            save(ctx, trainer, start, metrics)
            # The gate loads its own copies from the artifacts: free the training model and optimizer first.
            del trainer, policy, reference
            gc.collect()
            # Perplexity gate: DPO must not wreck language modelling (candidate vs the start, same data).
            gate = policy_perplexity_gate(ctx.out, start.parent, gate_data, cfg.perplexity_gate)
        metrics["gate_peak_memory_gib"] = round(dist.peak_memory_gib(), 3)  # the main process's, gates alone
        acc = metrics.get("heldout_rewards_accuracies")
        if judged is not None:
            print_verdict(
                "dpo", ctx.out, judged, figures({"win rate vs SFT": metrics.get("win_rate_vs_sft")})
            )
        print_verdict(
            "dpo", ctx.out, gate, f"held-out preference accuracy {acc if acc is None else round(acc, 3)}"
        )
        return ctx.complete(metrics, gates=[g for g in (judged, gate) if g is not None])


def load_data(cfg: DPOConfig, tokenizer, counts: dict[str, Any]):
    """(train pairs, held-out pairs, held-out rows as given) with token ids; edits counted."""
    train_rows, val_rows = load_pairs(cfg)
    d = cfg.data
    train = [
        x for r in train_rows if (x := tokenize_pair(tokenizer, r, d.max_length, d.max_prompt_length, counts))
    ]
    val = [
        x for r in val_rows if (x := tokenize_pair(tokenizer, r, d.max_length, d.max_prompt_length, counts))
    ]
    counts.update(
        {
            "train_pairs": len(train),
            "eval_pairs": len(val),
            "train_pairs_given": len(train_rows),
            "eval_pairs_given": len(val_rows),
        }
    )
    console.print(f"data: {len(train)} train / {len(val)} held-out pairs; edits {counts}", highlight=False)
    return train, val, val_rows


def train_policy(
    cfg: DPOConfig, ctx: StageContext, start: Start, tokenizer, train: list[dict], val: list[dict]
):
    """(trainer, train result, paused): TRL's DPOTrainer with align's pair forward and length-grouped batches."""
    from trl import DPOConfig as TRLDPOConfig

    t = cfg.train
    args = TRLDPOConfig(  # before the model: a ZeRO-3 config registered here partitions it as it is created
        **plumbing.trainer_kwargs(
            t, ctx.out, ctx.precision, bool(val), t.per_device_train_batch_size, run_name=ctx.run_name
        ),
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        beta=t.beta,
        loss_type=t.loss_type,
        label_smoothing=t.label_smoothing,
        max_length=None,  # tokenized and cut by align above
        precompute_ref_log_probs=cfg.reference == "precomputed",
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        length_column_name="length",
    )
    zero3 = plumbing.zero3_init(args)  # never with fsdp2: the config refuses deepspeed beside it
    if zero3:
        console.print("policy and reference partitioned as they are created (ZeRO-3)", highlight=False)
    if t.sharding == "fsdp2":
        held = "policy and reference" if cfg.full_parameter else "policy (a LoRA on its base)"
        console.print(f"{held} {sharded.described(t.cpu_offload)}", highlight=False)
    if ctx.is_main and not ctx.resume:  # a merged start left by an earlier run may be another start's
        shutil.rmtree(ctx.out / MERGED_START, ignore_errors=True)
    model, adapter, reference = build_policy(cfg, start, ctx.precision, partitioned=zero3)
    trainer = _trainer_class()(
        model=model,
        args=args,
        **plumbing.trainer_datasets(train, val),
        processing_class=tokenizer,
        callbacks=plumbing.stage_callbacks(ctx, cfg),
        peft_config=adapter,
        ref_model=reference,
    )
    if adapter is not None and cfg.peft.method == "lora":
        init_lora(trainer.model, t.seed)  # the adapter FSDP2 draws: the same start however the model is held
    result, paused = plumbing.train_with_resume(trainer, ctx.out, ctx.resume, t.stop_after_steps)
    if ctx.is_main and not paused:  # every process read its shards of it before training
        shutil.rmtree(ctx.out / MERGED_START, ignore_errors=True)
    return trainer, result, paused


HELDOUT_KEYS = (
    "eval_loss",
    "eval_rewards/accuracies",
    "eval_rewards/margins",
    "eval_rewards/chosen",
    "eval_rewards/rejected",
    "eval_logps/chosen",
    "eval_logps/rejected",
)


def heldout_metrics(trainer, result, val, precision: str) -> dict[str, Any]:
    """Training summary and held-out preference metrics (every process takes part in the held-out pass)."""
    metrics = plumbing.training_summary(trainer, result, precision)
    if val:
        ev = plumbing.final_eval(trainer)
        metrics.update(
            {k.replace("eval_", "heldout_").replace("/", "_"): ev[k] for k in HELDOUT_KEYS if k in ev}
        )
    return metrics


def eval_policy(
    cfg: DPOConfig, ctx: StageContext, start: Start, trainer, val_rows
) -> tuple[Any, Any, list[list[dict]]]:
    """(the trained policy, its reference, the held-out prompts), or (None, None, []) when there is nothing to
    sample (main process). The reference is None for an adapter policy (the adapter disabled is the start), else
    a model holding the start's weights. Under ZeRO-3 or FSDP2 this process holds a shard of the weights, so a
    full policy is read back from what was just saved, and the reference from the start, each keeping no more of
    its weights in memory than the run's training share (offloaded beyond it: core.models.resident_limit)."""
    if not (cfg.eval.prompts and val_rows):
        return None, None, []
    if cfg.policy_init == "continue_sft_adapter":
        console.print(
            "[yellow]KL sampling and the policy gate need policy_init=new_adapter (reference = adapter off); "
            "skipped[/]"
        )
        return None, None, []
    model = trainer.accelerator.unwrap_model(trainer.model)
    reference = trainer.accelerator.unwrap_model(trainer.ref_model) if trainer.ref_model is not None else None
    if cfg.full_parameter:
        limit = eval_resident_limit()  # a sharded run's share (run): offloaded beyond it (core.models)
        if plumbing.partitioned(trainer):
            model = load_causal_lm(
                ModelConfig(name_or_path=str(ctx.out / "model")), ctx.precision, resident=limit
            )
        if reference is None or plumbing.partitioned(trainer):  # precomputed, or partitioned
            reference = load_start(start, ctx.precision, resident=limit)
        model, reference = place(model), place(reference.eval())
    elif plumbing.partitioned(trainer):
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_start(start, ctx.precision), ctx.out / "adapter")
        model = model.to(dist.device())
    seen, prompts = set(), []
    for r in val_rows:  # distinct held-out prompts, in order
        key = json.dumps(r["prompt"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            prompts.append(chat_messages(r["prompt"]))
    return model, reference, prompts[: cfg.eval.prompts]


def judge_policy(
    cfg: DPOConfig, ctx: StageContext, policy, reference, tokenizer, prompts, parent: str, metrics: dict
):
    """The policy gate (lib.trainer.policy_gate) under eval.reward_model, or None with a warning without one."""
    if cfg.eval.reward_model is None:
        console.print(
            "[yellow]policy gate not run: no eval.reward_model, so nothing judges whether the policy beats SFT "
            "(give an `align reward` artifact)[/]"
        )
        metrics["policy_gate"] = "not run: no eval.reward_model"
        return None
    heldout = cfg.eval.heldout_reward_model
    judged = policy_gate(
        ctx.out, parent, policy, tokenizer, prompts, scorer_reward(cfg.eval.reward_model), cfg.policy_gate,
        [metrics["kl_to_reference"]], "reward model", scorer_reward(heldout) if heldout else None, reference,
    )  # fmt: skip
    m = judged.metrics
    metrics.update(
        {
            "win_rate_vs_sft": m.get("win_rate"),
            "length_controlled_win_rate_vs_sft": m.get("length_controlled_win_rate"),
            "reward_policy_mean": m.get("reward_policy"),
            "reward_sft_mean": m.get("reward_parent"),
        }
    )
    return judged


def save(ctx: StageContext, trainer, start: Start, metrics: dict[str, Any]) -> None:
    """stack.json for an adapter policy (how to rebuild it: the start's model, its adapters merged, then adapter/),
    metrics.json; adapter/ or model/ is written before, by every process (`save_trained`)."""
    if not ctx.cfg.full_parameter:
        write_policy_stack(ctx.out, list(start.merge) if ctx.cfg.policy_init == "new_adapter" else [])
    atomic_write_json(ctx.out / "metrics.json", {**metrics, "log_history": trainer.state.log_history})
