"""Attention over packed batches: dense block-diagonal mask vs align's per-sequence SDPA vs flex_attention.

    .venv/bin/python bench/attention.py [--iters 4] [--batch 8] [--kernels sdpa_dense sdpa_segments flex]

One training micro-batch as `align sft` builds it (SmolLM2-135M-Instruct with the shipped LoRA, real
self-instruct conversations rendered with the chat template, `--batch` examples packed), forward + backward,
timed per kernel, each in its own process so that its peak memory (max RSS) is its own:
  sdpa_dense     transformers' sdpa with a 4-D block-diagonal mask, rows of at most 1024 tokens (align before)
  sdpa_segments  core/attention.py: SDPA with is_causal per sequence, one row, no mask (align now)
  flex           transformers' flex_attention with a document BlockMask, one row (torch.compile'd kernel)
Before timing, each kernel's per-token log-probabilities are checked against the same examples run one by one.
MFU = 4 x params x real tokens / time / measured fp32 matmul peak (LoRA: forward 2NT + backward through frozen
weights 2NT), the same definition as bench/sft_throughput.py. Results: bench/results/attention.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from harness import cpu_flags, matmul_peak_gflops, save  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "self_instruct_seed_tasks.jsonl"
KERNELS = ("sdpa_dense", "sdpa_segments", "flex")


def examples(n: int) -> list[dict]:
    from core.chat import render
    from core.models import load_tokenizer
    from core.readers import load_instructions
    from data_schemas.config import ModelConfig

    path = DATA if DATA.exists() else ROOT / "examples" / "data" / "instructions_train.jsonl"
    convs, _ = load_instructions(path)
    tok = load_tokenizer(ModelConfig())
    rows = []
    for c in convs[:n]:
        r = render(tok, [m.model_dump() for m in c.messages], 512)
        rows.append({"input_ids": r.input_ids, "labels": r.labels})
    return rows


def batch_for(kernel: str, rows: list[dict]) -> dict:
    from stages.sft import PaddingFreeCollator

    b = PaddingFreeCollator(0, max_row_tokens=1024, dense_mask=kernel == "sdpa_dense")(rows)
    b.pop("num_real_tokens")
    if kernel == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        pos = b["position_ids"][0]
        doc = torch.cumsum(pos == 0, 0)

        def document_causal(bi, h, q, kv):
            return (doc[q] == doc[kv]) & (q >= kv)

        n = pos.numel()
        b["attention_mask"] = create_block_mask(document_causal, 1, None, n, n, device="cpu")
    return b


def per_token_logprobs(model, batch) -> torch.Tensor:
    out = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    return out.log_softmax(-1)[keep].gather(-1, labels[keep][:, None])[:, 0]


def run_one(kernel: str, n_examples: int, iters: int, lora_dropout: float = 0.0) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import core.attention  # noqa: F401 (registers sdpa_segments)
    from core.models import resolve_model_path

    path = resolve_model_path("smollm2-135m-instruct")
    impl = {"sdpa_dense": "sdpa", "sdpa_segments": "sdpa_segments", "flex": "flex_attention"}[kernel]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=impl)
    n_params = sum(p.numel() for p in model.parameters())
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(
        model,
        LoraConfig(
            r=16, lora_alpha=32, lora_dropout=lora_dropout, target_modules=targets, task_type="CAUSAL_LM"
        ),
    )
    rows = examples(n_examples)
    batch = batch_for(kernel, rows)
    real = sum(len(r["input_ids"]) for r in rows)
    # correctness first: the packed log-probs equal the examples' own, one at a time
    model.eval()
    with torch.no_grad():
        packed = per_token_logprobs(model, batch)
        alone = torch.cat([per_token_logprobs(model, batch_for(kernel, [r])) for r in rows])
    # dense rows are filled longest-first, so compare the tokens' log-probs as sorted multisets
    err = float((packed.sort().values - alone.sort().values).abs().max())
    model.train()
    times, t_first = [], None
    for i in range(iters + 1):
        t = time.perf_counter()
        loss = -per_token_logprobs(model, batch).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t
        if i == 0:
            t_first = dt  # includes compilation for flex
        else:
            times.append(dt)
    sec = sum(times) / len(times)
    return {
        "kernel": kernel,
        "rows": list(batch["input_ids"].shape),
        "real_tokens": real,
        "max_abs_logprob_error_vs_one_by_one": err,
        "first_step_s": t_first,
        "sec_per_step": sec,
        "real_tokens_per_s": real / sec,
        "n_params": n_params,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=KERNELS)
    ap.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout (align's default is 0)")
    ap.add_argument("--one", choices=KERNELS, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(run_one(a.one, a.batch[0], a.iters, a.lora_dropout)), flush=True)
        return
    peak = matmul_peak_gflops()
    flags = cpu_flags()
    print(
        f"threads {torch.get_num_threads()}, fp32 matmul peak {peak:.1f} GFLOP/s, cpu flags: {flags}",
        flush=True,
    )
    results = []
    for n in a.batch:
        for k in a.kernels:
            cmd = [sys.executable, __file__, "--one", k, "--batch", str(n), "--iters", str(a.iters)]
            cmd += ["--lora-dropout", str(a.lora_dropout)]
            p = subprocess.run(
                cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}
            )
            line = next((x for x in reversed(p.stdout.splitlines()) if x.startswith("{")), None)
            if p.returncode != 0 or line is None:
                lines = p.stderr.strip().splitlines() or ["no output"]
                err = next((x for x in reversed(lines) if "Error:" in x), lines[-1]).strip()
                results.append({"kernel": k, "batch": n, "error": err})
                print(f"{k} batch {n}: failed: {err}", flush=True)
                continue
            r = {"batch": n, **json.loads(line)}
            r["mfu"] = 4 * r["n_params"] * r["real_tokens_per_s"] / (peak * 1e9)
            results.append(r)
            print(json.dumps(r), flush=True)
    print(
        "\n| batch | kernel | rows x width | s/step | real tokens/s | vs dense | MFU | peak RSS | max logprob error |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for n in a.batch:
        dense = next(
            (r for r in results if r["batch"] == n and r["kernel"] == "sdpa_dense" and "error" not in r), None
        )
        for r in (r for r in results if r["batch"] == n):
            if "error" in r:
                print(f"| {n} | {r['kernel']} | failed: {r['error'][:80]} | | | | | | |")
                continue
            ratio = f"{r['real_tokens_per_s'] / dense['real_tokens_per_s']:.2f}x" if dense else "-"
            print(
                f"| {n} | {r['kernel']} | {r['rows'][0]} x {r['rows'][1]} | {r['sec_per_step']:.2f} | "
                f"{r['real_tokens_per_s']:.0f} | {ratio} | {100 * r['mfu']:.1f}% | {r['peak_rss_gib']:.2f} GiB | "
                f"{r['max_abs_logprob_error_vs_one_by_one']:.1e} |"
            )
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    save(None, "attention", {"peak_gflops": peak, "cpu_flags": flags, "threads": torch.get_num_threads(),
                             "results": results})  # fmt: skip


if __name__ == "__main__":
    main()
