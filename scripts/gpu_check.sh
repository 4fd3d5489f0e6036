#!/usr/bin/env bash
# Issue 15's GPU check: run it first whenever a GPU is lent (the `device` tool), from the repository root or
# anywhere. It runs every gpu-marked test, the CUDA foreach kernel against the float64 loop, the host-sync
# count and bitwise restore, the precision measurements, fairseq fp16/amp/bf16 runs, the Hugging Face Trainer
# under FSDP2 against one unsharded process and the quick benchmark,
# then prints one table to paste into a note. Needs the project's environment (make install); set PYTHON to
# use another interpreter. Arguments go to scripts/gpu_check.py (--cpu-dry-run, --out FILE, --sections ...).
#
# On a lent machine whose image has torch but not this project's dependencies (the H200 image, Python 3.12:
# no fairseq, hydra-core, omegaconf, antlr4-python3-runtime, bitarray), carry them and install them first,
# as /work/.library/device/README.md describes for wheels: cp312 manylinux wheels of bitarray, hydra-core
# 1.3.2 and omegaconf 2.3.0 (pure Python), the antlr4-python3-runtime 4.9.3 and fairseq-fixed 0.12.3.1
# sdists (fairseq's Cython/C++ extensions build there: `pip install --no-deps --no-build-isolation`). The
# first table row says which imports failed.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
echo "gpu_check.sh: $("$PYTHON" --version 2>&1) at $PYTHON; running scripts/gpu_check.py $*"
exec "$PYTHON" scripts/gpu_check.py "$@"
