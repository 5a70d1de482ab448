#!/usr/bin/env bash
# Run a command as on an AVX2-only CPU: torch's own kernels, oneDNN and MKL are capped at AVX2, so a machine with
# AVX-512 (or AVX512-BF16/AMX) runs the code paths an AVX2-only one would. The clock, caches and memory stay this
# machine's, and kernels compiled elsewhere (vLLM's CPU ops) are not capped: a stand-in, not the machine itself.
# bench/machine.cpu_flags records the caps with every result.
#
#   bash scripts/avx2.sh .venv/bin/python bench/sft_throughput.py
#   bash scripts/avx2.sh bash scripts/test.sh
set -euo pipefail
export ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
exec "$@"
