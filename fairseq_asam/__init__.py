"""fairseq-asam: ASAM and SAM for fairseq (``--user-dir fairseq_asam``) and torchvision.

``from fairseq_asam import SAM, ASAM`` needs torch only. When fairseq is installed, importing the
package also registers the fairseq components (optimizers ``asam_adam``/``sam_adam``, the task
``translation_sam``) and allow-lists the classes fairseq checkpoints hold for ``torch.load``.
"""

from .core import ASAM, SAM

__all__ = ["ASAM", "SAM"]

try:
    import fairseq  # noqa: F401
except ModuleNotFoundError:  # torch-only use: the core still works
    fairseq = None

if fairseq is not None:
    from . import fairseq_ext  # noqa: F401  (registers optimizers, tasks, checkpoint safe globals)
