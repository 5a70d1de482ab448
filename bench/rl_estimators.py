"""PPO (GAE with a value head) against the critic-free GRPO family, at an equal rollout budget, in one run.

    .venv/bin/python bench/rl_estimators.py [--steps 10] [--out bench/results/rl_estimators.json]

Every estimator samples 16 responses per iteration: PPO 16 prompts x 1, the critic-free rows (GRPO, RLOO, Dr. GRPO,
DAPO with clip-higher, REINFORCE++-baseline, GRPO with GSPO's sequence-level loss) 4 prompts x 4 (a group per
prompt). Same policy, reward, learning rate, KL coefficient, seeds and iterations; transformers `generate` rollouts.
The task is the toy of tests/stages/test_ppo.py: a tiny Llama with peaked next-token distributions (a stand-in
for a trained model that runs in seconds on a CPU) and the rule reward "the response contains 'Road'" (about 6%
of its responses at the start). Reported: mean reward of the first iteration and of the last three, KL to SFT at
the end, and the seconds the iterations took (generate + score + train). A toy: it shows the estimators' relative
sample efficiency and cost on one task, not their quality on a real model.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RUNS = {
    "ppo (gae)": ["train.rollout_batch_size=16", "train.group_size=1", "train.advantage_estimator=gae"],
    "grpo": ["train.rollout_batch_size=4", "train.group_size=4", "train.advantage_estimator=grpo"],
    "rloo": ["train.rollout_batch_size=4", "train.group_size=4", "train.advantage_estimator=rloo"],
    "dr_grpo": ["train.rollout_batch_size=4", "train.group_size=4", "train.advantage_estimator=dr_grpo"],
    "dapo": ["train.rollout_batch_size=4", "train.group_size=4", "train.advantage_estimator=dapo",
             "train.clip_range_high=0.28"],
    "reinforce_pp_baseline": ["train.rollout_batch_size=4", "train.group_size=4",
                              "train.advantage_estimator=reinforce_pp_baseline"],
    "gspo": ["train.rollout_batch_size=4", "train.group_size=4", "train.advantage_estimator=grpo",
             "train.policy_loss=gspo", "train.clip_range=0.02", "train.clip_range_high=0.03"],
}  # fmt: skip


def peaky_sft(root: Path) -> Path:
    """The toy policy's SFT artifact (as the peaky_sft fixture of tests/stages/test_ppo.py)."""
    from align.cli import main
    from bench.harness import peaked_llama
    from core.models import resolve_model_path

    peaked_llama(root / "peaky", resolve_model_path("tiny-random-llama"))
    ex = ROOT / "examples" / "data"
    assert main(["sft", "--config", "configs/sft.yaml", f"output_dir={root / 'sft'}",
                 f"model.name_or_path={root / 'peaky'}", f"data.train_file={ex / 'instructions_train.jsonl'}",
                 f"data.validation_file={ex / 'instructions_validation.jsonl'}", "train.max_steps=1",
                 "train.learning_rate=1e-7", "train.early_stopping_patience=null", "train.report_to=[none]"]) == 0  # fmt: skip
    return root / "sft"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "rl_estimators.json")
    args = ap.parse_args()
    from align.cli import main as align
    from bench.harness import save

    results = {
        "machine": {"cpu": platform.processor() or platform.machine()},
        "steps": args.steps,
        "runs": {},
    }
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        sft = peaky_sft(root)
        for name, extra in RUNS.items():
            out = root / name.split()[0]
            code = align(["ppo", "--config", "configs/ppo.yaml", f"output_dir={out}", f"init_from={sft}",
                          "reward.artifact=null", "reward.rule={kind: contains, text: Road}",
                          "reward.missing_eos_penalty=null", "rollout.engine=generate", "rollout.max_new_tokens=16",
                          "train.mini_batch_size=8", "train.learning_rate=1e-3", "train.kl_coef=0.05",
                          f"train.steps={args.steps}", "train.save_steps=1000", "train.report_to=[none]",
                          "prompts.heldout_prompts=8", "policy_gate.min_prompts=8",
                          "perplexity_gate.min_examples=5", "perplexity_gate.max_relative_increase=10.0", *extra])  # fmt: skip
            h = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            secs = sum(x["time_generate"] + x["time_score"] + x["time_train"] + x["time_sync"] for x in h)
            results["runs"][name] = {
                "exit": code,
                "responses_per_iteration": 16,
                "reward_first": h[0]["reward_mean"],
                "reward_last3": sum(x["reward_mean"] for x in h[-3:]) / 3,
                "kl_last": h[-1]["kl"],
                "seconds": secs,
                "reward_curve": [x["reward_mean"] for x in h],
            }
    save(args.out, "rl_estimators", results)
    print(
        "| estimator | prompts x samples | reward, iteration 1 | reward, last 3 | KL to SFT (last) | seconds |"
    )
    print("|---|---|---|---|---|---|")
    for name, r in results["runs"].items():
        shape = "16 x 1" if name.startswith("ppo") else "4 x 4"
        print(f"| {name} | {shape} | {r['reward_first']:.3f} | {r['reward_last3']:.3f} | {r['kl_last']:.2f} | "
              f"{r['seconds']:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
