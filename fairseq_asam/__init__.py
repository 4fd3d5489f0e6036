"""fairseq-asam: ASAM and SAM for fairseq (``--user-dir fairseq_asam``) and torchvision.

``from fairseq_asam import ASAM, SAM, Perturbation`` (and the BatchNorm helpers ``frozen_bn_stats``,
``recompute_bn_stats``) needs torch only and does not import fairseq.
The fairseq components (optimizers ``asam_adam``/``sam_adam``, the task ``translation_sam``, the
allow-list of the classes fairseq checkpoints hold for ``torch.load``) are registered as soon as
fairseq is imported: at once under ``fairseq-train --user-dir fairseq_asam`` (fairseq imports the
user dir itself), or when the program imports fairseq later. ``import fairseq_asam.fairseq_ext``
registers them explicitly.
"""

import importlib.abc as _abc
import importlib.util as _util
import sys as _sys
import warnings as _warnings

from ._compat import quiet_fairseq_import as _quiet_fairseq_import
from .batchnorm import frozen_bn_stats, recompute_bn_stats
from .core import ASAM, SAM, Perturbation

__all__ = ["ASAM", "SAM", "Perturbation", "frozen_bn_stats", "recompute_bn_stats"]
__version__ = "0.2.0"


class _RegisterWithFairseq(_abc.MetaPathFinder):
    """Registers the fairseq components right after fairseq itself is imported (once)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "fairseq":
            return None
        if self in _sys.meta_path:
            _sys.meta_path.remove(self)
        spec = _util.find_spec("fairseq")
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            with _quiet_fairseq_import():
                run(module)
            try:
                from . import fairseq_ext  # noqa: F401
            except Exception as e:  # fairseq imported, but our components cannot register: say so, go on
                _warnings.warn(f"fairseq_asam could not register its fairseq components: {e}", RuntimeWarning,
                               stacklevel=2)

        spec.loader.exec_module = exec_module
        return spec


if "fairseq" in _sys.modules:
    # The --user-dir path: fairseq is imported first, then the user dir.
    from . import fairseq_ext  # noqa: F401  (registers optimizers, tasks, checkpoint safe globals)
elif not any(isinstance(f, _RegisterWithFairseq) for f in _sys.meta_path):
    _sys.meta_path.insert(0, _RegisterWithFairseq())
