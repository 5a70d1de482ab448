"""Reward model throughput and accuracy: `align reward` (K-wise groups) vs TRL's RewardTrainer (pairs).

    .venv/bin/python bench/reward_kwise.py [--steps 8]

Data: the OpenAssistant trees in ../shared/data imported as rankings; prompts with at least 4 ranked replies are
cut to their top 4 (K=4 groups, 6 implied pairs each) for training; every other prompt is held out and scored
over all its implied pairs. Both trainers start from SmolLM2-135M-Instruct with the same LoRA (r=16, alpha=32, all
projections, score head trained), learning rate 1e-4, max length 512, fp32, and see the same pairs per optimizer
step (align: 1 group = 6 pairs; TRL: 6 pairs) for the same number of steps. Pairs/s counts implied pairs trained
per second of training (first step, warm-up, not timed).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from sft_throughput import Timer  # noqa: E402


def prepare(work: Path) -> tuple[Path, list[dict], list[dict]]:
    from datasets import Dataset, DatasetDict

    from data_schemas.config import PreferencesConfig
    from stages.rankings import build_preferences, import_rankings

    src = ROOT.parent / "shared" / "data" / "oasst_en_trees_60.jsonl"
    import_rankings("oasst", [src], work / "oasst.jsonl")
    build_preferences(
        PreferencesConfig(inputs=[work / "oasst.jsonl"], output_dir=work / "all", validation_fraction=0.0)
    )
    from datasets import load_from_disk

    rows = list(load_from_disk(str(work / "all" / "kwise"))["train"])
    train, held = [], []
    for r in rows:
        flat = [i for t in r["tiers"] for i in t]
        if len(flat) >= 4 and all(len(t) == 1 for t in r["tiers"]):
            keep = flat[:4]
            train.append({**r, "responses": [r["responses"][i] for i in keep], "tiers": [[0], [1], [2], [3]]})
        else:
            held.append(r)
    prefs = work / "k4"
    prefs.mkdir(parents=True)
    DatasetDict({"train": Dataset.from_list(train), "validation": Dataset.from_list(held)}).save_to_disk(
        str(prefs / "kwise")
    )
    # a manifest so that align accepts the folder as a preferences artifact
    from align.manifest import ArtifactWriter

    w = ArtifactWriter(prefs, "preferences", {"bench": "k4"}, [(work / "oasst.jsonl", "rankings")])
    w.start()
    w.complete({}, {"train_groups": len(train), "held_out_groups": len(held)})
    return prefs, train, held


def run_align(prefs: Path, steps: int, out: Path) -> dict:
    from align.config import load_config
    from data_schemas.config import RewardConfig
    from stages import common, reward

    cfg = load_config(
        RewardConfig,
        ROOT / "configs" / "reward.yaml",
        [
            f"output_dir={out}",
            f"data.preferences_dir={prefs}",
            "train.groups_per_batch=1",
            f"train.max_steps={steps}",
            "train.eval_steps=100000",
            "train.save_steps=100000",
            "train.warmup_ratio=0",
            "train.report_to=[none]",
            "gate.min_pairs=1",
        ],
    )
    timer = Timer()
    common.EXTRA_CALLBACKS.append(timer.callback)
    try:
        _, gate = reward.run(cfg)
    finally:
        common.EXTRA_CALLBACKS.remove(timer.callback)
    m = gate["metrics"]
    return {
        "step_times": timer.steps,
        "pairs_per_step": 6,
        "accuracy": m["accuracy"],
        "held_out_pairs": m["pairs"],
        "length_baseline": m["length_baseline_accuracy"],
    }


def run_trl(train: list[dict], held: list[dict], steps: int, out: Path) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from align.models import resolve_model_path
    from stages.reward import implied_pairs_of

    path = resolve_model_path("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(path)
    pairs = []
    for g in train:
        for a, b in implied_pairs_of(g["tiers"]):
            pairs.append(
                {
                    "prompt": g["prompt"],
                    "chosen": [{"role": "assistant", "content": g["responses"][a]}],
                    "rejected": [{"role": "assistant", "content": g["responses"][b]}],
                }
            )
    args = RewardConfig(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=6,
        learning_rate=1e-4,
        max_length=512,
        bf16=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=42,
        lr_scheduler_type="linear",
        warmup_steps=0,
    )
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        task_type="SEQ_CLS",
        modules_to_save=["score"],
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    timer = Timer()
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(pairs),
        processing_class=tok,
        peft_config=lora,
        callbacks=[timer.callback],
    )
    kept = len(trainer.train_dataset)
    trainer.train()
    # held-out accuracy with the same scoring path as align (last token of prompt + response)
    from stages.reward import encode_groups, pairwise_metrics, score_groups

    class Wrap(torch.nn.Module):  # TRL's PEFT model exposes the same base model / score layout
        def __init__(self, m):
            super().__init__()
            self.m = m

        def get_base_model(self):
            return self.m.get_base_model()

    groups = encode_groups(tok, held, 512, {})
    rewards = score_groups(Wrap(trainer.model), groups)
    m = pairwise_metrics(groups, rewards)
    return {
        "step_times": timer.steps,
        "pairs_per_step": 6,
        "accuracy": m["accuracy"],
        "held_out_pairs": m["pairs"],
        "pairs_given": len(pairs),
        "pairs_kept_by_trl": kept,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--work", type=Path, default=Path("/tmp/align-bench-reward"))
    a = ap.parse_args()
    shutil.rmtree(a.work, ignore_errors=True)
    a.work.mkdir(parents=True)
    from align.cli import _quiet_libraries

    _quiet_libraries()
    prefs, train, held = prepare(a.work)
    print(
        f"{len(train)} K=4 training groups ({6 * len(train)} pairs), {len(held)} held-out groups", flush=True
    )
    results = {}
    results["trl"] = run_trl(train, held, a.steps, a.work / "trl")
    rss_trl = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results["align"] = run_align(prefs, a.steps, a.work / "align")
    for name, r in results.items():
        timed = r["step_times"][1:]
        r["pairs_per_s"] = r["pairs_per_step"] * len(timed) / sum(timed)
        r["sec_per_step"] = sum(timed) / len(timed)
        print(name, json.dumps({k: v for k, v in r.items() if k != "step_times"}), flush=True)
    ratio = results["align"]["pairs_per_s"] / results["trl"]["pairs_per_s"]
    print("\n| trainer | s/step | pairs/s | held-out accuracy | held-out pairs |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['sec_per_step']:.2f} | {r['pairs_per_s']:.3f} | {r['accuracy']:.3f} | {r['held_out_pairs']} |"
        )
    print(
        f"\nalign / TRL pairs/s: {ratio:.2f}x; length-only baseline accuracy {results['align']['length_baseline']:.3f}; "
        f"peak RSS after TRL run {rss_trl:.0f} MB"
    )
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "reward_kwise.json").write_text(
        json.dumps({"steps": a.steps, "ratio": ratio, "results": results}, indent=2)
    )


if __name__ == "__main__":
    main()
