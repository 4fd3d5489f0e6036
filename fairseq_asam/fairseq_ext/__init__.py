"""fairseq adapters: registered optimizers, the two-pass task, checkpoint loading.

Importing this package (``--user-dir fairseq_asam`` does) registers ``asam_adam``, ``sam_adam`` and
``translation_sam`` and allow-lists, for ``torch.load(weights_only=True)``, the classes fairseq checkpoints hold.
"""

from . import checkpoint, optimizer, task  # noqa: F401  (each registers on import)
from .task import SharpnessAwareTask, make_sharpness_aware  # noqa: F401

__all__ = ["SharpnessAwareTask", "make_sharpness_aware"]
