"""Importing the package: registers the fairseq components, leaves the caller's logging alone."""

import subprocess
import sys

CODE = """
import logging
root = logging.getLogger()
before = (root.level, list(root.handlers))
import fairseq_asam
from fairseq.optim import OPTIMIZER_REGISTRY
from fairseq.tasks import TASK_REGISTRY
assert (root.level, list(root.handlers)) == before, (root.level, root.handlers)
assert {"asam_adam", "sam_adam"} <= set(OPTIMIZER_REGISTRY), sorted(OPTIMIZER_REGISTRY)
assert "translation_sam" in TASK_REGISTRY
print("ok")
"""


def test_import_registers_and_keeps_logging():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
    assert "DEBUG" not in out.stderr and "tensorboardX" not in out.stderr
