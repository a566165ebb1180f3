#!/usr/bin/env bash
# Create (or reuse) the project virtualenv .venv and install megatron-slm into it, with _C built.
#   TORCH_SPEC   which torch to install when the venv has none (default: the CPU wheel the
#                project is tested with; set TORCH_SPEC=torch for the newest release).
#   EXTRAS       pip extras to install (default: test).
# Torch is installed first so that pip never resolves a (multi-GB CUDA) torch for the project.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
if [[ ! -x "$VENV/bin/python" ]]; then
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
stamp="$VENV/.megatron_slm_installed"
if [[ ! -f "$stamp" || setup.py -nt "$stamp" || -n "$(find csrc -newer "$stamp" -print -quit)" ]]; then
    "$PY" -m pip install -q --no-build-isolation -e ".[${EXTRAS:-test}]"
    touch "$stamp"
fi
"$PY" -c "import megatron_slm._extension as e; print(e.extension_status())"
