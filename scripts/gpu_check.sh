#!/usr/bin/env bash
# Issue 15's GPU check: run it first whenever a GPU is lent (the `device` tool), from the repository root or
# anywhere. It runs every gpu-marked test, the CUDA foreach kernel against the float64 loop, the host-sync
# count and bitwise restore, the precision measurements, fairseq fp16/amp/bf16 runs and the quick benchmark,
# then prints one table to paste into a note. Needs the project's environment (make install); set PYTHON to
# use another interpreter. Arguments go to scripts/gpu_check.py (--cpu-dry-run, --out FILE, --sections ...).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
echo "gpu_check.sh: $("$PYTHON" --version 2>&1) at $PYTHON; running scripts/gpu_check.py $*"
exec "$PYTHON" scripts/gpu_check.py "$@"
