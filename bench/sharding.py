"""1 vs 2 processes under DDP, DeepSpeed ZeRO-3 and FSDP2, full-parameter and LoRA: per-process peak memory,
seconds per step, and `align plan`'s error against each measured peak, in one run.

    .venv/bin/python bench/sharding.py [--stage sft|dpo|grpo] [--layers 12] [--steps 4] [--out bench/results/sharding.json]

The model is a random Llama saved as a plain checkpoint (hidden 1024, MLP 2816, `--layers` layers, the
tiny-random-llama tokenizer: 12 layers are 170M parameters), so the training state, not the runtime, is most of a
process's memory. Every configuration is its own `align STAGE --num-processes K` command on the same data, seeds
and *global* batch (4 sequences of 128 tokens per step: 4 per process in one, 2 in two), fp32. The peak is what
the stage records (`peak_memory_gib_per_process`: each process's maximum resident set while training); s/step is
the Trainer's train_runtime / steps (the first step's warm-up included); for grpo (`align ppo` with GRPO, the
generate engine, a rule reward, 2 prompts x 4 responses of 16 tokens per iteration, one minibatch) it is the
iteration's seconds (sampling, scoring and the update). The estimate is `core.plan.layout` of the same config, for
that process count and sharding: error = estimate / measured - 1, for the larger of the two processes' peaks.

Every configuration runs full-parameter and with a LoRA (r 16), FSDP2 included (its LoRA rows: the adapter on
the sharded base). On a 2-core
CPU two processes share the cores one process uses with two threads: s/step shows the cost of the sharding
machinery, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.harness import random_llama, write_result  # noqa: E402

EX = ROOT / "examples" / "data"
ZERO3 = ROOT / "configs" / "deepspeed" / "zero3.json"
# (name, processes, sharding row of core.plan.SHARDINGS, overrides)
RUNS = [
    ("1 process", 1, "ddp", []),
    ("2 x DDP", 2, "ddp", []),
    ("2 x ZeRO-3", 2, "zero3", [f"train.deepspeed={ZERO3}"]),
    ("2 x FSDP2", 2, "fsdp2", ["train.sharding=fsdp2"]),
]


def stage_args(stage: str, model: Path, pairs: Path, out: Path, processes: int, steps: int) -> list[str]:
    common = [f"output_dir={out}", "precision=fp32", f"train.max_steps={steps}", "train.save_steps=1000",
              "train.eval_steps=1000", "train.report_to=[none]", "train.learning_rate=1e-5",
              f"train.per_device_train_batch_size={4 // processes}", "data.max_length=128"]  # fmt: skip
    if stage == "sft":
        return ["sft", "--config", "configs/sft.yaml", f"model.name_or_path={model}",
                f"data.train_file={EX / 'instructions_train.jsonl'}", "data.validation_file=null",
                "data.validation_fraction=0", "train.early_stopping_patience=null", *common]  # fmt: skip
    return ["dpo", "--config", "configs/dpo.yaml", f"init_from={model}", "data.preferences_dir=null",
            f"data.pairs_file={pairs}", "data.validation_fraction=0", "data.max_prompt_length=64", "eval.prompts=0",
            f"gate_data={EX / 'instructions_validation.jsonl'}", "perplexity_gate.min_examples=5",
            "perplexity_gate.max_relative_increase=100", *common]  # fmt: skip


def grpo_args(model: Path, out: Path, steps: int) -> list[str]:
    return ["ppo", "--config", "configs/ppo.yaml", f"output_dir={out}", f"init_from={model}", "precision=fp32",
            "reward.artifact=null", "reward.rule={kind: frequency, text: e}", "reward.missing_eos_penalty=null",
            "rollout.engine=generate", "rollout.max_new_tokens=16", "train.rollout_batch_size=2",
            "train.group_size=4", "train.advantage_estimator=grpo", "train.mini_batch_size=8", "train.ppo_epochs=1",
            f"train.steps={steps}", "train.save_steps=1000", "train.report_to=[none]", "train.learning_rate=1e-5",
            "prompts.max_prompt_length=96", "prompts.heldout_prompts=2", "policy_gate.min_prompts=2",
            f"gate_data={EX / 'instructions_validation.jsonl'}", "perplexity_gate.min_examples=5",
            "perplexity_gate.max_relative_increase=100"]  # fmt: skip


def seconds_and_loss(stage: str, out: Path, steps: int) -> tuple[float, float]:
    """(seconds per step or iteration, the last loss) of a finished run."""
    m = json.loads((out / "manifest.json").read_text())["metrics"]
    if stage != "grpo":
        history = json.loads((out / "metrics.json").read_text())["log_history"]
        runtime = next(x["train_runtime"] for x in history if "train_runtime" in x)
        return runtime / steps, m["train_loss"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    spent = [sum(v for k, v in r.items() if k.startswith("time_")) for r in rows]
    return sum(spent) / len(spent), rows[-1]["policy_loss"]


def estimate_gib(argv: list[str], processes: int, sharding: str) -> float:
    """core.plan's per-process estimate for the config `argv` names, on this CPU."""
    from core.config import load_config
    from core.plan import GIB, estimate, layout
    from stages.registry import STAGES

    stage = STAGES[argv[0]]
    cfg = load_config(stage.config_model(), ROOT / argv[2], argv[3:])
    plan = estimate(cfg, stage.plan, device="cpu")
    return (layout(plan, processes, sharding).total if processes > 1 else plan.total) / GIB


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", choices=["sft", "dpo", "grpo"], default="sft")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    rows, metrics = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        from core.models import resolve_model_path

        params = random_llama(tmp / "model", resolve_model_path("tiny-random-llama"), a.layers)
        pairs = tmp / "pairs.jsonl"
        if a.stage == "dpo":
            from tests.stages.test_dpo import _pairs_file

            _pairs_file(pairs)
        for name, n, sharding, extra in RUNS:
            for method, lora in (
                ("full", ["lora.enabled=false"]),
                ("LoRA r16", ["lora.enabled=true", "lora.r=16"]),
            ):
                out = tmp / f"{sharding}-{n}-{method.split()[0]}"
                if a.stage == "grpo":
                    argv = [*grpo_args(tmp / "model", out, a.steps), *lora, *extra]
                else:
                    argv = [*stage_args(a.stage, tmp / "model", pairs, out, n, a.steps), *lora, *extra]
                launch = ["--num-processes", str(n)] if n > 1 else []
                r = subprocess.run([sys.executable, "-m", "align", *argv, *launch], cwd=ROOT, capture_output=True,
                                   text=True, timeout=3600)  # fmt: skip
                if r.returncode != 0:
                    raise SystemExit(f"{name} {method}: exit {r.returncode}\n{r.stderr[-3000:]}")
                m = json.loads((out / "manifest.json").read_text())["metrics"]
                per_step, loss = seconds_and_loss(a.stage, out, a.steps)
                peak = max(m["peak_memory_gib_per_process"])
                est = estimate_gib(argv, n, sharding)
                row = {"run": name, "method": method, "processes": n, "sharding": sharding,
                       "peak_gib_per_process": m["peak_memory_gib_per_process"], "s_per_step": round(per_step, 3),
                       "train_loss": loss, "estimate_gib": round(est, 3),
                       "estimate_error": round(est / peak - 1, 3)}  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
                key = f"{sharding}_{n}_{method.split()[0].lower()}"
                metrics[f"{key}_peak_gib"] = peak
                metrics[f"{key}_s_per_step"] = round(per_step, 3)
    one_full = next(r for r in rows if r["processes"] == 1 and r["method"] == "full")
    for r in rows:
        if r["processes"] == 2:
            key = f"{r['sharding']}_2_{r['method'].split()[0].lower()}"
            base = next(x for x in rows if x["processes"] == 1 and x["method"] == r["method"])
            metrics[f"{key}_peak_vs_1_process"] = round(
                max(r["peak_gib_per_process"]) / max(base["peak_gib_per_process"]), 3
            )
    metrics["plan_error_max_abs"] = max(abs(r["estimate_error"]) for r in rows)
    details = {"stage": a.stage, "params": params, "layers": a.layers, "steps": a.steps, "rows": rows,
               "one_process_full_peak_gib": max(one_full["peak_gib_per_process"])}  # fmt: skip
    out = a.out or (None if a.stage == "sft" else ROOT / "bench" / "results" / f"sharding_{a.stage}.json")
    path = write_result(out, "sharding", metrics, details)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
