#!/usr/bin/env bash
# IWSLT'14 DE-EN for fairseq, as fairseq's examples/translation/prepare-iwslt14.sh prepares it
# (paper Section 5.3): download or --tarball, tokenize, clean, lowercase, split, joint BPE, binarize.
# A thin shell over fairseq_asam/iwslt/prepare.py; all options are passed through (--help lists them).
#
#   bash data-prep/prepare-iwslt14.sh --tarball ~/Downloads/de-en.tgz
#   bash data-prep/prepare-iwslt14.sh --bpe sentencepiece --dest data-bin/iwslt14.spm.de-en --work-dir data-bin/iwslt14-prep-spm
set -euo pipefail
PYTHON="${PYTHON:-python}"
if [[ -x .venv/bin/python && "${PYTHON}" == python ]]; then PYTHON=.venv/bin/python; fi
exec "${PYTHON}" -m fairseq_asam.iwslt.prepare "$@"
