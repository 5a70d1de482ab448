"""The sharded GPU paths on a machine with no package index: SFT, reward, DPO and GRPO full-parameter under FSDP2.

    # here, with pip: the wheels the lent GPU image lacks, and the tokenizer, into ignored folders
    bash scripts/gpu_wheels.sh
    # there (torch, transformers, accelerate, peft already installed), from the repository root:
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:.
    python3 scripts/gpu_check.py --tokenizer .gpu/tiny-random-llama --out OUT/gpu_check.json

A random Llama (hidden 1024, `--layers` layers) is saved as a plain checkpoint with the given tokenizer (no
download), then each stage runs through the real CLI in as many processes as there are GPUs (one process: FSDP2
over a group of its own): `align sft`, `align reward` (from examples/data/preference_rankings.jsonl), `align dpo`,
`align ppo` (GRPO, transformers generate), each with
`train.sharding=fsdp2 lora.enabled=false` and precision auto (bf16 on a GPU with native bf16), then DPO with a LoRA
on the sharded base and GRPO with every shard in host memory (`train.cpu_offload`). For each: exit status, seconds,
every step's loss, the peak memory per process the stage records, and whether the consolidated `model/` loads in
plain transformers (a LoRA run: its `adapter/` is there). The JSON goes to `--out`; exit status 0 when every stage ran and loaded.

It runs on a CPU too (gloo, fp32): that is how its logic is checked where no GPU is lent.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.harness import random_llama  # noqa: E402

EX = ROOT / "examples" / "data"
STAGES = ["sft", "reward", "dpo", "grpo", "dpo-lora", "grpo-offload"]
# runs of a stage above with settings of their own: (the stage's run, its extra settings)
VARIANTS = {"dpo-lora": ("dpo", ["lora.enabled=true"]), "grpo-offload": ("grpo", ["train.cpu_offload=true"])}


def pairs_file(path: Path) -> None:
    """Preference pairs from the example instructions: the reference answer chosen, its first third rejected."""
    with path.open("w") as f:
        for line in (EX / "instructions_train.jsonl").read_text().splitlines():
            r = json.loads(line)
            if "messages" in r:
                prompt, answer = r["messages"][0]["content"], r["messages"][-1]["content"]
            else:
                prompt, answer = r["instruction"] + ("\n" + r["input"] if r.get("input") else ""), r["output"]
            if len(answer) > 8:
                f.write(
                    json.dumps({"prompt": prompt, "chosen": answer, "rejected": answer[: len(answer) // 3]})
                    + "\n"
                )


def commands(model: Path, pairs: Path, prefs: Path, out: Path, steps: int) -> dict[str, list[str]]:
    common = ["lora.enabled=false", "train.sharding=fsdp2", "train.report_to=[none]"]
    heldout = EX / "instructions_validation.jsonl"
    gates = [
        f"gate_data={heldout}",
        "perplexity_gate.min_examples=5",
        "perplexity_gate.max_relative_increase=100",
    ]
    runs = {
        "sft": ["sft", "--config", "configs/sft.yaml", f"output_dir={out / 'sft'}", f"model.name_or_path={model}",
                f"data.train_file={EX / 'instructions_train.jsonl'}", f"data.validation_file={heldout}",
                f"train.max_steps={steps}", "train.early_stopping_patience=null", "train.learning_rate=1e-5",
                "train.per_device_train_batch_size=4", "data.max_length=256", *common],
        "reward": ["reward", "--config", "configs/reward.yaml", f"output_dir={out / 'reward'}", f"init_from={model}",
                   f"data.preferences_dir={prefs}", f"train.max_steps={steps}", "train.learning_rate=1e-5",
                   "train.groups_per_batch=2", "data.max_length=256", "gate.min_pairs=1", *common],
        "dpo": ["dpo", "--config", "configs/dpo.yaml", f"output_dir={out / 'dpo'}", f"init_from={model}",
                "data.preferences_dir=null", f"data.pairs_file={pairs}", "data.validation_fraction=0.25",
                f"train.max_steps={steps}", "train.learning_rate=1e-6", "train.per_device_train_batch_size=2",
                "eval.prompts=2", "eval.max_new_tokens=8", *gates, *common],
        "grpo": ["ppo", "--config", "configs/ppo.yaml", f"output_dir={out / 'grpo'}", f"init_from={model}",
                 "reward.artifact=null", "reward.rule={kind: contains, text: the}", "reward.missing_eos_penalty=null",
                 "rollout.engine=generate", "rollout.max_new_tokens=16", "train.rollout_batch_size=4",
                 "train.group_size=4", "train.advantage_estimator=grpo", "train.mini_batch_size=8",
                 f"train.steps={steps}", "train.learning_rate=1e-6", "policy_gate.min_prompts=2",
                 "prompts.heldout_prompts=2", *gates, *common],
    }  # fmt: skip
    for name, (stage, extra) in VARIANTS.items():
        runs[name] = [x.replace(f"output_dir={out / stage}", f"output_dir={out / name}") for x in runs[stage]]
        runs[name] += extra  # later settings win
    return runs


def losses(folder: Path) -> list[float]:
    rows = (
        [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        if (folder / "metrics.jsonl").exists()
        else []
    )
    return [r.get("loss", r.get("policy_loss")) for r in rows if "loss" in r or "policy_loss" in r]


def loads(folder: Path) -> str:
    """'ok' when plain transformers loads the folder (a causal LM, or a reward model's scalar head) and computes finite
    logits, else the error."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    try:
        scalar = any(
            a.endswith("ForSequenceClassification") for a in AutoConfig.from_pretrained(folder).architectures
        )
        m = (AutoModelForSequenceClassification if scalar else AutoModelForCausalLM).from_pretrained(folder)
        with torch.no_grad():
            logits = m(torch.tensor([[1, 2, 3, 4]])).logits
        return "ok" if torch.isfinite(logits).all() else "non-finite logits"
    except Exception as e:  # noqa: BLE001 (reported, not raised: the other stages still run)
        return f"{type(e).__name__}: {e}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--tokenizer", type=Path, required=True, help="a folder with a tokenizer (tiny-random-llama)"
    )
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--only", nargs="+", choices=STAGES, default=STAGES)
    a = ap.parse_args()
    import torch

    gpus = torch.cuda.device_count()
    record = {"device": torch.cuda.get_device_name(0) if gpus else platform.processor() or "cpu", "gpus": gpus,
              "torch": torch.__version__, "python": platform.python_version(), "stages": {}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        record["params"] = random_llama(tmp / "model", a.tokenizer, a.layers)
        pairs_file(tmp / "pairs.jsonl")
        built = subprocess.run([sys.executable, "-m", "align", "data", "build-preferences",
                                str(EX / "preference_rankings.jsonl"), "--out", str(tmp / "prefs")], cwd=ROOT,
                               capture_output=True, text=True, timeout=600)  # fmt: skip
        assert built.returncode == 0, built.stderr[-2000:]
        processes = max(gpus, 1)
        launch = ["--num-processes", str(processes)] if processes > 1 else []
        for name, argv in commands(
            tmp / "model", tmp / "pairs.jsonl", tmp / "prefs", tmp / "runs", a.steps
        ).items():
            if name not in a.only:
                continue
            t0 = time.time()
            r = subprocess.run([sys.executable, "-m", "align", *argv, *launch], cwd=ROOT, capture_output=True,
                               text=True, env=dict(os.environ), timeout=1800)  # fmt: skip
            folder = tmp / "runs" / name
            manifest = folder / "manifest.json"
            metrics = json.loads(manifest.read_text()).get("metrics", {}) if manifest.exists() else {}
            record["stages"][name] = {
                "exit": r.returncode, "seconds": round(time.time() - t0, 1), "losses": losses(folder),
                "peak_memory_gib_per_process": metrics.get("peak_memory_gib_per_process"),
                "precision": metrics.get("precision"),
                "model_loads": loads(folder / "model") if (folder / "model").exists()
                else "adapter/" if (folder / "adapter").exists() else "no model/",
                "stderr_tail": r.stderr[-1500:] if r.returncode not in (0, 1) else "",
            }  # fmt: skip
            print(
                name,
                json.dumps({k: v for k, v in record["stages"][name].items() if k != "stderr_tail"}),
                flush=True,
            )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(record, indent=1) + "\n")
    ok = all(
        s["exit"] in (0, 1) and s["model_loads"] in ("ok", "adapter/") for s in record["stages"].values()
    )  # 1: a gate failed
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
