"""Experiment tracking for ``asam-vision-train``: TensorBoard and Weights & Biases, per epoch.

Every number of the per-epoch record (the rows of metrics.csv: losses, accuracies, lr, the mean
``||eps||``, skipped steps, images/s, seconds) goes to each tracker that is switched on, at step =
epoch. Both need the ``tracking`` extra (``pip install fairseq-asam[tracking]``; ``make install``
installs it)::

    asam-vision-train --dataset cifar10 --model resnet20 --tensorboard-logdir runs/tb
    WANDB_MODE=offline asam-vision-train --dataset cifar10 --model resnet20 --wandb-project asam
"""

from __future__ import annotations

import numbers
import os


class EpochTrackers:
    """The trackers one run writes to (only on rank 0); a no-op when none is asked for."""

    def __init__(self, *, tensorboard_logdir: str | None = None, wandb_project: str | None = None,
                 run_name: str = "", run_dir: str | None = None, config: dict | None = None):
        self._tb = self._wandb = None
        # Both are checked before training starts: a missing package is an error now, not after an epoch.
        if tensorboard_logdir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # torch's writer needs the tensorboard package
                raise ValueError(f"--tensorboard-logdir needs the tensorboard package ({e}); "
                                 "pip install 'fairseq-asam[tracking]'") from None
            self._tb = SummaryWriter(log_dir=os.path.join(tensorboard_logdir, run_name) if run_name else tensorboard_logdir)
        if wandb_project is not None:
            try:
                import wandb
            except ImportError as e:
                raise ValueError(f"--wandb-project needs the wandb package ({e}); pip install 'fairseq-asam[tracking]'") from None
            # resume="allow" with the run name as id: a --resume continues the same W&B run.
            self._wandb = wandb.init(project=wandb_project, name=run_name or None, id=run_name or None,
                                     resume="allow", dir=run_dir, config=config or {})

    @property
    def active(self) -> bool:
        return self._tb is not None or self._wandb is not None

    def log_epoch(self, record: dict) -> None:
        """Every numeric field of one epoch's record except the epoch itself, at step = epoch."""
        step = int(record["epoch"])
        scalars = {k: float(v) for k, v in record.items()
                   if k != "epoch" and isinstance(v, numbers.Real) and not isinstance(v, bool)}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()  # an epoch is minutes: make it visible to a running TensorBoard now
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
