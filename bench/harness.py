"""The one harness every benchmark in bench/ records through: what machine ran it, the command that reproduces
it, when, and its figures, in one result schema (bench/README.md).

    {"benchmark": "sft_throughput",                        # the script's name (bench/<name>.py)
     "command": ".venv/bin/python bench/sft_throughput.py --steps 8",
     "date": "2026-12-07",                                  # UTC, when the run finished
     "machine": {"cpu": "...", "flags": "avx2 avx512f ...", "threads": 2, "python": "3.11.7", "torch": "2.13.0",
                 "matmul_peak_gflops": 84.1},              # the peak only where MFU is reported
     "metrics": {"ratio": 2.1, ...},                        # the headline figures: numbers only
     "details": {...}}                                      # everything else the run measured

Compare only ratios measured in one run: CPUs differ from machine to machine (the flags say how).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
KEYS = ("benchmark", "command", "date", "machine", "metrics", "details")

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


def cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        return next(
            line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")
        )
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def matmul_peak_gflops(n: int = 2048, reps: int = 10) -> float:
    """Measured fp32 matmul throughput of n x n products on this process's threads, GFLOP/s."""
    import torch

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


def machine(peak_gflops: float | None = None) -> dict[str, Any]:
    """This machine, as every result records it."""
    import torch

    out: dict[str, Any] = {
        "cpu": cpu_name(),
        "flags": cpu_flags(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    if peak_gflops is not None:
        out["matmul_peak_gflops"] = peak_gflops
    return out


def scalars(d: dict[str, Any]) -> dict[str, float]:
    """The top-level numbers of a result (its headline figures)."""
    return {k: v for k, v in d.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def command() -> str:
    """The command that ran this benchmark, as typed from the repository root."""
    script = Path(sys.argv[0]).resolve()
    if script.is_relative_to(ROOT):
        script = script.relative_to(ROOT)
    return " ".join([".venv/bin/python", str(script), *sys.argv[1:]])


def write_result(
    out: Path | str | None,
    name: str,
    metrics: dict[str, Any],
    details: dict[str, Any],
    peak_gflops: float | None = None,
    machine_info: dict[str, Any] | None = None,
) -> Path:
    """Write one result in the schema (to `out`, default bench/results/<name>.json) and return its path."""
    record = {
        "benchmark": name,
        "command": command(),
        "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
        "machine": machine_info if machine_info is not None else machine(peak_gflops),
        "metrics": metrics,
        "details": details,
    }
    problems = check(record)
    if problems:
        raise ValueError("; ".join(problems))
    path = Path(out) if out is not None else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def check(record: Any) -> list[str]:
    """What is wrong with a result against the schema (empty: nothing)."""
    if not isinstance(record, dict):
        return ["not a JSON object"]
    problems = [f"{k}: missing" for k in KEYS if k not in record]
    problems += [f"{k}: not in the schema" for k in record if k not in KEYS]
    for k in ("benchmark", "command", "date"):
        if k in record and not (isinstance(record[k], str) and record[k]):
            problems.append(f"{k}: must be a non-empty string")
    if isinstance(record.get("date"), str):
        try:
            datetime.date.fromisoformat(record["date"])
        except ValueError:
            problems.append("date: must be YYYY-MM-DD")
    for k in ("machine", "details"):
        if k in record and not isinstance(record[k], dict):
            problems.append(f"{k}: must be an object")
    m = record.get("metrics")
    if not isinstance(m, dict):
        problems.append("metrics: must be an object of numbers")
    else:
        problems += [
            f"metrics.{k}: must be a number"
            for k, v in m.items()
            if v is not None and (not isinstance(v, int | float) or isinstance(v, bool))
        ]
    return problems


def save(out: Path | str | None, name: str, result: dict[str, Any]) -> Path:
    """A benchmark's whole result dict, recorded in the schema: what it says of the machine (`machine`,
    `cpu_flags`, `peak_gflops`) goes under machine beside what the harness measures itself, its top-level numbers
    become the metrics, and the rest the details."""
    result = dict(result)
    recorded = dict(result.pop("machine", None) or {})
    if "cpu_flags" in result:
        recorded.setdefault("flags", result.pop("cpu_flags"))
    peak = result.pop("peak_gflops", None)
    if peak is not None:
        recorded.setdefault("matmul_peak_gflops", peak)
    if "cpu_flags" in recorded:
        recorded.setdefault("flags", recorded.pop("cpu_flags"))
    info = {**machine(), **recorded}
    return write_result(out, name, scalars(result), result, machine_info=info)


def peaked_llama(folder: Path, tokenizer_path: Path | str, **shape) -> Path:
    """A random tiny Llama with large initial weights saved with the tokenizer at `tokenizer_path` as a plain
    checkpoint folder: its next-token distributions are peaked (entropy ~2-3 nats), like a trained model's, unlike
    the near-uniform tiny-random-llama. `shape` overrides the LlamaConfig sizes (hidden 128, MLP 256, 2 layers by
    default). The toy policy of the PPO tests and bench/rl_estimators.py, and the checkpoint of the any-start tests."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    sizes = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, **shape}
    cfg = LlamaConfig(
        vocab_size=len(tok), num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
        initializer_range=0.5, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, **sizes,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return Path(folder)


def random_llama(folder: Path | str, tokenizer: Path | str, layers: int) -> int:
    """A random Llama (hidden 1024, MLP 2816, 16 heads, 4 KV heads, `layers` layers, tied embeddings, seed 0) with the
    tokenizer at `tokenizer`, saved to `folder` as a plain transformers checkpoint; returns its parameter count.
    Big enough that training state, not the runtime, is most of a process's memory (12 layers: 170M parameters,
    24: 321M). Used by bench/sharding.py, scripts/gpu_check.py and the capped tests (tests/conftest.py)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=True, initializer_range=0.05,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())
