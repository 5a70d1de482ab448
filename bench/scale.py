"""Scale-out: 1 vs N processes for SFT and PPO, side by side in one run (tokens/s and peak memory per process).

    .venv/bin/python bench/scale.py [--processes 2] [--sft-steps 4] [--ppo-steps 2] [--out bench/results/scale.json]

Same model (SmolLM2-135M-Instruct), data (examples/data), LoRA, seeds and *global* batch in both columns: SFT 8
examples per step (8 per device in 1 process, 8/N in N), PPO 8 prompts per iteration (mini-batch 4). Every run
is its own `align ... --num-processes K` command (torchrun's launcher for K > 1, gloo on CPUs, NCCL on GPUs);
peak memory is each worker process's resident set, polled every 0.2 s with psutil.

SFT tokens/s = real tokens trained (TRL's num_tokens, all processes) / train_runtime. PPO tokens/s = response
tokens sampled and trained on / the iterations' time (generate + score + train + sync), first iteration excluded.
On a 2-core CPU two processes share the same two cores that one process uses with two threads, so the ratio shows
the cost of the distributed machinery more than a speed-up; on N GPUs each process has its own device.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.harness import cpu_flags, save  # noqa: E402

EX = ROOT / "examples" / "data"


def run_polled(cmd: list[str]) -> tuple[int, float, list[float]]:
    """(exit status, seconds, peak RSS in MiB of each python worker) of a command and its process tree."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peaks: dict[int, float] = {}
    stop = threading.Event()

    def poll() -> None:
        root = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    peaks[p.pid] = max(peaks.get(p.pid, 0.0), p.memory_info().rss / 2**20)
            time.sleep(0.2)

    t = threading.Thread(target=poll, daemon=True)
    t0 = time.perf_counter()
    t.start()
    _, err = proc.communicate()
    stop.set()
    t.join()
    if proc.returncode not in (0, 1):
        sys.stderr.write(err[-3000:])
    workers = sorted(peaks.values(), reverse=True)
    return proc.returncode, time.perf_counter() - t0, workers


def sft(work: Path, n: int, steps: int) -> dict:
    out = work / f"sft-{n}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "align", "sft", "--config", "configs/sft.yaml", f"output_dir={out}",
           f"data.train_file={EX / 'instructions_train.jsonl'}", "data.validation_file=null",
           "data.validation_fraction=0", "data.max_length=256", f"train.max_steps={steps}", "train.save_steps=1000",
           f"train.per_device_train_batch_size={8 // n}", "train.early_stopping_patience=null",
           "train.report_to=[none]", "lora.dropout=0", "--num-processes", str(n)]  # fmt: skip
    code, wall, rss = run_polled(cmd)
    log = json.loads((out / "metrics.json").read_text())["log_history"]
    summary = next(x for x in reversed(log) if "train_runtime" in x)
    tokens = max(x.get("num_tokens", 0) for x in log)
    return {
        "processes": n,
        "exit": code,
        "wall_s": round(wall, 1),
        "train_runtime_s": round(summary["train_runtime"], 1),
        "tokens": tokens,
        "tokens_per_s": round(tokens / summary["train_runtime"], 1),
        "peak_rss_mib_per_worker": [round(x) for x in rss[:n]],
        "losses": [x["loss"] for x in log if "loss" in x],
    }


def ppo(work: Path, n: int, steps: int, sft_dir: Path) -> dict:
    out = work / f"ppo-{n}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "align", "ppo", "--config", "configs/ppo.yaml", f"output_dir={out}",
           f"init_from={sft_dir}", f"gate_data={EX / 'instructions_validation.jsonl'}", "reward.artifact=null", "reward.rule={kind: contains, text: the}",
           "rollout.engine=generate", "rollout.max_new_tokens=24", f"train.steps={steps}",
           "train.rollout_batch_size=8", "train.mini_batch_size=4", "train.ppo_epochs=1", "train.save_steps=1000",
           "prompts.heldout_prompts=0", "lora.dropout=0", "train.report_to=[none]", "perplexity_gate.min_examples=5",
           "perplexity_gate.max_relative_increase=10.0", "--num-processes", str(n)]  # fmt: skip
    code, wall, rss = run_polled(cmd)
    hist = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    timed = hist[1:] or hist
    secs = sum(h["time_generate"] + h["time_score"] + h["time_train"] + h.get("time_sync", 0) for h in timed)
    tokens = sum(h["response_length"] * 8 for h in timed)
    return {
        "processes": n,
        "exit": code,
        "wall_s": round(wall, 1),
        "iteration_s": round(secs / len(timed), 2),
        "tokens_per_s": round(tokens / secs, 1),
        "peak_rss_mib_per_worker": [round(x) for x in rss[:n]],
        "reward_mean": [h["reward_mean"] for h in hist],
        "policy_loss": [h["policy_loss"] for h in hist],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--sft-steps", type=int, default=4)
    ap.add_argument("--ppo-steps", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/align-bench-scale"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale.json")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    import torch

    rows = {"sft": [], "ppo": []}
    for n in (1, a.processes):
        rows["sft"].append(sft(a.work, n, a.sft_steps))
        print(json.dumps(rows["sft"][-1]), flush=True)
    for n in (1, a.processes):
        rows["ppo"].append(ppo(a.work, n, a.ppo_steps, a.work / "sft-1"))
        print(json.dumps(rows["ppo"][-1]), flush=True)
    result = {
        "machine": {
            "cpus": psutil.cpu_count(),
            "cpu_flags": cpu_flags(),
            "gpus": torch.cuda.device_count(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        **rows,
        "ratio_tokens_per_s": {
            k: round(v[1]["tokens_per_s"] / v[0]["tokens_per_s"], 3) for k, v in rows.items() if len(v) == 2
        },
    }
    save(a.out, "scale", result)
    print(json.dumps(result["ratio_tokens_per_s"]))


if __name__ == "__main__":
    main()
