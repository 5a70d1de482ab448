#!/usr/bin/env bash
# The project's test command (README and .ci/run call this). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest -m "not slow" "$@"
