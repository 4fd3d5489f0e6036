"""IWSLT'14 DE-EN (paper Section 5.3, Table 5): preparation, training, BLEU evaluation, summaries.

Installed as console scripts (the shell scripts of the repository are thin wrappers over the same code)::

    asam-iwslt-prepare --tarball de-en.tgz          # bash data-prep/prepare-iwslt14.sh
    asam-iwslt-train asam 1                          # bash scripts/train-iwslt14.sh
    asam-iwslt-evaluate runs/iwslt14/asam-seed1      # bash scripts/evaluate-iwslt14.sh
    asam-iwslt-summarize runs/iwslt14                # python scripts/summarize.py
"""
