"""IWSLT'14 DE-EN (paper Section 5.3, Table 5): preparation, training, BLEU evaluation, summaries, demo corpus.

    bash data-prep/prepare-iwslt14.sh --tarball de-en.tgz
    bash scripts/train-iwslt14.sh asam 1
    bash scripts/evaluate-iwslt14.sh runs/iwslt14/asam-seed1
    python scripts/summarize.py runs/iwslt14
"""
