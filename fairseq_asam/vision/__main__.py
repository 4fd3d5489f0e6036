"""``python -m fairseq_asam.vision`` (also ``torchrun -m fairseq_asam.vision``): the same as asam-vision-train."""

import sys

from .train import cli_main

sys.exit(cli_main())
