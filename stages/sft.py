"""`align sft`: supervised fine-tuning with LoRA on TRL's SFTTrainer.

Reads top to bottom: `run` (the stage contract, core/stage.py), then its steps: load_data (render and
tokenize), train, save.

What align adds to a plain `SFTTrainer` script, and why:
- Precision from the hardware (TRL defaults to bf16, 22x slower on CPUs without AMX).
- Loss on every assistant turn, with any chat template (see core/chat.py), and user text that can never
  become control tokens.
- Padding-free batches that are correct on every attention kernel: a micro-batch is one row holding all its
  examples with restarting position ids, and attention runs per example (core/attention.py, `sdpa_segments`:
  no mask, no cost across examples). Position ids alone (TRL's `padding_free`) are only correct with
  FlashAttention; with plain sdpa/eager the examples would attend to each other, so those get a block-diagonal
  4-D mask instead.
- An artifact directory with a manifest written last, resumable checkpoints, metrics.jsonl, TensorBoard.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core import sharded
from core.chat import control_tokens_in, neutralise_messages, render, render_text, special_strings
from core.config import UserError, printable
from core.manifest import atomic_write_json, replace_dir
from core.models import (
    init_lora,
    load_causal_lm,
    load_tokenizer,
    model_identity,
    peft_config,
    quantization_4bit,
    resolve_model_path,
)
from core.packing import needs_dense_mask, pack
from core.partial import apply_trainable, param_groups, unfreeze_callback
from core.readers import has_split, load_instructions
from core.stage import StageContext, StageResult, console, figures, print_export_hint, print_skipped
from data_schemas.config import SFTConfig
from data_schemas.records import PlainText
from lib import trainer as plumbing  # Trainer plumbing the Trainer stages share
from lib.merge import merge_lora_files
from stages.registry import STAGES


# ----------------------------------------------------------------------------------------------------------
# Data: conversations -> token ids and labels
# ----------------------------------------------------------------------------------------------------------
def tokenize_conversations(convs, tokenizer, data_cfg, counts: dict, assistant_only: bool = True):
    """Render each conversation; apply the control-token policy; count truncations and skips."""
    specials = special_strings(tokenizer)
    rows = []
    for conv in convs:
        text = isinstance(conv, PlainText)  # a language-modelling row: learned whole, no template
        msgs = (
            [{"role": "assistant", "content": conv.text}] if text else [m.model_dump() for m in conv.messages]
        )
        found = sorted({s for m in msgs for s in control_tokens_in(m["content"], specials)})
        if found:
            if data_cfg.control_tokens == "reject":
                counts["rejected_control_tokens"] = counts.get("rejected_control_tokens", 0) + 1
                continue
            counts["neutralised_control_tokens"] = counts.get("neutralised_control_tokens", 0) + 1
            msgs = neutralise_messages(msgs, specials)
        if text:
            r = render_text(tokenizer, msgs[0]["content"], data_cfg.max_length, data_cfg.truncation_side)
        else:
            r = render(tokenizer, msgs, data_cfg.max_length, data_cfg.truncation_side, assistant_only)
        if r.truncated:
            counts["truncated"] = counts.get("truncated", 0) + 1
        if all(lbl == -100 for lbl in r.labels):
            counts["skipped_no_assistant_tokens_after_truncation"] = (
                counts.get("skipped_no_assistant_tokens_after_truncation", 0) + 1
            )
            continue
        rows.append({"input_ids": r.input_ids, "labels": r.labels})
    return rows


def split_train_validation(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic split: the same seed and data always give the same validation set."""
    if fraction <= 0:
        return items, []
    idx = list(range(len(items)))
    random.Random(seed).shuffle(idx)
    n_val = max(1, round(len(items) * fraction))
    val = set(idx[:n_val])
    return [x for i, x in enumerate(items) if i not in val], [x for i, x in enumerate(items) if i in val]


# ----------------------------------------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------------------------------------
@dataclass
class PaddingFreeCollator:
    """Pack a micro-batch's examples (core/packing.py): into one row for the segment kernels, into rows of at most
    max_row_tokens with a dense mask for `sdpa`/`eager` (dense_mask).

    Output: input_ids/labels/position_ids [R, L]; attention_mask [R, 1, L, L] bool block-diagonal causal
    (dense_mask only). The first
    label of each example is -100 (it would be predicted from the previous example's last token). The loss equals
    the padded batch's exactly: both are sum(token NLL) / count(label tokens).
    """

    pad_token_id: int
    max_row_tokens: int = 1024
    dense_mask: bool = True

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        p = pack([e["input_ids"] for e in examples], self.max_row_tokens, self.pad_token_id, self.dense_mask)
        labels = torch.full_like(p.input_ids, -100)
        for i, e in enumerate(examples):
            lbl = torch.as_tensor(e["labels"], dtype=torch.long).clone()
            lbl[0] = -100
            labels[p.rows[i], p.starts[i] : p.ends[i] + 1] = lbl
        return {**p.model_inputs(), "labels": labels, "num_real_tokens": torch.tensor(p.real_tokens)}


@dataclass
class PaddedCollator:
    """Right-pad to the longest example in the micro-batch (the plain way, for comparison and GPUs)."""

    pad_token_id: int

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        n = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), n), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), n), -100, dtype=torch.long)
        att = torch.zeros((len(examples), n), dtype=torch.long)
        for i, e in enumerate(examples):
            k = len(e["input_ids"])
            ids[i, :k] = torch.as_tensor(e["input_ids"])
            labels[i, :k] = torch.as_tensor(e["labels"])
            att[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": att}


def _trainer_class():
    from trl import SFTTrainer

    class AlignSFTTrainer(plumbing.FSDP2Accelerator, SFTTrainer):
        """SFTTrainer whose token counter counts real tokens of packed rows (it would sum the 4-D mask), and whose
        fused LM head scores labelled positions only."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            real = inputs.pop("num_real_tokens", None)  # set by PaddingFreeCollator; not a model input
            before = self._total_train_tokens
            with plumbing.compact_lm_head():  # the LM head on labelled positions only (lib/trainer.py)
                out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if real is not None and model.training:
                # every process's real tokens (a collective: every process computes a loss here in step)
                real = self.accelerator.gather(real.reshape(1).to(self.accelerator.device)).sum()
                self._total_train_tokens = before + int(real)
                self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            return out

        def create_optimizer(self, model=None):
            """Partial fine-tuning's groups (core/partial.py): every parameter that can ever train, with its
            layer-wise rate; the Trainer's own groups would hold only those trainable at the start."""
            if getattr(self, "align_partial", None) is None or self.optimizer is not None:
                return super().create_optimizer(model)
            opt_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            groups = param_groups(
                self.model, self.args.learning_rate, self.args.weight_decay, self.align_partial
            )
            self.optimizer = opt_cls(groups, **kwargs)
            return self.optimizer

    return AlignSFTTrainer


# ----------------------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------------------
def run(cfg: SFTConfig, resume: bool = False, force: bool = False, callbacks=()) -> StageResult:
    ctx = StageContext(cfg, resume, force, STAGES[cfg.stage], callbacks)
    if ctx.finished:
        return ctx.existing_result()
    # QLoRA's 4-bit config, built (or refused in a sentence) before anything is written
    quantization = (
        quantization_4bit(ctx.precision) if cfg.lora.enabled and cfg.peft.method == "qlora" else None
    )

    # 1. Data -----------------------------------------------------------------------------------------
    tokenizer = load_tokenizer(cfg.model)
    train_rows, val_rows, inputs, parents = load_data(cfg, tokenizer, ctx.counts)

    # 2. Model, 3. Train, 4. Evaluate and write the artifact -----------------------------------------------
    identity = model_identity(cfg.model, ctx.precision, adapter="adapter" if cfg.lora.enabled else None)
    with ctx.open(inputs=inputs, parents=parents, model=identity):
        trainer, result, paused = train(cfg, ctx, tokenizer, train_rows, val_rows, quantization)
        if paused:
            return ctx.paused()
        metrics = save(cfg, ctx, trainer, result, tokenizer, has_val=bool(val_rows))
        console.print(
            f"[green]sft complete[/]: {printable(str(ctx.out))} ({figures(metrics)})", highlight=False
        )
        print_export_hint(ctx.out)
        return ctx.complete(metrics)


def load_data(cfg: SFTConfig, tokenizer, counts: dict[str, Any]):
    """(train rows, validation rows, input files, parent artifacts). Bad rows are named and counted; a dataset
    folder brings its own validation split (core.readers.SPLIT_NAMES), and one from `align data build` is the
    parent artifact."""
    d = cfg.data
    train_convs, train_report = load_instructions(d.train_file, d.shape, d.system_prompt, text_rows=True)
    print_skipped(train_report.problems)
    inputs = [(d.train_file, "train")]
    folder = Path(d.train_file).is_dir()  # a dataset folder: it may bring its own validation split
    built = folder and (Path(d.train_file) / "manifest.json").exists()  # align's: the parent artifact
    parents = [Path(d.train_file)] if built else []
    val_report = None
    if folder and d.validation_file is None and has_split(d.train_file, "validation"):
        val_convs, val_report = load_instructions(d.train_file, split="validation", text_rows=True)
    elif d.validation_file is not None:
        val_convs, val_report = load_instructions(d.validation_file, d.shape, d.system_prompt, text_rows=True)
        print_skipped(val_report.problems)
        inputs.append((d.validation_file, "validation"))
    else:
        train_convs, val_convs = split_train_validation(train_convs, d.validation_fraction, cfg.train.seed)
    counts["train_file"] = {**train_report.as_dict(), "problems": train_report.problems}
    if val_report is not None:
        counts["validation_file"] = {**val_report.as_dict(), "problems": val_report.problems}
    tok_counts: dict[str, int] = {}
    train_rows = tokenize_conversations(train_convs, tokenizer, d, tok_counts)
    val_rows = tokenize_conversations(val_convs, tokenizer, d, tok_counts)
    counts["tokenization"] = tok_counts
    counts["train_examples"], counts["validation_examples"] = len(train_rows), len(val_rows)
    if not train_rows:
        raise UserError(f"{d.train_file}: no training examples left after tokenization ({tok_counts})")
    console.print(
        f"data: {len(train_rows)} train / {len(val_rows)} validation examples "
        f"({train_report.read} rows read, {sum(train_report.dropped.values())} dropped; {tok_counts or 'no edits'})",
        highlight=False,
    )
    return train_rows, val_rows, inputs, parents


def train(cfg: SFTConfig, ctx: StageContext, tokenizer, train_rows, val_rows, quantization=None):
    """(trainer, train result, paused): the model with a fresh LoRA (or all weights), trained by SFTTrainer."""
    from trl import SFTConfig as TRLSFTConfig

    t = cfg.train
    has_val = bool(val_rows)
    args = TRLSFTConfig(  # before the model: a ZeRO-3 config registered here partitions it as it is created
        **plumbing.trainer_kwargs(
            t, ctx.out, ctx.precision, has_val, t.per_device_train_batch_size, run_name=ctx.run_name
        ),
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        dataset_kwargs={"skip_prepare_dataset": True},  # rendered and masked above
        max_length=None,
    )
    m = cfg.model
    if t.sharding == "fsdp2":  # 1/N of every weight per process, read shard by shard (core/sharded.py)
        console.print(
            f"model: {printable(m.name_or_path)} in {ctx.precision}, {sharded.described(t.cpu_offload)}",
            highlight=False,
        )
        adapter = (
            peft_config(cfg.lora, cfg.peft) if cfg.lora.enabled else None
        )  # a plain LoRA (the config checks)
        model = sharded.load(
            m.name_or_path, ctx.precision, m.attn_implementation, m.trust_remote_code, adapter, t.cpu_offload
        )
        if adapter is not None:
            init_lora(model, t.seed)
    else:
        zero3 = quantization is None and plumbing.zero3_init(args)
        how = ", partitioned as it is created (ZeRO-3)" if zero3 else ""
        console.print(f"model: {printable(m.name_or_path)} in {ctx.precision}{how}", highlight=False)
        model = load_causal_lm(m, ctx.precision, quantization, partitioned=zero3)
    extra_callbacks = []
    if not cfg.lora.enabled and not cfg.partial.is_default:
        n = apply_trainable(model, cfg.partial)
        console.print(
            f"partial fine-tuning ({cfg.partial.trainable}): {n['trainable']:,} of {n['total']:,} parameters train"
            + (" at first; the unfreezing schedule adds blocks" if cfg.partial.unfreeze else ""),
            highlight=False,
        )
        if cfg.partial.unfreeze is not None:
            extra_callbacks.append(unfreeze_callback(cfg.partial))
    padded = t.batching == "padded" or (cfg.lora.enabled and cfg.peft.virtual_tokens)
    if padded and t.batching != "padded":
        console.print(
            f"peft.method={cfg.peft.method}: padded batches (PEFT puts the virtual tokens before every row, so "
            "examples cannot share one)",
            highlight=False,
        )
    collator = (
        PaddedCollator(tokenizer.pad_token_id)
        if padded
        else PaddingFreeCollator(
            tokenizer.pad_token_id,
            max_row_tokens=max(cfg.data.max_length, 1024),
            dense_mask=needs_dense_mask(cfg.model.attn_implementation),
        )
    )
    trainer = _trainer_class()(
        model=model,
        args=args,
        **plumbing.trainer_datasets(train_rows, val_rows if has_val else []),
        processing_class=tokenizer,
        data_collator=collator,
        peft_config=peft_config(
            cfg.lora, cfg.peft, total_steps=t.max_steps, base=resolve_model_path(cfg.model.name_or_path)
        )
        if cfg.lora.enabled and t.sharding != "fsdp2"  # under FSDP2 the adapter came with the sharded model
        else None,
        callbacks=plumbing.stage_callbacks(ctx, cfg, extra_callbacks),
    )
    if cfg.lora.enabled and cfg.peft.method == "lora" and t.sharding != "fsdp2":
        init_lora(trainer.model, t.seed)  # the adapter FSDP2 draws: the same start however the model is held
    trainer.align_partial = None if cfg.lora.enabled or cfg.partial.is_default else cfg.partial
    result, paused = plumbing.train_with_resume(trainer, ctx.out, ctx.resume, t.stop_after_steps)
    return trainer, result, paused


def save(cfg: SFTConfig, ctx: StageContext, trainer, result, tokenizer, has_val: bool) -> dict[str, Any]:
    """Held-out loss, the adapter (or full model), metrics.json; returns the manifest's final metrics."""
    state = trainer.state
    metrics = plumbing.training_summary(trainer, result, ctx.precision)
    if has_val:
        ev = plumbing.final_eval(trainer)
        metrics["eval_loss"] = ev["eval_loss"]
        metrics["eval_perplexity"] = math.exp(ev["eval_loss"]) if ev["eval_loss"] < 50 else float("inf")
    out = ctx.out
    plumbing.save_trained(
        trainer, out / ("adapter" if cfg.lora.enabled else "model"), tokenizer
    )  # every process
    if not ctx.is_main:
        return metrics
    if cfg.lora.enabled and cfg.merge_adapter:
        partitioned = plumbing.partitioned(trainer)  # this process holds a shard of the weights
        base = resolve_model_path(cfg.model.name_or_path)
        # partitioned: from the adapter just saved, one file of the base at a time where it is a plain LoRA
        if not (partitioned and merge_lora_files(base, out / "adapter", out / "merged", tokenizer)):
            if partitioned:
                from peft import PeftModel

                merged = PeftModel.from_pretrained(
                    load_causal_lm(cfg.model, ctx.precision), out / "adapter"
                ).merge_and_unload()
            else:
                merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
            replace_dir(lambda p: (merged.save_pretrained(p), tokenizer.save_pretrained(p)), out / "merged")
    atomic_write_json(out / "metrics.json", {**metrics, "log_history": state.log_history})
    return metrics
