"""ASAM and SAM in PyTorch Lightning (Kwon et al., ICML 2021, Section 4): a mixin for the LightningModule.

``configure_optimizers`` returns the :class:`~fairseq_asam.ASAM`/:class:`~fairseq_asam.SAM` shell (over any
base optimizer, with any cheaper-update policy), and :class:`SharpnessAwareMixin`, first in the module's
bases, makes each of Lightning's optimizer steps one sharpness-aware update, run by the update's one
sequence (:meth:`fairseq_asam.core.UpdateDriver.finish`, the same as every other front end):

1. the first pass is Lightning's own: ``training_step`` and ``backward`` of every accumulated micro-batch
   at w, with their hooks and logging; each micro-batch is recorded with the random state before its
   forward;
2. at the update's last micro-batch the policy decides from the accumulated gradient g; the ascent moves w
   to w + eps (or, with a non-finite g, the update is skipped and a GradScaler backs off);
3. the second pass runs ``training_step`` again over *every* micro-batch, each with its first pass's random
   state (the same dropout masks), the earlier ones under DDP's ``no_sync`` and the last one all-reduced,
   BatchNorm's running statistics left alone, ``self.log`` silent (the logged loss is the one at w) and no
   backward hooks;
4. w is restored bit for bit, the policy's gradient rule runs, and Lightning's own precision step follows
   once: unscale, ``on_before_optimizer_step``, gradient clipping (of g' only), ``scaler.step``/``update``.

``global_step``, ``max_steps``, LR schedulers and logging count updates. Checkpoints hold the shell's state
dict (the base optimizer's and the policy's), so ``ckpt_path=`` resumes the same run. Why a mixin: the
second pass needs each micro-batch's inputs, which only ``training_step`` sees, and the precision plugin's
step must run once, after it; a Strategy or Precision plugin sees neither the inputs nor, for
accumulated micro-batches, the update as a whole, and would have to be chosen instead of the user's own.

Manual optimization: call :meth:`SharpnessAwareMixin.sharpness_step` with a closure (zero_grad, forward,
``manual_backward``, return the loss) once per update. ``self.optimizers().step(closure)`` and the shell's
own ``ascent_step``/``descent_step`` are refused with an error that names it. Without the mixin, a shell that
Lightning steps refuses to run (it would replay only the last micro-batch and fire the hooks twice).

    python -c "import fairseq_asam.integrations.lightning as L; print(L.SharpnessAwareMixin.__doc__.splitlines()[0])"
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..core import ASAM
from ..core.update import UpdateAdapter, UpdateDriver, signal_overflow

__all__ = ["SharpnessAwareMixin"]

# Lightning's strategies that run the optimizer step inside an engine of their own, or shard the parameters
# with FSDP1's flat parameters (the bias rule and filter shapes of T_w are lost there).
_REFUSED_STRATEGIES = {
    "DeepSpeedStrategy": "DeepSpeed runs the optimizer step inside its engine",
    "FSDPStrategy": "Lightning's FSDPStrategy flattens parameters (FSDP1), losing the names and shapes T_w needs",
    "ModelParallelStrategy": "not supported by this integration",
    "XLAStrategy": "not supported by this integration",
}


def _recorded(step: Callable) -> Callable:
    """``training_step`` recorded for the second pass: each call of the first pass runs inside the driver's
    ``first_pass`` (its inputs and the random state before it); an update's first call begins the update."""

    @functools.wraps(step)
    def training_step(self, *args, **kwargs):
        drv = self._sam_recording_driver()
        if drv is None:
            return step(self, *args, **kwargs)
        if not drv.recorded or self._sam_update_of != self.trainer.global_step:
            # An update starts (micro-batches left by an update that raised are dropped; begin_step undoes a
            # perturbation it left; a one-pass policy moves w to w + eps).
            self._sam_update_of = self.trainer.global_step
            drv.begin_step()
        self._sam_in_step = True
        try:
            with drv.first_pass((args, kwargs)):
                return step(self, *args, **kwargs)
        finally:
            self._sam_in_step = False

    training_step._sam_recorded = True
    return training_step


class SharpnessAwareMixin:
    """Makes a LightningModule's optimizer steps ASAM/SAM updates; ``configure_optimizers`` returns the shell.

    Put it first: ``class Net(SharpnessAwareMixin, pl.LightningModule)``. Example::

        def configure_optimizers(self):
            base = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
            return ASAM(self.named_parameters(), base, rho=0.5)
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # The class's own training_step, or the one it inherits from a module after the mixin in its bases
        # (``class Sharp(SharpnessAwareMixin, ExistingModule): pass``).
        step = cls.__dict__.get("training_step") or getattr(cls, "training_step", None)
        if step is not None and not getattr(step, "_sam_recorded", False):
            cls.training_step = _recorded(step)

    # -- which shell, and when the first pass is recorded ------------------------------------------

    @property
    def sharpness_optimizer(self) -> ASAM | None:
        """The ASAM/SAM shell ``configure_optimizers`` returned (None before fitting, or with another optimizer)."""
        trainer = getattr(self, "_trainer", None)
        optimizers = getattr(trainer, "optimizers", None) or []
        if len(optimizers) == 1 and isinstance(optimizers[0], ASAM):
            return optimizers[0]
        if any(isinstance(o, ASAM) for o in optimizers):
            raise RuntimeError("SharpnessAwareMixin supports one optimizer (the ASAM/SAM shell) per module")
        return None

    def _sam_recording_driver(self) -> UpdateDriver | None:
        if getattr(self, "_sam_in_step", False) or not self.automatic_optimization or not self.trainer.training:
            return None
        opt = self.sharpness_optimizer
        if opt is None or opt.driver.replaying:
            return None
        return opt.driver

    def on_fit_start(self) -> None:
        opt = self.sharpness_optimizer
        if opt is not None:
            name = type(self.trainer.strategy).__name__
            if name in _REFUSED_STRATEGIES:
                raise ValueError(f"strategy {name} with ASAM/SAM: {_REFUSED_STRATEGIES[name]}; use the default "
                                 "strategy or strategy='ddp'")
            if self.automatic_optimization and not getattr(type(self).training_step, "_sam_recorded", False):
                raise TypeError(f"{type(self).__name__} must define training_step in a class that has "
                                "SharpnessAwareMixin as a base (put the mixin first in the bases)")
            opt._lightning_managed = True
            self._sam_updates_seen = opt.schedule.updates
        parent = getattr(super(), "on_fit_start", None)
        if parent is not None:
            parent()

    # -- automatic optimization ---------------------------------------------------------------------

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        opt = self.sharpness_optimizer
        if opt is None:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # The update's last micro-batch: its first pass is Lightning's closure (training_step, zero_grad on an
        # update's first micro-batch, backward with its hooks); the earlier ones ran before this hook.
        loss_w = optimizer_closure()
        if loss_w is None:
            return None  # training_step returned None: Lightning skips the step
        self._sam_finish(opt, optimizer, lambda: loss_w, rerun=self._sam_rerun_training_step)
        return None

    def _sam_rerun_training_step(self, item, last: bool) -> None:
        args, kwargs = item
        trainer = self.trainer
        strategy = trainer.strategy
        sync = contextlib.nullcontext() if last else getattr(strategy, "block_backward_sync", contextlib.nullcontext)()
        with sync:
            # Through the strategy: its precision context (autocast) and, under DDP, the wrapped model, whose
            # backward all-reduces on the last micro-batch.
            out = strategy.training_step(*args, **kwargs)
            loss = out.get("loss") if isinstance(out, Mapping) else out
            if loss is None:
                return
            loss = loss / trainer.accumulate_grad_batches  # as Lightning's closure normalizes the loss
            scaler = self._sam_scaler()
            self.backward(scaler.scale(loss) if scaler is not None else loss)

    def _sam_scaler(self):
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        return scaler if scaler is not None and scaler.is_enabled() else None

    def _sam_finish(self, opt: ASAM, lightning_optimizer, closure: Callable[[], Any], *, rerun) -> None:
        scaler = self._sam_scaler()
        scale = float(scaler.get_scale()) if scaler is not None else 1.0
        opt.driver.finish(_LightningUpdate(self, opt, lightning_optimizer, closure, scaler, rerun), scale=scale)
        self._sam_updates_seen = opt.schedule.updates

    def log(self, *args, **kwargs) -> None:
        """Lightning's ``log``, silent during the second pass (the logged values are the first pass's, at w)."""
        opt = self.sharpness_optimizer if getattr(self, "_trainer", None) is not None else None
        if opt is not None and opt.driver.replaying:
            return
        super().log(*args, **kwargs)

    # -- manual optimization ------------------------------------------------------------------------

    def sharpness_step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """One ASAM/SAM update in manual optimization. ``closure`` zeroes the gradients, runs the forward, calls
        ``self.manual_backward(loss)`` and returns the loss; it runs at w, then (where the policy says so) at
        w + eps with the same random draws; the step goes through ``self.optimizers()`` once (Lightning's
        precision step, ``global_step``). Returns the loss at w."""
        opt = self.sharpness_optimizer
        if opt is None:
            raise RuntimeError("sharpness_step() needs configure_optimizers to return an ASAM/SAM shell")
        if self.automatic_optimization:
            raise RuntimeError("sharpness_step() is for manual optimization (self.automatic_optimization = False); "
                               "with automatic optimization every optimizer step is a sharpness-aware update")
        drv = opt.driver
        drv.begin_step()
        with drv.first_pass(None):
            loss = closure()
        self._sam_finish(opt, self.optimizers(), lambda: loss, rerun=lambda item, last: closure())
        return loss

    def on_train_batch_end(self, *args, **kwargs) -> None:
        opt = self.sharpness_optimizer
        if opt is not None and opt.schedule.updates != getattr(self, "_sam_updates_seen", opt.schedule.updates):
            raise RuntimeError(
                "the ASAM/SAM shell stepped outside Lightning (ascent_step()/descent_step() called directly): "
                "Lightning's global_step, precision plugin and hooks did not see the update. In manual "
                "optimization call self.sharpness_step(closure) once per update")
        parent = getattr(super(), "on_train_batch_end", None)
        if parent is not None:
            parent(*args, **kwargs)


class _LightningUpdate(UpdateAdapter):
    """Lightning's side of one update: a micro-batch's forward/backward again, and Lightning's own optimizer step
    (through ``LightningOptimizer.step``: the precision plugin, its hooks and clipping, ``global_step``)."""

    def __init__(self, module, opt: ASAM, lightning_optimizer, closure, scaler, rerun):
        self.model, self.opt, self.lightning_optimizer = module, opt, lightning_optimizer
        self.closure, self.scaler, self._rerun = closure, scaler, rerun

    def rerun(self, item, last: bool) -> None:
        self._rerun(item, last)

    def base_step(self) -> None:
        with self.opt.descent_only():
            self.lightning_optimizer.step(closure=self.closure)

    def skip(self) -> None:
        self.opt.zero_grad()
        if self.scaler is not None:
            # Lightning's GradScaler must skip this update and back off, as after an fp16 overflow.
            signal_overflow(self.opt.perturbation.params())
            self.base_step()
