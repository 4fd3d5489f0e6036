"""BatchNorm's running statistics in a sharpness-aware update: they describe w, never w + eps.

A two-pass update runs its second forward at w + eps, weights that are never kept; folding that batch's
statistics into ``running_mean``/``running_var`` would count each batch twice, once at weights the model
never has. :func:`frozen_bn_stats` keeps them unchanged during the second pass (the forward still
normalizes with the batch's own statistics, as in the first). Every front end of this package runs its
second pass inside it (``opt.step(closure, model=model)`` included).

A one-pass policy (:class:`fairseq_asam.schedule.OnePass`) runs its only forward at w + eps, so the
statistics it gathers describe w + eps; :func:`recompute_bn_stats` recomputes them at w with one forward
pass over training data (what ``torch.optim.swa_utils.update_bn`` does for SWA), before evaluation.
``asam-vision-train`` does it after the last epoch of such a policy. Runs as is::

    python -c "import torch; from fairseq_asam.batchnorm import frozen_bn_stats; \\
m = torch.nn.BatchNorm1d(3); x = torch.randn(8, 3); \\
exec('with frozen_bn_stats(m): m(x)'); print(int(m.num_batches_tracked))"
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from . import _compat

__all__ = ["frozen_bn_stats", "recompute_bn_stats"]


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers in training mode normalize with the batch's statistics but leave ``running_mean``,
    ``running_var`` and ``num_batches_tracked`` unchanged inside this block.

    With ``track_running_stats`` off in training mode, torch's BatchNorm passes no running buffers to
    ``F.batch_norm``: the output is the same as with it on, and nothing is written.
    """
    mods = [m for m in model.modules() if isinstance(m, _compat.batchnorm_base()) and m.training and m.track_running_stats]
    for m in mods:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in mods:
            m.track_running_stats = True


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, batches: Iterable, device: torch.device | str | None = None) -> bool:
    """Recompute every BatchNorm layer's running statistics at the model's current weights: one forward
    pass over ``batches`` (tensors, or ``(input, target)`` pairs whose first element is the input) with a
    cumulative average, as ``torch.optim.swa_utils.update_bn``. Returns False (nothing done) when the
    model has no BatchNorm layer with running statistics. The model's training mode is kept."""
    if not any(isinstance(m, _compat.batchnorm_base()) and m.track_running_stats for m in model.modules()):
        return False
    torch.optim.swa_utils.update_bn(batches, model, device=device)
    return True
