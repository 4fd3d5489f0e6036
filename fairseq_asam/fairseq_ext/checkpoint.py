"""Let ``torch.load(weights_only=True)`` (torch >= 2.6's default) read fairseq checkpoints, and nothing else.

fairseq saves checkpoints with plain ``torch.save`` and loads them with plain ``torch.load``
(``fairseq.checkpoint_utils.load_checkpoint_to_cpu``), so with torch >= 2.6 resuming a run and
``fairseq-generate`` fail with "Weights only load failed". Importing this module (``--user-dir
fairseq_asam`` does, on every rank) adds exactly the globals fairseq checkpoints hold to torch's
allow-list; ``weights_only`` stays on, so a checkpoint that pickles any other global (``os.system``, a
custom class, ...) is still refused. What each entry is for:

- ``argparse.Namespace``: the model config of architectures registered with
  ``register_model_architecture`` (``cfg["model"]``), and the legacy ``args``;
- numpy ``ndarray``/``dtype`` (and the int64/float64 dtype classes)/``_reconstruct``: the BLEU n-gram counts that ``--eval-bleu`` keeps in the
  saved metrics (``extra_state["metrics"]``);
- on ranks > 0 of a distributed resume, rank 0 sends the checkpoint it loaded with its tensors replaced
  by ``fairseq.distributed.utils._TensorPlaceholder`` and its config turned into an omegaconf
  ``DictConfig``, and fairseq unpickles that with ``torch.load`` (``distributed_utils.broadcast_object``):
  ``DictConfig``, ``ListConfig``, ``ContainerMetadata``, ``Metadata``, ``AnyNode``, ``typing.Any`` and the
  types their metadata names (``dict``, ``int``, ``list``, ``collections.defaultdict``).

The list is checked against real checkpoints by ``tests/test_fairseq_checkpoint.py``. Example::

    python -c "import fairseq_asam.fairseq_ext, torch; print(torch.serialization.get_safe_globals())"
"""

import argparse
import collections
import typing

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig
from omegaconf.base import ContainerMetadata, Metadata
from omegaconf.nodes import AnyNode

from .. import _compat

__all__ = ["SAFE_GLOBALS", "allow_fairseq_checkpoints"]


# numpy >= 1.25 rebuilds a dtype as an instance of its own class (numpy.dtypes.Int64DType, ...): the BLEU
# counts are int64 arrays, and float64 is what a meter averaging them holds.
_NUMPY_DTYPES = [type(np.dtype(np.int64)), type(np.dtype(np.float64))]

SAFE_GLOBALS = [
    argparse.Namespace,
    np.ndarray,
    np.dtype,
    *[t for t in _NUMPY_DTYPES if t is not np.dtype],
    *_compat.numpy_reconstruct(),
    # Rank 0 of a distributed resume sends the checkpoint after load_checkpoint_to_cpu turned its
    # config into an omegaconf DictConfig (allow_objects, every value an AnyNode); a DictConfig pickles
    # its metadata, which names these types and the builtins dict/int/list and defaultdict.
    _compat.tensor_placeholder_class(),
    DictConfig,
    ListConfig,
    ContainerMetadata,
    Metadata,
    AnyNode,
    typing.Any,
    dict,
    int,
    list,
    collections.defaultdict,
]


def allow_fairseq_checkpoints() -> None:
    """Add :data:`SAFE_GLOBALS` to torch's weights-only allow-list (idempotent; runs at import)."""
    torch.serialization.add_safe_globals(SAFE_GLOBALS)


allow_fairseq_checkpoints()
