#!/usr/bin/env bash
# Wheels and files for scripts/gpu_check.py on a GPU machine that reaches no package index (the lent H100/H200
# image has torch, transformers, accelerate, peft, pyyaml, rich, pyarrow, pandas, jinja2 and matplotlib; not trl,
# datasets and their small pure-Python needs, pydantic): downloaded here, where pip reaches PyPI, for CPython 3.12 on
# x86-64 Linux, into .whl/ (about 12 MB); the tokenizer folder into .gpu/. Both are ignored by git (.git/info/exclude)
# and travel with the device call's `carry: [".whl", ".gpu"]`. There:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:.
#   python3 scripts/gpu_check.py --tokenizer .gpu/tiny-random-llama --out $OUT/gpu_check.json
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >> .git/info/exclude
rm -rf .whl && mkdir -p .whl .gpu
version() { $PY -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
# the versions this checkout runs with (pyproject.toml pins most), so the GPU runs the code the CPU tests ran
PKGS=()
for p in trl datasets dill multiprocess xxhash pydantic pydantic-core annotated-types typing-inspection; do
  PKGS+=("$p==$(version "$p")")
done
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${PKGS[@]}"
# the tokenizer of align's tiny-random-llama (built here from the PyPI model on first use)
TOK=$($PY -c "from core.models import resolve_model_path; print(resolve_model_path('tiny-random-llama'))")
rm -rf .gpu/tiny-random-llama && mkdir -p .gpu/tiny-random-llama
cp "$TOK"/tokenizer* "$TOK"/chat_template.jinja .gpu/tiny-random-llama/  # the tokenizer only (3.4 MB)
du -sh .whl .gpu
