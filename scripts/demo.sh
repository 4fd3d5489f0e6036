#!/usr/bin/env bash
# make demo: the IWSLT'14 pipeline (prepare, train Adam / Adam+SAM / Adam+ASAM / ASAM one-pass, BLEU, update
# cost, adaptive sharpness, Table 5 and plot) on the synthetic German-English corpus in data-prep/demo-de-en;
# CPU only, no download, minutes on 2 cores.
# Thin shell over scripts/demo.py; outputs in demo-out/ (a rerun reuses finished steps).
#
#   make demo
#   bash scripts/demo.sh --max-update 60      # quicker, lower BLEU
set -euo pipefail
PYTHON="${PYTHON:-python}"
if [[ -x .venv/bin/python && "${PYTHON}" == python ]]; then PYTHON=.venv/bin/python; fi
# scripts/ is a package of the repository, not of the installed library: the repository root goes on
# the path so that `-m scripts.demo` finds it from any working directory.
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${repo}${PYTHONPATH:+:${PYTHONPATH}}"
echo "[demo] fairseq-asam demo: synthetic DE-EN corpus -> prepare -> Adam / SAM / ASAM / ASAM one-pass -> BLEU, cost, sharpness -> demo-out/table5.md"
exec "${PYTHON}" -W ignore -m scripts.demo "$@"
