"""Importing the package: no fairseq for torch-only users; registration as soon as fairseq is imported;
the caller's logging left alone."""

import subprocess
import sys

import pytest

REGISTERED = """
from fairseq.optim import OPTIMIZER_REGISTRY
from fairseq.tasks import TASK_REGISTRY
import torch
assert {"asam_adam", "sam_adam"} <= set(OPTIMIZER_REGISTRY), sorted(OPTIMIZER_REGISTRY)
assert "translation_sam" in TASK_REGISTRY
import sys
assert "fairseq_asam.fairseq_ext.checkpoint" in sys.modules  # imported (and so registered) at import, not below
from fairseq_asam.fairseq_ext.checkpoint import SAFE_GLOBALS
missing = [g for g in SAFE_GLOBALS if g not in torch.serialization.get_safe_globals()]  # the checkpoint allow-list
assert not missing, missing
"""

CASES = {
    # a torch-only user: fairseq is not imported, then importing it later registers everything
    "torch-only, fairseq later": """
import logging, sys
root = logging.getLogger()
before = (root.level, list(root.handlers))
from fairseq_asam import ASAM, SAM, Perturbation
assert "fairseq" not in sys.modules, "from fairseq_asam import ASAM imported fairseq"
import fairseq_asam.integrations
assert "transformers" not in sys.modules and "accelerate" not in sys.modules, "fairseq_asam imported transformers"
assert "pytorch_lightning" not in sys.modules and "lightning" not in sys.modules, "fairseq_asam imported lightning"
import fairseq
assert (root.level, list(root.handlers)) == before, (root.level, root.handlers)
""" + REGISTERED,
    # the --user-dir path: fairseq first, then the package
    "fairseq first (--user-dir)": "import fairseq\nimport fairseq_asam\n" + REGISTERED,
    # explicit registration without importing fairseq by hand
    "explicit fairseq_ext": """
import logging
root = logging.getLogger()
before = (root.level, list(root.handlers))
import fairseq_asam.fairseq_ext
assert (root.level, list(root.handlers)) == before, (root.level, root.handlers)
""" + REGISTERED,
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_import_paths(name):
    out = subprocess.run([sys.executable, "-c", CASES[name] + "\nprint('ok')"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
    if not name.startswith("fairseq first"):  # fairseq imported by the program itself logs as it likes
        assert "DEBUG" not in out.stderr and "tensorboardX" not in out.stderr


@pytest.mark.slow
def test_fairseq_user_dir_after_the_package_was_imported(tmp_path):
    """A program that imported fairseq_asam (torch only) and then runs fairseq's --user-dir import."""
    code = """
import argparse, os, sys
import fairseq_asam
from fairseq import utils
utils.import_user_module(argparse.Namespace(user_dir=os.path.dirname(fairseq_asam.__file__)))
from fairseq.optim import OPTIMIZER_REGISTRY
assert "asam_adam" in OPTIMIZER_REGISTRY
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
