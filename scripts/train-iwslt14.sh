#!/usr/bin/env bash
# Train one IWSLT'14 DE-EN run with the paper's settings (Section 5.3): METHOD in adam, sam, asam
# (and asam-onepass: ASAM with one pass per update along Adam's momentum, not in the paper).
# Thin shell over fairseq_asam/iwslt/train.py. Overrides: env DATA, RUNS, RUN_DIR, RHO, MAX_UPDATE,
# and any fairseq-train argument after METHOD [SEED] (it comes after the defaults, so it wins).
# Rerunning the same command resumes from RUN_DIR/checkpoints/checkpoint_last.pt.
#
#   bash scripts/train-iwslt14.sh asam 1
#   MAX_UPDATE=300 bash scripts/train-iwslt14.sh sam 2 --max-tokens 1024
set -euo pipefail
PYTHON="${PYTHON:-python}"
if [[ -x .venv/bin/python && "${PYTHON}" == python ]]; then PYTHON=.venv/bin/python; fi
exec "${PYTHON}" -m fairseq_asam.iwslt.train "$@"
