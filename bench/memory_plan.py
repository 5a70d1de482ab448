"""`align plan`'s estimate against the measured peak memory of real `align sft` runs on this machine.

    .venv/bin/python bench/memory_plan.py [--out bench/results/memory_plan.json]

Each configuration trains the real model (SmolLM2-135M-Instruct) for 3 steps on the self-instruct tasks, in its own
process; the peak is that process's maximum resident set size (getrusage of the child). The estimate is
`core.plan.estimate` of the same config. The data are cut to max_length, so most sequences are full: the estimate
assumes every sequence is (its worst case).
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "self_instruct_seed_tasks.jsonl"
CONFIGS = {
    "LoRA r16, batch 8 x 128": ["train.per_device_train_batch_size=8", "data.max_length=128"],
    "LoRA r16, batch 4 x 512": ["train.per_device_train_batch_size=4", "data.max_length=512"],
    "full, batch 4 x 128": ["lora.enabled=false", "train.per_device_train_batch_size=4", "data.max_length=128"],
    "top 2 blocks, batch 8 x 128": ["lora.enabled=false", "partial.trainable=top_blocks", "partial.top_blocks=2",
                                    "train.per_device_train_batch_size=8", "data.max_length=128"],
}  # fmt: skip
COMMON = ["data.validation_file=null", "data.validation_fraction=0", "train.max_steps=3", "train.save_steps=100",
          "train.eval_steps=100", "train.early_stopping_patience=null", "train.report_to=[none]"]  # fmt: skip

PEAK = "import resource, subprocess, sys; subprocess.run(sys.argv[1:]); " \
       "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "memory_plan.json")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from bench.harness import save
    from core.config import load_config
    from core.plan import GIB, estimate
    from data_schemas.config import SFTConfig
    from stages.registry import STAGES

    rows = []
    for name, extra in CONFIGS.items():
        with tempfile.TemporaryDirectory() as tmp:
            overrides = [f"output_dir={tmp}/sft", f"data.train_file={DATA}", *COMMON, *extra]
            plan = estimate(
                load_config(SFTConfig, ROOT / "configs" / "sft.yaml", overrides), STAGES["sft"].plan
            )
            cmd = [sys.executable, "-m", "align", "sft", "--config", "configs/sft.yaml", *overrides]
            r = subprocess.run([sys.executable, "-c", PEAK, *cmd], cwd=ROOT, capture_output=True, text=True)
            peak = int(r.stdout.strip().splitlines()[-1]) * 1024 / GIB  # ru_maxrss is in KiB on Linux
        row = {"config": name, "estimate_gib": plan.total / GIB, "measured_gib": peak,
               "error": plan.total / GIB / peak - 1, "rule_of_thumb_gib": plan.rule_of_thumb / GIB,
               "terms_gib": {k: v / GIB for k, v in plan.terms.items()}}  # fmt: skip
        rows.append(row)
        print(f"{name:<30} estimate {row['estimate_gib']:6.2f} GiB  measured {peak:6.2f} GiB  "
              f"error {100 * row['error']:+.0f}%  (2.5x rule {row['rule_of_thumb_gib']:.2f} GiB)", flush=True)  # fmt: skip
    flags = next((x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags")), "")
    machine = {
        "cpu": platform.processor(),
        "flags": " ".join(f for f in flags.split() if f.startswith(("avx", "amx"))),
    }
    save(args.out, "memory_plan", {"machine": machine, "rows": rows})


if __name__ == "__main__":
    main()
