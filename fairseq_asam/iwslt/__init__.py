"""IWSLT'14 DE-EN (paper Section 5.3, Table 5): preparation, training, BLEU evaluation, summaries.

Installed as console scripts (the shell scripts of the repository are thin wrappers over the same code)::

    asam-iwslt-prepare --tarball de-en.tgz          # bash data-prep/prepare-iwslt14.sh
    asam-iwslt-train asam 1                          # bash scripts/train-iwslt14.sh
    asam-iwslt-evaluate runs/iwslt14/asam-seed1      # bash scripts/evaluate-iwslt14.sh
    asam-iwslt-summarize runs/iwslt14                # python scripts/summarize.py

The same tools for other corpora (:mod:`.corpora`: Multi30k DE-EN, any parallel text), under names that say so
(the IWSLT names keep working)::

    asam-mt-prepare --corpus multi30k --from-dir ../shared/data/multi30k   # or without --from-dir: download
    asam-mt-prepare --corpus text --train c/train --valid c/dev --test c/test --src de --tgt en
    asam-mt-prepare --corpus iwslt14 --tarball de-en.tgz                 # = asam-iwslt-prepare
    asam-mt-train / asam-mt-evaluate / asam-mt-summarize                 # = asam-iwslt-train / -evaluate / -summarize
"""
