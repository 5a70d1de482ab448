"""The fine-tuning methods side by side: the same data, steps and batches, one `align sft` process each.

    .venv/bin/python bench/methods.py [--steps 20] [--only lora,ia3] [--out bench/results/methods.json]

Every configuration trains the real model (SmolLM2-135M-Instruct) on the self-instruct seed tasks (../shared/data,
else the bundled examples) for the same number of optimizer steps, 8 examples of at most 256 tokens each, and
reports:
- trainable parameters (core.plan's count: PEFT's own for the adapters, tests/stages/test_sft_peft_methods.py);
- peak memory: the process's maximum resident set (getrusage of the child), and align plan's estimate beside it;
- time per optimizer step (the Trainer's train_runtime / steps; the first step's warm-up included for all);
- held-out loss after training on the same 15% split (the split is seeded), and the loss before training (the
  base model on that split, `align eval perplexity`-style scoring of the assistant tokens) as the baseline.
Each method runs at a learning rate customary for it (the `lr` column; PEFT's and the papers' examples): a single
rate for all would starve the virtual-token methods or wreck full fine-tuning. QLoRA needs CUDA and is listed as
not measured on a machine without it. The CPU's flags are recorded with the results.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from harness import cpu_flags, save  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "self_instruct_seed_tasks.jsonl"
BUNDLED = ROOT / "examples" / "data" / "instructions_train.jsonl"

# name: (overrides, learning rate)
METHODS: dict[str, tuple[list[str], float]] = {
    "LoRA r16": (["peft.method=lora"], 1e-3),
    "AdaLoRA r16 (from 24)": (["peft.method=adalora"], 1e-3),
    "IA3": (["peft.method=ia3"], 3e-3),
    "prompt tuning (20 tokens, text init)": (
        [
            "peft.method=prompt_tuning",
            "peft.prompt_init_text=Answer the instruction helpfully and accurately.",
        ],
        3e-2,
    ),
    "P-tuning (20 tokens)": (["peft.method=p_tuning"], 1e-3),
    "prefix tuning (20 tokens)": (["peft.method=prefix_tuning"], 1e-2),
    "full fine-tuning": (["lora.enabled=false"], 5e-5),
    "top 2 blocks": (["lora.enabled=false", "partial.trainable=top_blocks", "partial.top_blocks=2"], 1e-4),
    "head only": (["lora.enabled=false", "partial.trainable=head"], 1e-4),
    "LayerNorm only": (["lora.enabled=false", "partial.trainable=layernorm"], 1e-3),
    "gradual unfreezing (top 1, +2 every 5 steps)": (
        [
            "lora.enabled=false",
            "partial.trainable=top_blocks",
            "partial.top_blocks=1",
            "partial.unfreeze={every_steps: 5, blocks_per_step: 2}",
        ],
        1e-4,
    ),  # fmt: skip
    "full, layer-wise LR decay 0.8": (["lora.enabled=false", "partial.layerwise_lr_decay=0.8"], 1e-4),
}

PEAK = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)"
)


def common(data: Path, steps: int, out: Path) -> list[str]:
    return [f"output_dir={out}", f"data.train_file={data}", "data.validation_file=null",
            "data.validation_fraction=0.15", "data.max_length=256", "train.per_device_train_batch_size=8",
            f"train.max_steps={steps}", f"train.eval_steps={steps}", f"train.save_steps={steps}",
            "train.early_stopping_patience=null", "train.report_to=[none]", "train.warmup_ratio=0.1",
            "train.lr_scheduler_type=cosine"]  # fmt: skip


def baseline_loss(data: Path, steps: int) -> float:
    """The base model's held-out loss on the same split (token-weighted over assistant tokens, as eval_loss)."""
    from core.config import load_config
    from core.models import load_for_eval, load_tokenizer
    from data_schemas.config import SFTConfig
    from eval.perplexity import sequence_nll
    from stages.sft import load_data

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(SFTConfig, ROOT / "configs" / "sft.yaml", common(data, steps, Path(tmp) / "x"))
    tok = load_tokenizer(cfg.model)
    _, val, _, _ = load_data(cfg, tok, {})
    model, _, _ = load_for_eval(cfg.model.name_or_path)
    nll, n = sequence_nll(model, val, 8, tok.pad_token_id)
    return sum(nll) / sum(n)


def run_one(name: str, extra: list[str], lr: float, data: Path, steps: int) -> dict:
    from core.config import load_config
    from core.plan import GIB, estimate
    from data_schemas.config import SFTConfig
    from stages.registry import STAGES

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "sft"
        overrides = [*common(data, steps, out), f"train.learning_rate={lr}", *extra]
        plan = estimate(load_config(SFTConfig, ROOT / "configs" / "sft.yaml", overrides), STAGES["sft"].plan)
        cmd = [
            sys.executable,
            "-m",
            "align",
            "sft",
            "--config",
            str(ROOT / "configs" / "sft.yaml"),
            *overrides,
        ]
        res = subprocess.run([sys.executable, "-c", PEAK, *cmd], capture_output=True, text=True, cwd=ROOT)
        peak_kb, code = (int(x) for x in res.stdout.split()[-2:])
        if code != 0:
            return {"method": name, "error": res.stderr.strip().splitlines()[-1:], "lr": lr}
        metrics = json.loads((out / "metrics.json").read_text())
        runtime = next(x["train_runtime"] for x in metrics["log_history"] if "train_runtime" in x)
    return {
        "method": name,
        "lr": lr,
        "trainable": plan.trainable,
        "trainable_share": plan.trainable / plan.params,
        "peak_gib": peak_kb * 1024 / GIB,
        "plan_gib": plan.total / GIB,
        "seconds_per_step": runtime / metrics["global_step"],
        "eval_loss": metrics["eval_loss"],
        "steps": metrics["global_step"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--only", default=None, help="comma-separated method names (substrings)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "methods.json")
    args = ap.parse_args()
    data = SHARED if SHARED.exists() else BUNDLED
    chosen = {k: v for k, v in METHODS.items() if not args.only or any(s in k for s in args.only.split(","))}
    rows = []
    base = baseline_loss(data, args.steps)
    print(f"base model held-out loss {base:.4f}", flush=True)
    for name, (extra, lr) in chosen.items():
        r = run_one(name, extra, lr, data, args.steps)
        rows.append(r)
        if "error" in r:
            print(f"{name:<45} failed: {r['error']}", flush=True)
            continue
        print(f"{name:<45} lr {lr:<7g} trainable {r['trainable'] / 1e6:8.3f}M ({100 * r['trainable_share']:.3f}%) "
              f"peak {r['peak_gib']:.2f} GiB (plan {r['plan_gib']:.2f}) {r['seconds_per_step']:.2f} s/step "
              f"held-out loss {r['eval_loss']:.4f}", flush=True)  # fmt: skip
    rows.append({"method": "QLoRA r16", "error": "not measured: needs a CUDA GPU (scripts/gpu_smoke.sh)"})
    result = {"machine": {"flags": cpu_flags()}, "data": str(data.name), "steps": args.steps,
              "batch": "8 x <= 256 tokens", "base_eval_loss": base, "rows": rows}  # fmt: skip
    if math.isfinite(base):
        save(args.out, "methods", result)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
