#!/usr/bin/env bash
# BLEU of one run: fairseq-generate (beam 5, remove BPE) on valid and test, tokenized BLEU (the paper's
# number) and detokenized sacreBLEU with its signature, written to RUN_DIR/eval.json.
# Thin shell over fairseq_asam/iwslt/evaluate.py (--help lists the options).
#
#   bash scripts/evaluate-iwslt14.sh runs/iwslt14/asam-seed1
set -euo pipefail
if [[ $# -lt 1 ]]; then
    echo "usage: bash scripts/evaluate-iwslt14.sh RUN_DIR [--checkpoint checkpoint_last.pt] [--subsets valid,test]" >&2
    exit 2
fi
PYTHON="${PYTHON:-python}"
if [[ -x .venv/bin/python && "${PYTHON}" == python ]]; then PYTHON=.venv/bin/python; fi
exec "${PYTHON}" -m fairseq_asam.iwslt.evaluate "$@"
