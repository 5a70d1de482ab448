#!/usr/bin/env bash
# The whole pipeline on the embedded default model (SmolLM2-135M-Instruct) and the bundled example data:
#   data -> SFT -> perplexity + bias gates -> preferences -> reward (+ gate) -> DPO (+ gates) -> PPO with vLLM (+ gates)
# Re-running skips finished stages and resumes an interrupted one. Extra arguments are pipeline overrides
# (e.g. run_dir=runs/mine). Exit 0 = every gate passed; 1 = a gate failed (see the report it names).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/align run --config configs/quickstart.yaml "$@"
RUN=$(.venv/bin/python - "$@" <<'PY'
import sys
from core.config import load_config
from data_schemas.config import PipelineConfig
print(load_config(PipelineConfig, "configs/quickstart.yaml", sys.argv[1:]).run_dir)
PY
)
echo "reports: $RUN/report.html (the run) and $RUN/gates/*/gate.html; TensorBoard: .venv/bin/tensorboard --logdir $RUN"
