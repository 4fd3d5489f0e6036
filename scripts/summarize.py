"""Table 5 (mean +- std over seeds, markdown + CSV) and validation curves (PNG) from IWSLT'14 runs.

A thin entry point over fairseq_asam/iwslt/summarize.py (paper Section 5.3, Table 5)::

    python scripts/summarize.py runs/iwslt14
    python scripts/summarize.py --grid runs/iwslt14-grid
"""

import sys

from fairseq_asam.iwslt.summarize import main

if __name__ == "__main__":
    sys.exit(main())
