#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the test suite: unit + functional (multi-process CPU).
# GPU tests are skipped without CUDA; SLURM tests need root and Debian's slurm packages.
# Extra arguments go to pytest, e.g. `bash scripts/run_tests.sh tests/unit -k sidecar`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "${@:-tests}"
