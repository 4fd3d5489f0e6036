"""The two-pass sharpness-aware update as a fairseq task wrapper; registered as ``translation_sam``.

ASAM/SAM (Kwon et al., ICML 2021, Section 4, Algorithm 1) need the gradient at w + eps, where eps
depends on the gradient g of the whole update. fairseq's Trainer runs ``task.train_step`` once per
micro-batch (``--update-freq``), then all-reduces, normalises (by the update's sample size) and clips the
accumulated gradient, then calls ``task.optimizer_step``. Doing the ascent per micro-batch would take
eps from a partial, un-reduced, unscaled gradient; so :class:`SharpnessAwareTask` does it in
``optimizer_step``, where g is final. eps depends only on g's direction, so normalising and clipping
do not change it. Then, per update:

1. ascent: the core (``fairseq_asam.core``) moves the weights the forward pass uses to w + eps;
2. second pass: forward/backward again over the same micro-batches, each with the random state (the
   dropout masks) its first pass had, so g' belongs to the same stochastic loss whose ascent direction
   was taken; ``no_sync`` for all but the last micro-batch under DDP, as the Trainer does;
3. w is copied back into the weights, bit for bit; g' is all-reduced, normalised and clipped as fairseq did for g;
4. descent: fairseq's optimizer step (Adam, through any fp16/AMP wrapper) with g'.

Under ``--fp16`` the ascent perturbs the fp16 weights the forward reads (the fp32 masters stay), from the
fp16 gradients rescaled by a power of two (:func:`fp16_grads_for_ascent`). An ``--amp`` overflow in the
second pass is retried at the lowered scale, then reported to the Trainer as an overflow, and an
out-of-memory error in it skips the batch, as fairseq does for the first pass (``docs/precision.md`` says
which precision mode to use).

``train_step`` only records each micro-batch (the sample and the random state before its forward) on
top of the wrapped task's own ``train_step``. Logged through fairseq's metrics (progress bar,
tensorboard, wandb): ``loss_eps`` (the loss at w + eps, in the same base-2 units as fairseq's ``loss``,
which is the loss at w), ``sharpness`` (loss_eps - loss: a free per-update sharpness estimate) and
``eps_norm`` (||eps||_2). With ``FAIRSEQ_ASAM_PHASE_TIMES=1`` in the environment, the wall time of each
phase is logged too (``t_first``, ``t_ascent``, ``t_second``, ``t_restore``, ``t_reduce_clip``,
``t_base_step``, in ms, CUDA-synchronised).

Example (from the repository root, after ``make install``)::

    fairseq-train data-bin/iwslt14.tokenized.de-en --user-dir fairseq_asam --task translation_sam \\
        --arch transformer_iwslt_de_en --optimizer asam_adam --asam-rho 0.2 --max-tokens 4096

Another task gets the same update with ``class MyTaskSAM(SharpnessAwareTask, MyTask)`` (the mixin first),
registered under a new name, or with :func:`make_sharpness_aware`.
"""

# No `from __future__ import annotations`: fairseq reads the dataclass field types at runtime.
import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass

import torch
from fairseq import metrics, utils
from fairseq.distributed import utils as distributed_utils
from fairseq.optim.amp_optimizer import AMPOptimizer
from fairseq.optim.fp16_optimizer import FP16Optimizer
from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask

from .. import _compat
from ..replay import random_state, set_random_state
from . import scheduled
from .optimizer import find_sharpness_optimizer

__all__ = [
    "SecondPassOutOfMemory", "SharpnessAwareTask", "TranslationSAMConfig", "TranslationSAMTask", "fp16_grads_for_ascent",
    "make_sharpness_aware",
]

logger = logging.getLogger(__name__)

_LOG2 = 0.6931471805599453  # fairseq's criteria report losses in base 2: loss / ln 2
_TRIM_EVERY = 4  # every 4th ascent: peak RSS +1.01x parameter bytes at 1.94x adam (every one: +0.58x at 2.09x)


def _grads_cleared(model) -> bool:
    """True right after the Trainer's zero_grad() (fairseq sets grads to None): a new update starts."""
    return all(p.grad is None for p in model.parameters() if p.requires_grad)


def _all_finite(params) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    return not grads or bool(torch.isfinite(torch.stack([g.float().norm() for g in grads])).all())


class _MicroBatch:
    __slots__ = ("sample", "ignore_grad", "kwargs", "rng", "sample_size", "loss")

    def __init__(self, sample, ignore_grad, kwargs, rng):
        self.sample, self.ignore_grad, self.kwargs, self.rng = sample, ignore_grad, kwargs, rng
        self.sample_size = 0
        self.loss = None


class SharpnessAwareTask:
    """Mixin that turns a fairseq task's update into the two-pass SAM/ASAM update.

    Put it first in the bases: ``class TranslationSAMTask(SharpnessAwareTask, TranslationTask)``. With an
    optimizer that is not ``asam_adam``/``sam_adam`` the task behaves exactly like the wrapped one.
    The phases are methods (:meth:`sam_ascent`, :meth:`sam_second_pass`, :meth:`sam_descent`) so that they
    can be timed or overridden; ``self.sam_phase_times`` holds the last update's wall times in seconds.
    """

    runs_sharpness_aware_update = True  # what --optimizer asam_adam/sam_adam check for at startup

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._sam_pending: list[_MicroBatch] = []
        self._sam_replaying = False
        self._sam_criterion = None
        self._sam_t_start = None
        self._sam_t_base = None
        self._sam_timing = os.environ.get("FAIRSEQ_ASAM_PHASE_TIMES", "") not in ("", "0")
        self._sam_ascents = 0
        self.sam_phase_times: dict[str, float] = {}

    # ---- first pass: the wrapped task's train_step, recorded -------------------------------------

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False, **kwargs):
        if self._sam_replaying or find_sharpness_optimizer(optimizer) is None:
            return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad, **kwargs)
        if _grads_cleared(model):
            # The Trainer zeroed the grads: a new update (or a retry after an overflow or OOM) starts,
            # and only the micro-batches from here on make up its gradient.
            self._sam_pending = []
            self._sam_t_start = self._clock(model)
            # A perturbation left by a skipped update is undone; a one-pass policy moves w to w + eps.
            scheduled.driver(find_sharpness_optimizer(optimizer), optimizer, model).begin()
        mb = _MicroBatch(sample, ignore_grad, kwargs, random_state())
        loss, sample_size, logging_output = super().train_step(
            sample, model, criterion, optimizer, update_num, ignore_grad, **kwargs
        )
        mb.sample_size = sample_size
        mb.loss = _loss_of(loss, logging_output)
        self._sam_pending.append(mb)
        self._sam_criterion = criterion
        return loss, sample_size, logging_output

    # ---- the update ------------------------------------------------------------------------------

    def optimizer_step(self, optimizer, model, update_num):
        sam = find_sharpness_optimizer(optimizer)
        if sam is None:
            return super().optimizer_step(optimizer, model, update_num)
        pending, self._sam_pending = self._sam_pending, []
        if not pending:
            raise RuntimeError(
                "the sharpness-aware optimizer_step() found no recorded micro-batches: the trainer must call "
                "task.train_step() for every micro-batch of the update before task.optimizer_step()"
            )
        times = {}
        t0 = self._clock(model)
        if self._sam_t_start is not None:
            times["first"] = t0 - self._sam_t_start
        drv = scheduled.driver(sam, optimizer, model)
        second_pass = drv.wants_second_pass(scale=scheduled.grad_scale(optimizer))  # the policy; default: yes
        if isinstance(optimizer, AMPOptimizer) and not _all_finite(model.parameters()):
            # AMP overflow in the first pass: the Trainer still calls optimizer_step so that the grad
            # scaler skips the step and lowers its scale. No ascent, no second pass.
            with sam.descent():
                return super().optimizer_step(optimizer, model, update_num)
        if not second_pass:
            return self.sam_plain_step(sam, optimizer, model, update_num)
        perturber = self.sam_ascent(sam, optimizer, model)
        t1 = self._clock(model)
        try:
            sums = self._sam_second_pass_handled(pending, sam, optimizer, model, update_num)
        finally:
            t_restore = self._clock(model)
            drv.restore()  # w copied back in place, bit for bit, also if the second pass raised
        t2 = self._clock(model)
        sample_size, loss_w, loss_eps = self.sam_descent(sam, optimizer, model, update_num, sums)
        t3 = self._clock(model)
        times.update(ascent=t1 - t0, second=t_restore - t1, restore=t2 - t_restore,
                     reduce_clip=self._sam_t_base - t2, base_step=t3 - self._sam_t_base)
        self.sam_phase_times = times
        self._sam_log(perturber, sample_size, loss_w, loss_eps, times)
        scheduled.log(sam)

    def sam_plain_step(self, sam, optimizer, model, update_num):
        """An update the schedule runs without the second pass: fairseq's optimizer step with g (reduced,
        normalised and clipped by the Trainer), after the schedule's gradient rule."""
        scheduled.driver(sam, optimizer, model).end()
        with sam.descent():
            super().optimizer_step(optimizer, model, update_num)
        scheduled.log(sam)

    def sam_ascent(self, sam, optimizer, model):
        """w -> w + eps on the tensors the forward pass uses, with the gradient fairseq finalised."""
        drv = scheduled.driver(sam, optimizer, model)
        perturber = drv.perturbation
        # --fp16 / --memory-efficient-fp16: the grads are the model's fp16 ones, still times the loss scale.
        fp16_grads_for_ascent([p.grad for p in model.parameters()], sam.p)
        # The ascent consumes the model's grads (drops them, so the second forward's activations can use
        # their memory: keeping them zeroed raised asam_adam's peak RSS by about one more parameter size);
        # the fairseq optimizer's zero_grad() before the second pass clears its own state.
        if not drv.ascend():
            raise FloatingPointError("gradients are Nan/Inf (first pass of the sharpness-aware update)")
        self._sam_applied = None
        if next(model.parameters()).dtype in (torch.float16, torch.bfloat16):
            # In fp16/bf16 weights much of a small eps rounds away (docs/precision.md): log the norm that
            # was applied next to the intended one (one extra pass, in half-precision runs only).
            self._sam_applied = perturber.applied_eps_norm()
            _warn_if_rounded_away(self._sam_applied, perturber.last_eps_norm)
        if not next(model.parameters()).is_cuda:
            # The first-pass gradients were just freed: give their pages back before the second pass
            # allocates (the peak-RSS cost of the two-pass update on the CPU, see the function). Every
            # _TRIM_EVERY-th ascent: each release costs a walk of the heap and page faults in the second pass.
            if self._sam_ascents % _TRIM_EVERY == 0:
                _compat.release_freed_host_memory()
            self._sam_ascents += 1
        return perturber

    def sam_second_pass(self, pending, model, optimizer, update_num):
        """Forward/backward at w + eps over the update's micro-batches, replaying each one's random state.

        Returns local (sample_size, loss at w, loss at w + eps) sums.
        """
        optimizer.zero_grad()
        if isinstance(optimizer, FP16Optimizer) and optimizer.scaler is None:
            # bf16: FP16Optimizer.zero_grad() resets its pending gradient factor only when there is a loss
            # scaler; in plain fairseq step() consumes it. The first pass's factor (1/sample_size times the
            # clip coefficient) was never applied and must not be applied to g' on top of g's own.
            _compat.set_fp16_multiply_factor(optimizer, 1.0)
        if isinstance(optimizer, AMPOptimizer):
            _amp_allow_second_unscale(optimizer)
        world = distributed_utils.get_data_parallel_world_size()
        rng_after_first = random_state()
        loss_eps = loss_w = None
        sample_size = 0
        self._sam_replaying = True
        try:
            for i, mb in enumerate(pending):
                set_random_state(mb.rng)
                sync = (
                    model.no_sync()
                    if world > 1 and hasattr(model, "no_sync") and i < len(pending) - 1
                    else contextlib.nullcontext()
                )
                with sync:
                    loss, _, logging_output = self.train_step(
                        mb.sample, model, self._sam_criterion, optimizer, update_num, mb.ignore_grad, **mb.kwargs
                    )
                le = _loss_of(loss, logging_output)
                loss_eps = le if loss_eps is None else loss_eps + le
                loss_w = mb.loss if loss_w is None else loss_w + mb.loss
                sample_size += mb.sample_size
                del loss
        finally:
            self._sam_replaying = False
            set_random_state(rng_after_first)
        if pending[-1].ignore_grad:
            sample_size *= 0  # as the Trainer does when the last micro-batch is a dummy batch
        return sample_size, loss_w, loss_eps

    def _sam_second_pass_handled(self, pending, sam, optimizer, model, update_num):
        """:meth:`sam_second_pass`, with fairseq's handling of an AMP overflow and of running out of memory.

        The Trainer only sees what optimizer_step raises, and treats everything but an OverflowError raised
        here as fatal; it counts the update (and steps the LR schedule) whenever optimizer_step returns.

        - --amp overflow at w + eps: the grad scaler skips the step and lowers its scale, as for a
          first-pass overflow (at the minimum scale fairseq's FloatingPointError stops training); the second
          pass is retried at the lower scale up to --amp-batch-retries times, as the Trainer retries a batch
          (eps stays valid: the first-pass gradient was finite, and eps does not depend on its scale); after
          that, OverflowError: the Trainer skips the batch without counting an update.
        - out of memory in the second pass, one worker: the grads are dropped and OverflowError (a
          :class:`SecondPassOutOfMemory`) makes the Trainer skip the batch, as it skips one whose first
          forward/backward ran out of memory. With several workers the error is raised as before: the others
          are inside the second pass's all-reduce and cannot be told to skip, so going on would pair
          mismatched collectives.
        """
        attempt = 0
        while True:
            try:
                sums = self.sam_second_pass(pending, model, optimizer, update_num)
            except RuntimeError as e:
                if not _is_oom(e) or distributed_utils.get_data_parallel_world_size() > 1:
                    raise
                optimizer.zero_grad()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                logger.warning("out of memory in the second (w + eps) pass; skipping this batch: %s", e)
                raise SecondPassOutOfMemory(
                    f"out of memory in the sharpness-aware second pass, batch skipped (not an overflow): {e}"
                ) from e
            if not isinstance(optimizer, AMPOptimizer) or _all_finite(model.parameters()):
                return sums
            optimizer.clip_grad_norm(0.0)  # the scaler's unscale_ records the inf; fairseq logs the new scale
            with sam.descent():
                optimizer.step()  # GradScaler.step skips Adam's step; update() lowers the scale
            if attempt >= sam.amp_batch_retries:
                optimizer.zero_grad()
                raise OverflowError(
                    f"AMP: gradients at w + eps overflowed {attempt + 1} times (the second pass of the "
                    "sharpness-aware update); skipping this batch"
                )
            attempt += 1
            logger.info("AMP: overflow in the second (w + eps) pass; retrying it at loss scale %g",
                        optimizer.scaler.get_scale())

    def sam_descent(self, sam, optimizer, model, update_num, sums):
        """Reduce, normalise and clip g' exactly as the Trainer did g, then fairseq's optimizer step."""
        criterion = self._sam_criterion
        optimizer.all_reduce_grads(model)
        if utils.has_parameters(criterion):
            optimizer.all_reduce_grads(criterion)
        sample_size, loss_w, loss_eps = sums
        world = distributed_utils.get_data_parallel_world_size()
        if world > 1:
            device = next(p for p in model.parameters()).device
            buf = torch.stack([_as_tensor(x, device) for x in (sample_size, loss_w, loss_eps)])
            buf = distributed_utils.all_reduce(buf, group=distributed_utils.get_data_parallel_group())
            sample_size, loss_w, loss_eps = buf[0], buf[1], buf[2]
        else:
            sample_size = float(sample_size)
        # The Trainer's factor: DDP averages over workers, so numer / sample_size gives sum / sample_size.
        optimizer.multiply_grads(world / (sample_size or 1.0))
        grad_norm = optimizer.clip_grad_norm(sam.clip_norm)  # fp16: raises OverflowError on overflow
        if not isinstance(optimizer, AMPOptimizer) and not torch.isfinite(grad_norm).all():
            raise FloatingPointError("gradients at w + eps are Nan/Inf (second pass of the sharpness-aware update)")
        scheduled.driver(sam, optimizer, model).end()
        self._sam_t_base = self._clock(model)
        with sam.descent():
            super().optimizer_step(optimizer, model, update_num)
        return sample_size, loss_w, loss_eps

    # ---- logging and timing ----------------------------------------------------------------------

    def _sam_log(self, perturber, sample_size, loss_w, loss_eps, times) -> None:
        if perturber.last_eps_norm is not None:
            metrics.log_scalar("eps_norm", perturber.last_eps_norm, weight=1, priority=20, round=4)
        if getattr(self, "_sam_applied", None) is not None:
            metrics.log_scalar("eps_norm_applied", self._sam_applied, weight=1, priority=20, round=4)
        if float(sample_size) > 0 and loss_eps is not None:
            metrics.log_scalar("loss_eps", loss_eps / sample_size / _LOG2, sample_size, priority=20, round=3)
            metrics.log_scalar(
                "sharpness", (loss_eps - loss_w) / sample_size / _LOG2, sample_size, priority=20, round=4
            )
        if self._sam_timing:
            for name, seconds in times.items():
                metrics.log_scalar(f"t_{name}", seconds * 1000.0, weight=1, priority=900, round=2)

    def _clock(self, model) -> float:
        if self._sam_timing and torch.cuda.is_available() and next(model.parameters()).is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


class SecondPassOutOfMemory(OverflowError):
    """Out of memory in the second pass. An OverflowError because that is the one error fairseq's Trainer
    survives inside optimizer_step: it skips the batch without counting an update."""


def _is_oom(e: BaseException) -> bool:
    # fairseq's own test for an out-of-memory error (Trainer.train_step), plus torch's class for it
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e)


_warned_rounding = False


def _warn_if_rounded_away(applied, intended, below: float = 0.5) -> None:
    """Warn once when the weights' precision kept less than ``below`` of the intended ||eps||."""
    global _warned_rounding
    if _warned_rounding or applied is None or intended is None:
        return
    a, i = float(applied), float(intended)  # a host sync, in half-precision runs only
    if i > 0 and a < below * i:
        _warned_rounding = True
        logger.warning(
            "the perturbation applied to the half-precision weights has norm %.3g, %.0f%% of the intended %.3g: "
            "most of eps rounds away in fp16/bf16 weights; use --amp (fp32 weights) with SAM/ASAM "
            "(docs/precision.md)", a, 100 * a / i, i,
        )


def _loss_of(loss, logging_output):
    v = logging_output.get("loss", None) if isinstance(logging_output, dict) else None
    v = loss if v is None else v
    return v.detach().double() if torch.is_tensor(v) else float(v)


def _as_tensor(x, device):
    if torch.is_tensor(x):
        return x.detach().to(device=device, dtype=torch.float64).reshape(())
    return torch.tensor(float(x), dtype=torch.float64, device=device)


# Where the fp16 gradients' largest entry is put for the ascent. eps depends on g only through its direction
# (p = 2 divides by ||T g||, p = inf takes sign(g)), so any positive factor gives the same eps, and a power of
# two changes no mantissa. 2**8 leaves 2**7 of headroom below fp16's largest value for T g (T = |w| + eta, or
# a filter's norm + eta, would have to exceed 255) and keeps every entry within 2**-22 of the largest one in
# fp16's normal range (>= 2**-14); in T g (T >= eta = 0.01) those within about 2**-15 stay normal and smaller
# ones become subnormals, whose share of ||T g|| is negligible (1 - cos = 2e-7 on transformer_iwslt_de_en).
_FP16_ASCENT_GRAD_MAX = 2.0**8


def fp16_grads_for_ascent(grads, p) -> None:
    """Rescale fp16 gradients (in place, by one power of two) so that the ascent with norm ``p`` (2 or inf)
    neither overflows nor loses entries to underflow; other dtypes and None entries are left alone. No host
    sync: the factor stays on the device.

    fairseq keeps the fp16 gradients multiplied by the loss scale, which its scaler grows until they nearly
    overflow; for p = 2 the ascent forms T g, which would then overflow wherever T > 1, so they are scaled
    down to a largest entry of 2**8. For p = inf the ascent only takes sign(g) (no T g), so they are never
    scaled down: that would flush the smallest subnormal entries to zero and lose their sign (measured
    1 - cos = 3e-3 on transformer_iwslt_de_en). The whole pending factor of fairseq's step (1 / (loss scale
    x sample size) x clip coefficient), used before, overshot: per-token gradients of 1e-4 to 1e-8, most of
    them subnormal in fp16 and some zero, which bent eps by 1 - cos = 0.03 for p = inf (docs/precision.md).
    """
    grads = [g for g in grads if g is not None and g.dtype == torch.float16]
    if not grads:
        return
    amax = torch.stack(torch._foreach_norm(grads, math.inf)).max().float()
    # 2**15 is fp16's largest power of two: the factor stays exact if a kernel casts it to the grads' dtype.
    k = torch.floor(torch.log2(_FP16_ASCENT_GRAD_MAX / amax)).clamp_(0.0 if p == math.inf else -24.0, 15.0)
    factor = torch.where(amax > 0, torch.exp2(k), torch.ones_like(k))  # all-zero gradient: leave it
    torch._foreach_mul_(grads, factor)


def _amp_allow_second_unscale(optimizer) -> None:
    # AMPOptimizer.clip_grad_norm() calls GradScaler.unscale_(), which refuses a second call before
    # scaler.update(). The first pass's unscale found no inf (checked before the ascent), so forgetting it
    # loses nothing; update() must still run only once per update (in the step) so the scale's growth
    # schedule is the one fairseq would follow.
    scaler = optimizer.scaler
    if not scaler.is_enabled():
        return  # no CUDA: torch disabled the scaler, unscale_() is a no-op
    _compat.gradscaler_forget_unscale(scaler, optimizer.optimizer)


def make_sharpness_aware(task_cls, name: str | None = None, dataclass=None):
    """``SharpnessAwareTask`` around ``task_cls``; registered as ``name`` (with ``dataclass``) when given."""
    cls = type(f"{task_cls.__name__}SAM", (SharpnessAwareTask, task_cls), {"__doc__": f"{task_cls.__name__} with the two-pass SAM/ASAM update."})
    if name is not None:
        cls = register_task(name, dataclass=dataclass)(cls)
    return cls


@dataclass
class TranslationSAMConfig(TranslationConfig):
    """The translation task's options, unchanged: the sharpness-aware options belong to the optimizer."""


@register_task("translation_sam", dataclass=TranslationSAMConfig)
class TranslationSAMTask(SharpnessAwareTask, TranslationTask):
    """fairseq's translation task with the two-pass update of ``--optimizer asam_adam`` / ``sam_adam``."""
