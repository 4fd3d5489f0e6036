"""fairseq adapters: registered optimizers, the two-pass task, checkpoint loading.

Importing this package (``--user-dir fairseq_asam`` does) registers ``asam_adam``, ``sam_adam`` and
``translation_sam`` and allow-lists, for ``torch.load(weights_only=True)``, the classes fairseq checkpoints hold.
"""

import sys as _sys

from .._compat import quiet_fairseq_import as _quiet_fairseq_import

if "fairseq" not in _sys.modules:
    with _quiet_fairseq_import():
        import fairseq  # noqa: F401

from . import checkpoint, optimizer, task  # noqa: E402,F401  (each registers on import)
from .task import SharpnessAwareTask, make_sharpness_aware  # noqa: E402,F401

__all__ = ["SharpnessAwareTask", "make_sharpness_aware"]
