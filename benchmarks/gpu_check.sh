#!/usr/bin/env bash
# One command on a fresh GPU machine, from the repository root: install, then benchmarks/gpu_check.py (training
# speed per shape, resume, SIGTERM, DDP, every analysis on CUDA against the CPU).  Extra arguments go to it, e.g.
#   bash benchmarks/gpu_check.sh                      # CUDA, 300 timed steps per shape
#   bash benchmarks/gpu_check.sh --device cpu --quick  # the CI form
set -euo pipefail
PYTHON=${PYTHON:-python3}
# a GPU image ships its own CUDA build of torch: keep it, and install only this package (and what it lacks)
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet torch
fi
"$PYTHON" -m pip install --quiet -e .
exec timeout 480 "$PYTHON" benchmarks/gpu_check.py "$@"
