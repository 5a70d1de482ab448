"""DPO throughput and memory: `align dpo` vs TRL's DPOTrainer in its best configuration on this CPU.

    .venv/bin/python bench/dpo.py [--steps 8] [--pairs 64]

Same policy (SmolLM2-135M-Instruct with a 1-step SFT adapter merged), same pairs (HH-RLHF harmless from
../shared/data, imported and built by align), batch 4 pairs, max length 256 (prompt at most 128 for align), LoRA r=16
on all projections, beta 0.1, learning rate 5e-5, same steps. TRL's best configuration here: PEFT with the
adapter-disabled reference, bf16=False, default random batches. Each trainer runs in its own process, so the peak
RSS (ru_maxrss) is that trainer's own. Pairs/s excludes the first (warm-up) step.

MFU = model FLOPs / the fp32 matmul peak measured at the start of the same run. Model FLOPs are what the DPO loss
needs, the same definition for both trainers, counted from each trainer's own batches: the policy's forward and
backward through frozen weights (4 per parameter per token) and the reference's forward (2), over each pair's
prompt once plus both completions for the body, and over the completion tokens only for the LM head:
6 x body params x (prompt + chosen + rejected) + 6 x head params x completion tokens. Work beyond that (a prompt
run twice, padding, the head over prompt positions) lowers a trainer's MFU.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def prepare(work: Path, n_pairs: int) -> tuple[Path, Path]:
    from align.cli import main

    hh = ROOT.parent / "shared" / "data" / "hh_rlhf_harmless_test_1000.jsonl"
    assert (
        main(["data", "import-rankings", "--from", "hh-rlhf", str(hh), "--out", str(work / "hh.jsonl")]) == 0
    )
    assert (
        main(
            [
                "data",
                "build-preferences",
                str(work / "hh.jsonl"),
                "--out",
                str(work / "prefs"),
                "--set",
                "validation_fraction=0.05",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "sft",
                "--config",
                str(ROOT / "configs/sft.yaml"),
                f"output_dir={work / 'sft'}",
                "train.max_steps=1",
                f"data.train_file={ROOT / 'examples/data/instructions_train.jsonl'}",
                "train.report_to=[none]",
                "train.early_stopping_patience=null",
            ]
        )
        == 0
    )
    return work / "prefs", work / "sft"


class CountingPairs:
    """Wraps TRL's preference collator (rows [chosen_0..chosen_B-1, rejected_0..], `completion_mask`) and records,
    per batch, the tokens the loss needs: (prompt once + both completions, completion tokens)."""

    def __init__(self, inner):
        self.inner, self.tokens = inner, []

    def __call__(self, examples):
        batch = self.inner(examples)
        real = batch["attention_mask"].sum(-1)
        completion = batch["completion_mask"].sum(-1)
        n = real.shape[0] // 2
        unique = int(real.sum() - (real[:n] - completion[:n]).sum())  # each pair's prompt counted once
        self.tokens.append((unique, int(completion.sum())))
        return batch


def model_flops(tokens: list[tuple[int, int]], n_params: int, n_head: int) -> list[float]:
    return [6 * (n_params - n_head) * unique + 6 * n_head * labelled for unique, labelled in tokens]


def run_align(work: Path, steps: int, n_pairs: int) -> dict:
    from sft_throughput import Timer

    from core.config import load_config
    from data_schemas.config import DPOConfig
    from stages import dpo

    cfg = load_config(
        DPOConfig,
        ROOT / "configs" / "dpo.yaml",
        [
            f"output_dir={work / 'align'}",
            f"init_from={work / 'sft'}",
            f"data.preferences_dir={work / 'prefs'}",
            "data.max_length=256",
            "data.max_prompt_length=128",
            f"data.max_pairs={n_pairs}",
            "data.max_eval_pairs=8",
            f"train.max_steps={steps}",
            "train.eval_steps=100000",
            "train.save_steps=100000",
            "train.report_to=[none]",
            "eval.prompts=0",
            "perplexity_gate.min_examples=1",
        ],
    )
    timer = Timer()
    counters = []
    orig_cls = dpo._trainer_class

    def trainer_class():
        class Counting(orig_cls()):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                self.data_collator = CountingPairs(self.data_collator)
                counters.append(self.data_collator)

        return Counting

    dpo._trainer_class = trainer_class
    try:
        dpo.run(cfg, callbacks=[timer.callback])
    finally:
        dpo._trainer_class = orig_cls
    return {"step_times": timer.steps, "tokens": counters[0].tokens[: len(timer.steps)]}


def run_trl(work: Path, steps: int, n_pairs: int) -> dict:
    import torch
    from datasets import Dataset, load_from_disk
    from peft import LoraConfig, PeftModel
    from sft_throughput import Timer
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from core.models import resolve_model_path

    path = resolve_model_path("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, work / "sft" / "adapter").merge_and_unload()
    rows = list(load_from_disk(str(work / "prefs" / "pairs"))["train"])[:n_pairs]
    data = [
        {
            "prompt": r["prompt"],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
        }
        for r in rows
    ]
    args = DPOConfig(
        output_dir=str(work / "trl"),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=5e-5,
        beta=0.1,
        max_length=256,
        bf16=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=42,
        warmup_steps=0.05,
    )
    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    timer = Timer()
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(data),
        processing_class=tok,
        peft_config=lora,
        callbacks=[timer.callback],
    )
    kept = len(trainer.train_dataset)
    trainer.data_collator = counter = CountingPairs(trainer.data_collator)
    trainer.train()
    return {
        "step_times": timer.steps,
        "tokens": counter.tokens[: len(timer.steps)],
        "pairs_given": len(data),
        "pairs_kept_by_trl": kept,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--work", type=Path, default=Path("/tmp/align-bench-dpo"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "dpo.json")
    ap.add_argument("--only", choices=["trl", "align", "prepare"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    from align.cli import _quiet_libraries

    _quiet_libraries()
    if a.only == "prepare":
        prepare(a.work, a.pairs)
        return
    if a.only:  # child process: one trainer, report its own peak memory
        r = (run_trl if a.only == "trl" else run_align)(a.work, a.steps, a.pairs)
        r["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print("RESULT " + json.dumps(r), flush=True)
        return
    shutil.rmtree(a.work, ignore_errors=True)
    a.work.mkdir(parents=True)
    import torch
    from harness import cpu_flags, matmul_peak_gflops, parameter_counts, save

    from core.models import resolve_model_path

    n_params, n_head = parameter_counts(resolve_model_path("smollm2-135m-instruct"))
    peak = matmul_peak_gflops()
    print(
        f"matmul peak {peak:.1f} GFLOP/s, threads {torch.get_num_threads()}, cpu flags: {cpu_flags()}",
        flush=True,
    )
    # Preparation (an SFT run) also happens in a child: Linux carries a process's peak RSS across fork+exec, so a
    # parent that had trained would lend its own peak to every child's measurement.
    cmd = [sys.executable, __file__, "--only", "prepare", "--pairs", str(a.pairs), "--work", str(a.work)]
    subprocess.run(cmd, check=True)
    results = {}
    for name in ("trl", "align"):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--only",
                name,
                "--steps",
                str(a.steps),
                "--pairs",
                str(a.pairs),
                "--work",
                str(a.work),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        line = next(x for x in out.stdout.splitlines() if "RESULT " in x)
        r = json.loads(line.split("RESULT ", 1)[1])
        timed = r["step_times"][1:]
        r["sec_per_step"] = sum(timed) / len(timed)
        r["pairs_per_s"] = 4 / r["sec_per_step"]
        r["mfu"] = sum(model_flops(r["tokens"][1:], n_params, n_head)) / sum(timed) / (peak * 1e9)
        results[name] = r
        print(name, json.dumps({k: v for k, v in r.items() if k not in ("step_times", "tokens")}), flush=True)
    ratio = results["align"]["pairs_per_s"] / results["trl"]["pairs_per_s"]
    print("\n| trainer | s/step | pairs/s | MFU | peak RSS (MB) |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['sec_per_step']:.2f} | {r['pairs_per_s']:.3f} | {r['mfu']:.1%} | "
            f"{r['peak_rss_mb']:.0f} |"
        )
    print(f"\nalign / TRL pairs/s: {ratio:.2f}x")
    machine = {"matmul_peak_gflops": peak, "threads": torch.get_num_threads(), "cpu_flags": cpu_flags()}
    save(a.out, "dpo", {"steps": a.steps, "ratio": ratio, "machine": machine, "results": results})


if __name__ == "__main__":
    main()
