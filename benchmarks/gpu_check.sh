#!/usr/bin/env bash
# The GPU checks, unattended, in under 10 minutes on one GPU; the numbers go to one JSON (benchmarks/gpu_check.py).
#   benchmarks/gpu_check.sh                          # CUDA, full sizes, writes gpu_check.json
#   benchmarks/gpu_check.sh --device cpu --tiny      # every code path on the CPU in seconds
#   benchmarks/gpu_check.sh --out runs/gpu.json
# Exits non-zero when any check fails (or the run passes 10 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
exec timeout 590 "$python" -m benchmarks.gpu_check "$@"
