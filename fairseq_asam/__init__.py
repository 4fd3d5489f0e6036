"""fairseq-asam: ASAM and SAM for fairseq (``--user-dir fairseq_asam``) and torchvision.

``from fairseq_asam import SAM, ASAM`` needs torch only. When fairseq is installed, importing the
package also registers the fairseq components (optimizers ``asam_adam``/``sam_adam``, the task
``translation_sam``) and allow-lists the classes fairseq checkpoints hold for ``torch.load``.
"""

import logging as _logging
import sys as _sys

from .core import ASAM, SAM

__all__ = ["ASAM", "SAM"]


def _import_fairseq():
    """Import fairseq without letting it reconfigure the caller's logging.

    One of fairseq's modules (tasks/text_to_speech.py) calls ``logging.basicConfig(level=DEBUG)`` at
    import, which would flood a torchvision user's output with every library's debug messages. Under
    ``fairseq-train`` fairseq is imported before us and its logging setup stays as it is.
    """
    if "fairseq" in _sys.modules:
        return _sys.modules["fairseq"]
    import warnings

    root = _logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    guard = _logging.NullHandler()  # makes fairseq's basicConfig() a no-op
    root.addHandler(guard)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # fairseq's torch.jit.script deprecation notes
            import fairseq
    except ModuleNotFoundError:  # torch-only use: the core still works
        return None
    finally:
        root.setLevel(level)
        for h in root.handlers[:]:
            if h not in handlers:
                root.removeHandler(h)
    return fairseq


if _import_fairseq() is not None:
    from . import fairseq_ext  # noqa: F401  (registers optimizers, tasks, checkpoint safe globals)
