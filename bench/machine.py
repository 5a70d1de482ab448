"""What the benchmarks record about the machine they ran on: the CPU's vector flags and the measured fp32 matmul
peak (the denominator of every MFU in bench/)."""

from __future__ import annotations

import time
from pathlib import Path

import torch


def cpu_flags() -> str:
    """The CPU's AVX/AMX flags, space-separated ('unknown' where /proc/cpuinfo cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next(line for line in text.splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    return " ".join(f for f in flags if f.startswith(("avx", "amx")))


def matmul_peak_gflops(n: int = 2048, reps: int = 10) -> float:
    """Measured fp32 matmul throughput of n x n products on this process's threads, GFLOP/s."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def parameter_counts(model_path) -> tuple[int, int]:
    """(all parameters, LM-head parameters) of a causal LM checkpoint; a head tied to the input embeddings is
    counted once in the first. MFU's model FLOPs split on them: the body runs on every token, the head on labelled
    ones (a reward model has no LM head: its body is the first minus the second)."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_path)
    return sum(p.numel() for p in m.parameters()), m.get_output_embeddings().weight.numel()
