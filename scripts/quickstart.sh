#!/usr/bin/env bash
# The main job on the embedded default model and the bundled example data:
#   1. align sft  (LoRA on SmolLM2-135M-Instruct, ~2 minutes on 2 CPU cores)
#   2. align eval perplexity on the validation split
#   3. the perplexity gate: the SFT model must not be worse than its base on held-out data
# Re-running resumes an interrupted SFT and skips a completed one. Extra arguments are SFT overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN_DIR:-runs/quickstart}
VAL=examples/data/instructions_validation.jsonl
ALIGN=.venv/bin/align
resume=()
[ -f "$RUN/sft/manifest.json" ] && resume=(--resume)
$ALIGN sft --config configs/sft.yaml "output_dir=$RUN/sft" "${resume[@]}" "$@"
$ALIGN eval perplexity --model "$RUN/sft" --data "$VAL"
$ALIGN eval gate perplexity --candidate "$RUN/sft" --parent smollm2-135m-instruct --data "$VAL" \
  --out "$RUN/gates/sft-perplexity" --config configs/gates.yaml
echo "quickstart done: artifact $RUN/sft, gate report $RUN/gates/sft-perplexity/gate.md"
echo "TensorBoard: .venv/bin/tensorboard --logdir $RUN/sft/logs"
