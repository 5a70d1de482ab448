"""Reward model throughput and accuracy: `align reward` (K-wise groups) vs TRL's RewardTrainer (pairs).

    .venv/bin/python bench/reward_kwise.py [--data oasst] [--steps 8]
    .venv/bin/python bench/reward_kwise.py --data oasst --steps 38 --align-steps 72
    .venv/bin/python bench/reward_kwise.py --data hh --steps 40 --max-length 256

--data oasst (K=4): the OpenAssistant trees in ../shared/data imported as rankings; prompts with at least 4 ranked
replies are cut to their top 4 (K=4 groups, 6 implied pairs each) for training; every other prompt is held out and
scored over all its implied pairs. One step = 1 group for align, its 6 pairs for TRL.
--data hh (K=2): HH-RLHF harmless pairs imported as rankings and split by prompt by `align data build-preferences`
(30% held out); training keeps the pairs that fit max length, so both trainers see the same pairs. One step = 8
pairs for both.

Both trainers start from SmolLM2-135M-Instruct with the same LoRA (r=16, alpha=32, dropout 0.05, all projections,
score head trained), learning rate 1e-4 with linear decay, fp32, the same max length, and see the same pairs per
optimizer step for the same number of steps. Pairs/s counts implied pairs trained per second of training (first
step, warm-up, not timed). Both models are scored on the same held-out groups by the same code; the accuracy
difference gets a 95% interval from a bootstrap over held-out prompts (pairs of one prompt are not independent).
--align-steps gives align more steps than TRL: a K-wise step runs K sequences where TRL's step of the same pairs
runs 2*C(K,2), so equal steps is not equal work; this compares accuracy at a training-time budget instead.

MFU (align): model FLOPs / the fp32 matmul peak measured at the start of the same run, with model FLOPs what the
K-wise loss needs: forward and backward through frozen weights, 4 x parameters x tokens, over each group's prompt
once and each of its responses (the scalar head is negligible), counted from align's own batches.
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


def write_prefs(folder: Path, source: Path, train: list[dict], held: list[dict]) -> Path:
    """The benchmark's train/held-out groups as a preferences artifact that `align reward` accepts."""
    from datasets import Dataset, DatasetDict

    from core.manifest import ArtifactWriter

    folder.mkdir(parents=True)
    DatasetDict({"train": Dataset.from_list(train), "validation": Dataset.from_list(held)}).save_to_disk(
        str(folder / "kwise")
    )
    w = ArtifactWriter(folder, "preferences", {"bench": folder.name}, [(source, "rankings")])
    w.start()
    w.complete({}, {"train_groups": len(train), "held_out_groups": len(held)})
    return folder


def prepare_oasst(work: Path, max_length: int) -> tuple[Path, list[dict], list[dict]]:
    from datasets import load_from_disk

    from data_schemas.config import PreferencesConfig
    from lib.rankings import import_rankings
    from stages.preferences import run as build_preferences

    src = ROOT.parent / "shared" / "data" / "oasst_en_trees_60.jsonl"
    import_rankings("oasst", [src], work / "oasst.jsonl")
    build_preferences(
        PreferencesConfig(inputs=[work / "oasst.jsonl"], output_dir=work / "all", validation_fraction=0.0)
    )
    rows = list(load_from_disk(str(work / "all" / "kwise"))["train"])
    train, held = [], []
    for r in rows:
        flat = [i for t in r["tiers"] for i in t]
        if len(flat) >= 4 and all(len(t) == 1 for t in r["tiers"]):
            keep = flat[:4]
            train.append({**r, "responses": [r["responses"][i] for i in keep], "tiers": [[0], [1], [2], [3]]})
        else:
            held.append(r)
    return write_prefs(work / "k4", work / "oasst.jsonl", train, held), train, held


def prepare_hh(work: Path, max_length: int) -> tuple[Path, list[dict], list[dict]]:
    """HH-RLHF pairs split by prompt, 30% held out (enough pairs for a useful interval). Training keeps only pairs
    whose two sequences fit max_length, the ones TRL keeps, so that both trainers learn from exactly the same
    pairs (align alone would keep the rest, cut from the left)."""
    from datasets import load_from_disk

    from core.models import load_tokenizer
    from data_schemas.config import ModelConfig, PreferencesConfig
    from lib.rankings import import_rankings
    from stages.preferences import run as build_preferences
    from stages.reward import encode_groups

    src = ROOT.parent / "shared" / "data" / "hh_rlhf_harmless_test_1000.jsonl"
    import_rankings("hh-rlhf", [src], work / "hh.jsonl")
    build_preferences(
        PreferencesConfig(inputs=[work / "hh.jsonl"], output_dir=work / "all", validation_fraction=0.3)
    )
    ds = load_from_disk(str(work / "all" / "kwise"))
    tok = load_tokenizer(ModelConfig(name_or_path="smollm2-135m-instruct"))
    rows = list(ds["train"])
    full = encode_groups(tok, rows, 10**9, {})
    train = [r for r, g in zip(rows, full, strict=True) if max(len(x) for x in g["seqs"]) <= max_length]
    held = list(ds["validation"])
    return write_prefs(work / "fit", work / "hh.jsonl", train, held), train, held


def group_hits(groups: list[dict], rewards: list[list[float]]) -> list[list[float]]:
    """Per held-out group, 1 / 0.5 / 0 for each implied pair ranked right / tied / wrong."""
    from eval.reward_gate import pair_hits

    return pair_hits(groups, rewards)


def bootstrap_difference(hits_a: list[list[float]], hits_b: list[list[float]], n: int = 2000) -> tuple:
    """95% interval of accuracy(a) - accuracy(b), resampling held-out groups (paired: the same groups for both)."""
    g = torch.Generator().manual_seed(0)
    sums_a = torch.tensor([sum(h) for h in hits_a], dtype=torch.float64)
    sums_b = torch.tensor([sum(h) for h in hits_b], dtype=torch.float64)
    counts = torch.tensor([len(h) for h in hits_a], dtype=torch.float64)
    idx = torch.randint(len(counts), (n, len(counts)), generator=g)
    diffs = (sums_a[idx].sum(1) - sums_b[idx].sum(1)) / counts[idx].sum(1)
    return diffs.quantile(0.025).item(), diffs.quantile(0.975).item()


def needed_tokens(seqs: list[list[int]]) -> int:
    """Tokens a group's rewards need: the shared prompt once, then each response."""
    from core.packing import common_prefix

    p = common_prefix(seqs) if len(seqs) > 1 else 0
    return p + sum(len(s) - p for s in seqs)


def run_align(prefs: Path, steps: int, groups_per_step: int, max_length: int, out: Path) -> dict:
    from core.config import load_config
    from data_schemas.config import RewardConfig
    from stages import reward

    cfg = load_config(
        RewardConfig,
        ROOT / "configs" / "reward.yaml",
        [
            f"output_dir={out}",
            f"data.preferences_dir={prefs}",
            f"data.max_length={max_length}",
            f"train.groups_per_batch={groups_per_step}",
            "train.learning_rate=1e-4",
            "train.lr_scheduler_type=linear",
            f"train.max_steps={steps}",
            "train.eval_steps=100000",
            "train.save_steps=100000",
            "train.warmup_ratio=0",
            "train.report_to=[none]",
            "gate.min_pairs=1",
        ],
    )
    timer = Timer()
    needed: list[int] = []  # per training batch: each group's prompt once plus its responses
    orig_cls = reward._trainer_class

    def trainer_class(*a, **k):
        class Counting(orig_cls(*a, **k)):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                inner = self.data_collator

                def collate(groups):
                    needed.append(sum(needed_tokens(g["seqs"]) for g in groups))
                    return inner(groups)

                self.data_collator = collate

        return Counting

    reward._trainer_class = trainer_class
    try:
        gate = reward.run(cfg, callbacks=[timer.callback]).gates[0]
    finally:
        reward._trainer_class = orig_cls
    m = gate.metrics
    return {
        "step_times": timer.steps,
        "needed_tokens": needed[: len(timer.steps)],
        "heldout_rewards": json.loads((out / "heldout_rewards.json").read_text()),
        "accuracy": m["accuracy"],
        "held_out_pairs": m["pairs"],
        "length_baseline": m["length_baseline_accuracy"],
    }


def run_trl(
    train: list[dict], held: list[dict], steps: int, pairs_per_step: int, max_length: int, out: Path
) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed
    from trl import RewardConfig, RewardTrainer

    from core.models import resolve_model_path
    from eval.reward_gate import implied_pairs_of

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
        per_device_train_batch_size=pairs_per_step,
        learning_rate=1e-4,
        max_length=max_length,
        bf16=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=42,
        lr_scheduler_type="linear",
        warmup_steps=0,
    )
    set_seed(42)  # the score head is initialised at random here: seed it as align does, so runs repeat
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
    from eval.reward_gate import pairwise_metrics
    from lib.reward_model import score_groups
    from stages.reward import encode_groups

    class Wrap(torch.nn.Module):  # TRL's PEFT model exposes the same base model / score layout
        def __init__(self, m):
            super().__init__()
            self.m = m
            self.config = m.config  # score_groups picks its packing by the attention implementation

        def get_base_model(self):
            return self.m.get_base_model()

    groups = encode_groups(tok, held, max_length, {})
    rewards = score_groups(Wrap(trainer.model), groups)
    m = pairwise_metrics(groups, rewards)
    return {
        "step_times": timer.steps,
        "heldout_rewards": rewards,
        "accuracy": m["accuracy"],
        "held_out_pairs": m["pairs"],
        "pairs_given": len(pairs),
        "pairs_kept_by_trl": kept,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", choices=["oasst", "hh"], default="oasst")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument(
        "--align-steps",
        type=int,
        default=None,
        help="steps for align (default --steps): K-wise steps are cheaper, so compare accuracy at a time budget",
    )
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument(
        "--out", type=Path, default=None, help="results file (default bench/results/reward_kwise[_DATA].json)"
    )
    a = ap.parse_args()
    work = a.work or Path(f"/tmp/align-bench-reward-{a.data}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    from align.cli import _quiet_libraries
    from eval.reward_gate import implied_pairs_of

    _quiet_libraries()
    from harness import cpu_flags, matmul_peak_gflops, parameter_counts, save

    from core.models import resolve_model_path

    peak = matmul_peak_gflops()
    n_params, n_head = parameter_counts(resolve_model_path("smollm2-135m-instruct"))
    print(
        f"matmul peak {peak:.1f} GFLOP/s, threads {torch.get_num_threads()}, cpu flags: {cpu_flags()}",
        flush=True,
    )
    prefs, train, held = (prepare_oasst if a.data == "oasst" else prepare_hh)(work, a.max_length)
    # same pairs per optimizer step: one K=4 group (6 pairs) or 8 K=2 groups (8 pairs)
    groups_per_step = 1 if a.data == "oasst" else 8
    pairs_per_step = sum(len(implied_pairs_of(g["tiers"])) for g in train[:groups_per_step])
    train_pairs = sum(len(implied_pairs_of(g["tiers"])) for g in train)
    print(f"{len(train)} training groups ({train_pairs} pairs), {len(held)} held-out groups", flush=True)
    results = {}
    results["trl"] = run_trl(train, held, a.steps, pairs_per_step, a.max_length, work / "trl")
    rss_trl = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    align_steps = a.align_steps or a.steps
    results["align"] = run_align(prefs, align_steps, groups_per_step, a.max_length, work / "align")
    hits = {}
    for name, r in results.items():
        timed = r["step_times"][1:]
        r["pairs_per_step"] = pairs_per_step
        r["pairs_per_s"] = pairs_per_step * len(timed) / sum(timed)
        r["sec_per_step"] = sum(timed) / len(timed)
        r["train_seconds"] = sum(r["step_times"])
        hits[name] = group_hits(list(held), r["heldout_rewards"])
        print(name, json.dumps({k: v for k, v in r.items() if k not in ("step_times", "heldout_rewards")}))
    r = results["align"]
    body = n_params - n_head  # a reward model runs no LM head (its embeddings are only looked up)
    r["mfu"] = 4 * body * sum(r["needed_tokens"][1:]) / sum(r["step_times"][1:]) / (peak * 1e9)
    print(f"align MFU {r['mfu']:.1%} (matmul peak {peak:.1f} GFLOP/s)", flush=True)
    ratio = results["align"]["pairs_per_s"] / results["trl"]["pairs_per_s"]
    time_ratio = results["trl"]["train_seconds"] / results["align"]["train_seconds"]
    diff = results["align"]["accuracy"] - results["trl"]["accuracy"]
    lo, hi = bootstrap_difference(hits["align"], hits["trl"])
    print("\n| trainer | steps | s/step | pairs/s | training s | held-out accuracy | held-out pairs |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {len(r['step_times'])} | {r['sec_per_step']:.2f} | {r['pairs_per_s']:.3f} | "
            f"{r['train_seconds']:.0f} | {r['accuracy']:.3f} | {r['held_out_pairs']} |"
        )
    print(
        f"\nalign / TRL pairs/s: {ratio:.2f}x; TRL / align training time: {time_ratio:.2f}x; accuracy align - TRL {diff:+.3f} (95% interval {lo:+.3f} to "
        f"{hi:+.3f}); length-only baseline accuracy {results['align']['length_baseline']:.3f}; "
        f"peak RSS after TRL run {rss_trl:.0f} MB"
    )
    name = "reward_kwise.json" if a.data == "oasst" else f"reward_kwise_{a.data}.json"
    out = a.out or ROOT / "bench" / "results" / name
    save(
        out,
        "reward_kwise",
        {
            "data": a.data,
            "steps": a.steps,
            "machine": {
                "matmul_peak_gflops": peak,
                "threads": torch.get_num_threads(),
                "cpu_flags": cpu_flags(),
            },
            "align_steps": align_steps,
            "time_ratio": time_ratio,
            "max_length": a.max_length,
            "ratio": ratio,
            "accuracy_difference": diff,
            "accuracy_difference_95": [lo, hi],
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
