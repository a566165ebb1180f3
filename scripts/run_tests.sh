#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the test suite: unit + functional (multi-process CPU).
# GPU tests are skipped without CUDA; SLURM tests need root and Debian's slurm packages.
# Extra arguments go to pytest, e.g. `bash scripts/run_tests.sh tests/unit -k sidecar`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Most tests run one process at a time (a trainer, a tool, a server starting), so one pytest
# worker per core (pytest-xdist) roughly halves the wall time; a test file stays on one worker, so
# its module-scoped fixtures (trained tiny models) are built once. PYTEST_WORKERS=0: serial.
# The 30 slowest setups and tests are listed at the end: what keeps the suite near its budget.
exec .venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-auto}" --dist loadfile --durations=30 \
    "${@:-tests}"
