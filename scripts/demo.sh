#!/usr/bin/env bash
# make demo: the IWSLT'14 pipeline (prepare, train Adam / Adam+SAM / Adam+ASAM, BLEU, Table 5 and plot)
# on the embedded synthetic German-English corpus; CPU only, no download, about 10 minutes on 2 cores.
# Thin shell over fairseq_asam/iwslt/demo.py; outputs in demo-out/ (a rerun reuses finished steps).
#
#   make demo
#   bash scripts/demo.sh --max-update 60      # quicker, lower BLEU
set -euo pipefail
PYTHON="${PYTHON:-python}"
if [[ -x .venv/bin/python && "${PYTHON}" == python ]]; then PYTHON=.venv/bin/python; fi
echo "[demo] fairseq-asam demo: synthetic DE-EN corpus -> prepare -> Adam / SAM / ASAM -> BLEU -> demo-out/table5.md"
exec "${PYTHON}" -W ignore -m fairseq_asam.iwslt.demo "$@"
