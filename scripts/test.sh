#!/usr/bin/env bash
# The project's test command (README and .ci/run call this). Extra arguments go to pytest.
# With two cores or more the suite runs on two pytest-xdist workers: each test file runs whole on one worker (the
# files that share the real-model artifacts together; tests/conftest.py), and each worker's torch gets its share of
# the cores. ALIGN_TEST_WORKERS=N picks the number of workers; 0 runs everything in this one process.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
CORES=$(nproc 2>/dev/null || echo 1)
WORKERS=${ALIGN_TEST_WORKERS:-$((CORES >= 2 ? 2 : 0))}
if ! [[ "$WORKERS" =~ ^[0-9]+$ ]]; then
  echo "scripts/test.sh: ALIGN_TEST_WORKERS=$WORKERS is not a number of workers (0 runs the tests in one process)" >&2
  exit 2
fi
PARALLEL=()
if [ "$WORKERS" -gt 0 ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((CORES / WORKERS > 0 ? CORES / WORKERS : 1))}
  PARALLEL=(-n "$WORKERS" --dist loadfile)
fi
exec .venv/bin/python -m pytest -m "not slow" ${PARALLEL[@]+"${PARALLEL[@]}"} "$@"
