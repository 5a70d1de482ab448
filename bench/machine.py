"""What the benchmarks record about the machine they ran on: the CPU's vector flags and the measured fp32 matmul
peak (the denominator of every MFU in bench/)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

# Environment variables that cap the instruction set torch's own kernels, oneDNN and MKL dispatch to
# (scripts/avx2.sh sets all three to run an AVX-512 machine's kernels as an AVX2-only one would).
ISA_LIMITS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def cpu_flags() -> str:
    """The CPU's AVX/AMX flags, space-separated ('unknown' where /proc/cpuinfo cannot be read), followed by any
    instruction-set cap in force (ISA_LIMITS), so a result taken under scripts/avx2.sh says so."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = " ".join(
            f
            for f in next(line for line in text.splitlines() if line.startswith("flags")).split()
            if f.startswith(("avx", "amx"))
        )
    except (OSError, StopIteration):
        flags = "unknown"
    caps = [f"{k}={os.environ[k]}" for k in ISA_LIMITS if os.environ.get(k)]
    return flags + (f" (kernels capped: {' '.join(caps)})" if caps else "")


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
