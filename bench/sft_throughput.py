"""SFT throughput: `align sft` vs a plain TRL SFTTrainer script, side by side in one run.

    .venv/bin/python bench/sft_throughput.py [--steps 6] [--bf16-steps 2] [--data PATH]

Same model (SmolLM2-135M-Instruct), data (self-instruct seed tasks from ../shared/data, else the bundled
examples), LoRA settings (align's configs/sft.yaml: r=16, alpha=32, dropout 0, all linear projections), batch size
8, max length 512, learning rate and steps. Configurations:
  trl-defaults   plain SFTTrainer with TRL's defaults (bf16=True), prompt-completion data
  trl-fp32       the same with bf16=False (the best plain-TRL configuration on this CPU)
  align          align's SFT stage (precision from hardware, padding-free packed rows, attention per sequence)
Throughput counts real (non-pad) tokens per second over the timed steps (the first step, warm-up, is not timed).
MFU = model FLOPs / measured fp32 matmul peak. Model FLOPs are what the loss needs, the same for every
configuration: 4 x body params x real tokens + 4 x LM-head params x labelled tokens (LoRA: forward 2N and
backward through frozen weights 2N per token; no weight gradients for the base; the LM head matters only where a
token has a label). Work a configuration does beyond that (padding, the head over prompt tokens) lowers its MFU.
The CPU's flags are recorded with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from harness import cpu_flags, matmul_peak_gflops, parameter_counts, save  # noqa: E402


class Timer:
    """Trainer callback: wall time of each optimizer step."""

    def __init__(self):
        from transformers import TrainerCallback

        outer = self

        class CB(TrainerCallback):
            def on_step_begin(self, *a, **k):
                outer.t0 = time.perf_counter()

            def on_step_end(self, *a, **k):
                outer.steps.append(time.perf_counter() - outer.t0)

        self.steps: list[float] = []
        self.callback = CB()


class CountingCollator:
    """Wraps a collator and records the real tokens of each batch."""

    def __init__(self, inner):
        self.inner, self.tokens = inner, []

    def __call__(self, examples):
        batch = self.inner(examples)
        am = batch.get("attention_mask")
        if "num_real_tokens" in batch:
            real = int(batch["num_real_tokens"])
        else:
            real = int(batch["input_ids"].numel()) if am is None or am.dim() == 4 else int(am.sum())
        labels = batch.get("labels")
        labelled = real if labels is None else int((labels[:, 1:] != -100).sum())
        self.tokens.append((real, int(batch["input_ids"].numel()), labelled))
        return batch


def load_rows(path: Path):
    from core.readers import load_instructions

    convs, _ = load_instructions(path)
    return convs


def run_trl(convs, model_path, steps, bf16: bool | None, out: Path):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(model_path)
    rows = [
        {
            "prompt": [m.model_dump() for m in c.messages[:-1]],
            "completion": [c.messages[-1].model_dump()],
        }
        for c in convs
    ]
    # TRL's defaults (bf16=True) refuse to start on a CPU unless use_cpu=True: the least a user must change
    kwargs = {"use_cpu": True} if bf16 is None else {"bf16": bf16}
    args = SFTConfig(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=2e-4,
        max_length=512,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
        **kwargs,
    )
    ls = align_lora()
    lora = LoraConfig(
        r=ls.r,
        lora_alpha=ls.alpha,
        lora_dropout=ls.dropout,
        task_type="CAUSAL_LM",
        target_modules=ls.target_modules,
    )
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    timer = Timer()
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        peft_config=lora,
        callbacks=[timer.callback],
    )
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    trainer.train()
    return timer.steps, counter.tokens, args.bf16


def align_lora():
    """The LoRA settings of align's shipped SFT config: the TRL script uses the same."""
    from core.config import load_config
    from data_schemas.config import SFTConfig

    return load_config(SFTConfig, ROOT / "configs" / "sft.yaml", []).lora


def run_align(data_path, steps, out: Path, callbacks=()):
    from core.config import load_config
    from data_schemas.config import SFTConfig
    from stages import sft

    cfg = load_config(
        SFTConfig,
        ROOT / "configs" / "sft.yaml",
        [
            f"output_dir={out}",
            f"data.train_file={data_path}",
            "data.validation_file=null",
            "data.validation_fraction=0",
            f"train.max_steps={steps}",
            "train.save_steps=100000",
            "train.early_stopping_patience=null",
            "train.report_to=[none]",
            "train.seed=0",
            "train.warmup_ratio=0",
            "train.lr_scheduler_type=linear",
        ],
    )
    timer = Timer()
    counter_box = {}
    orig_cls = sft._trainer_class

    def trainer_class():
        base = orig_cls()

        class Counting(base):
            def __init__(self, *a, **k):
                k["data_collator"] = counter_box.setdefault("c", CountingCollator(k["data_collator"]))
                super().__init__(*a, **k)

        return Counting

    sft._trainer_class = trainer_class
    try:
        sft.run(cfg, callbacks=[timer.callback, *callbacks])
    finally:
        sft._trainer_class = orig_cls
    return timer.steps, counter_box["c"].tokens


def summarise(name, step_times, tokens, n_params, n_head, peak):
    timed = step_times[1:]  # the first step includes warm-up
    real = sum(t for t, _, _ in tokens[1 : len(step_times)])
    slots = sum(s for _, s, _ in tokens[1 : len(step_times)])
    labelled = sum(x for _, _, x in tokens[1 : len(step_times)])
    secs = sum(timed)
    tps = real / secs
    flops = 4 * (n_params - n_head) * real + 4 * n_head * labelled
    mfu = flops / secs / (peak * 1e9)
    return {
        "config": name,
        "timed_steps": len(timed),
        "sec_per_step": secs / len(timed),
        "real_tokens_per_s": tps,
        "padding_share": 1 - real / slots if slots else 0.0,
        "mfu": mfu,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument(
        "--bf16-steps", type=int, default=2, help="steps for TRL defaults (bf16 is very slow on CPU)"
    )
    ap.add_argument(
        "--data", type=Path, default=ROOT.parent / "shared" / "data" / "self_instruct_seed_tasks.jsonl"
    )
    ap.add_argument("--skip-trl-defaults", action="store_true")
    ap.add_argument(
        "--work", type=Path, default=Path("/tmp/align-bench-sft"), help="scratch folder (emptied)"
    )
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sft_throughput.json")
    a = ap.parse_args()
    if not a.data.exists():
        a.data = ROOT / "examples" / "data" / "instructions_train.jsonl"
    import shutil

    shutil.rmtree(a.work, ignore_errors=True)
    from align.cli import _quiet_libraries
    from core.models import resolve_model_path

    _quiet_libraries()
    model_path = resolve_model_path("smollm2-135m-instruct")
    n_params, n_head = parameter_counts(model_path)
    peak = matmul_peak_gflops()
    convs = load_rows(a.data)
    results = []
    print(
        f"data {a.data} ({len(convs)} examples), params {n_params / 1e6:.1f}M, matmul peak {peak:.1f} GFLOP/s, "
        f"threads {torch.get_num_threads()}, cpu flags: {cpu_flags()}",
        flush=True,
    )
    if not a.skip_trl_defaults:
        st, tk, bf16 = run_trl(convs, model_path, a.bf16_steps, None, a.work / "trl-defaults")
        results.append(summarise(f"trl-defaults (bf16={bf16})", st, tk, n_params, n_head, peak))
        print(json.dumps(results[-1]), flush=True)
    st, tk, _ = run_trl(convs, model_path, a.steps, False, a.work / "trl-fp32")
    results.append(summarise("trl-fp32", st, tk, n_params, n_head, peak))
    print(json.dumps(results[-1]), flush=True)
    st, tk = run_align(a.data, a.steps, a.work / "align")
    results.append(summarise("align", st, tk, n_params, n_head, peak))
    print(json.dumps(results[-1]), flush=True)
    best_trl = max(r["real_tokens_per_s"] for r in results if r["config"].startswith("trl"))
    print("\n| config | s/step | real tokens/s | padding share | MFU | vs best plain TRL |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['config']} | {r['sec_per_step']:.2f} | {r['real_tokens_per_s']:.1f} | "
            f"{100 * r['padding_share']:.0f}% | {100 * r['mfu']:.1f}% | {r['real_tokens_per_s'] / best_trl:.2f}x |"
        )
    save(
        a.out,
        "sft_throughput",
        {
            "data": str(a.data),
            "steps": a.steps,
            "peak_gflops": peak,
            "cpu_flags": cpu_flags(),
            "threads": torch.get_num_threads(),
            "results": results,
        },
    )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
