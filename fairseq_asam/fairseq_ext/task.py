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

The sequence is the core's (:meth:`fairseq_asam.core.UpdateDriver.finish`, the same for every front end):
``train_step`` runs the wrapped task's own ``train_step`` inside the driver's ``first_pass`` (which records
the sample and the random state before its forward), and ``optimizer_step`` hands the driver a
:class:`FairseqUpdate`, fairseq's side of the update (the second pass's ``train_step``, the fp16/AMP
handling, the Trainer's reduce/normalise/clip, the wrapped task's optimizer step). The optimizer builds
the driver (``FairseqSharpnessAdam.build_driver``) once, the first time an update starts; the task holds it
as ``task.sam_driver``. Logged through fairseq's metrics (progress bar,
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
from ..core.update import UpdateAdapter, UpdateDriver
from . import scheduled
from .optimizer import find_sharpness_optimizer

__all__ = [
    "FairseqUpdate", "SecondPassOutOfMemory", "SharpnessAwareTask", "TranslationSAMConfig", "TranslationSAMTask",
    "fp16_grads_for_ascent", "make_sharpness_aware",
]

logger = logging.getLogger(__name__)

_LOG2 = 0.6931471805599453  # fairseq's criteria report losses in base 2: loss / ln 2
# On the CPU the freed first-pass gradients are handed back to the OS every _TRIM_EVERY-th ascent: each
# release costs a walk of the heap and page faults in the second pass, so not every time (docs/performance.md).
_TRIM_EVERY = 4


def _grads_cleared(model) -> bool:
    """True right after the Trainer's zero_grad() (fairseq sets grads to None): a new update starts."""
    return all(p.grad is None for p in model.parameters() if p.requires_grad)


def _all_finite(params) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    return not grads or bool(torch.isfinite(torch.stack([g.float().norm() for g in grads])).all())


class _MicroBatch:
    __slots__ = ("sample", "ignore_grad", "kwargs", "sample_size", "loss")

    def __init__(self, sample, ignore_grad, kwargs):
        self.sample, self.ignore_grad, self.kwargs = sample, ignore_grad, kwargs
        self.sample_size = 0
        self.loss = None


class FairseqUpdate(UpdateAdapter):
    """fairseq's side of one update (:class:`fairseq_asam.core.UpdateAdapter`): the task's ``train_step``
    run again per micro-batch, fairseq's optimizer wrappers (fp16, AMP) around the ascent, the Trainer's
    reduce/normalise/clip for g', and the wrapped task's ``optimizer_step`` as the base step.

    One instance per update; ``SharpnessAwareTask.update_adapter`` names the class (a subclass can record or
    time a phase by overriding its hook).
    """

    def __init__(self, task, sam, optimizer, model, update_num, base_step):
        self.task, self.sam, self.optimizer, self.model, self.update_num = task, sam, optimizer, model, update_num
        self._base_step = base_step  # the wrapped task's optimizer_step (Adam, through fairseq's wrappers)
        self.amp = isinstance(optimizer, AMPOptimizer)
        self.world = distributed_utils.get_data_parallel_world_size()
        self.sums = (0, None, None)  # this second pass's sample size, loss at w, loss at w + eps (local)
        self.applied_eps_norm = None
        self._attempt = 0

    def overflowed(self) -> bool:
        # --amp: an overflow in the first pass still reaches optimizer_step (the grad scaler must skip the step
        # and lower its scale). No ascent, no second pass.
        return self.amp and not _all_finite(self.model.parameters())

    def skip(self) -> None:
        if not self.amp:
            raise FloatingPointError("gradients are Nan/Inf (first pass of the sharpness-aware update)")
        with self.sam.descent():
            self._base_step()  # the grad scaler found the inf when the Trainer unscaled: it skips and backs off

    def before_ascent(self) -> None:
        # --fp16 / --memory-efficient-fp16: the grads are the model's fp16 ones, still times the loss scale.
        fp16_grads_for_ascent([p.grad for p in self.model.parameters()], self.sam.p)

    def after_ascent(self) -> None:
        pert = self.task.sam_driver.perturbation
        if next(self.model.parameters()).dtype in (torch.float16, torch.bfloat16):
            # In fp16/bf16 weights much of a small eps rounds away (docs/precision.md): log the norm that
            # was applied next to the intended one (one extra pass, in half-precision runs only).
            self.applied_eps_norm = pert.applied_eps_norm()
            _warn_if_rounded_away(self.applied_eps_norm, pert.last_eps_norm)
        if not next(self.model.parameters()).is_cuda:
            # The ascent dropped the first-pass gradients (their memory holds the second forward's activations):
            # give their pages back before the second pass allocates.
            if self.task._sam_ascents % _TRIM_EVERY == 0:
                _compat.release_freed_host_memory()
            self.task._sam_ascents += 1

    def before_second_pass(self) -> None:
        self.optimizer.zero_grad()
        if isinstance(self.optimizer, FP16Optimizer) and self.optimizer.scaler is None:
            # bf16: FP16Optimizer.zero_grad() resets its pending gradient factor only when there is a loss
            # scaler; in plain fairseq step() consumes it. The first pass's factor (1/sample_size times the
            # clip coefficient) was never applied and must not be applied to g' on top of g's own.
            _compat.set_fp16_multiply_factor(self.optimizer, 1.0)
        if self.amp:
            _amp_allow_second_unscale(self.optimizer)
        self.sums = (0, None, None)

    def rerun(self, mb, last: bool) -> None:
        """One micro-batch's forward/backward at w + eps: the task's own train_step (the Trainer's no_sync for
        all but the last micro-batch under DDP). Out of memory on one worker: the batch is skipped as fairseq
        skips one whose first pass ran out of memory (:class:`SecondPassOutOfMemory`); with several workers the
        error is raised as is (the others are inside the second pass's all-reduce and cannot be told to skip)."""
        model = self.model
        sync = model.no_sync() if self.world > 1 and hasattr(model, "no_sync") and not last else contextlib.nullcontext()
        try:
            with sync:
                loss, _, logging_output = self.task.train_step(
                    mb.sample, model, self.task._sam_criterion, self.optimizer, self.update_num, mb.ignore_grad,
                    **mb.kwargs)
        except RuntimeError as e:
            if not _is_oom(e) or self.world > 1:
                raise
            self.optimizer.zero_grad()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            logger.warning("out of memory in the second (w + eps) pass; skipping this batch: %s", e)
            raise SecondPassOutOfMemory(
                f"out of memory in the sharpness-aware second pass, batch skipped (not an overflow): {e}") from e
        n, loss_w, loss_eps = self.sums
        le = _loss_of(loss, logging_output)
        self.sums = (n + mb.sample_size, mb.loss if loss_w is None else loss_w + mb.loss,
                     le if loss_eps is None else loss_eps + le)
        if last and mb.ignore_grad:
            self.sums = (self.sums[0] * 0, *self.sums[1:])  # as the Trainer does when the last is a dummy batch

    def second_pass_ok(self) -> bool:
        """--amp overflow at w + eps: the grad scaler skips the step and lowers its scale, as for a first-pass
        overflow (at the minimum scale fairseq's FloatingPointError stops training); the second pass is retried
        at the lower scale up to --amp-batch-retries times, as the Trainer retries a batch (eps stays valid: the
        first-pass gradient was finite, and eps does not depend on its scale); after that, OverflowError: the
        Trainer skips the batch without counting an update."""
        if not self.amp or _all_finite(self.model.parameters()):
            return True
        self.optimizer.clip_grad_norm(0.0)  # the scaler's unscale_ records the inf; fairseq logs the new scale
        with self.sam.descent():
            self.optimizer.step()  # GradScaler.step skips Adam's step; update() lowers the scale
        if self._attempt >= self.sam.amp_batch_retries:
            self.optimizer.zero_grad()
            raise OverflowError(f"AMP: gradients at w + eps overflowed {self._attempt + 1} times (the second pass "
                                "of the sharpness-aware update); skipping this batch")
        self._attempt += 1
        logger.info("AMP: overflow in the second (w + eps) pass; retrying it at loss scale %g",
                    self.optimizer.scaler.get_scale())
        return False

    def after_second_pass(self) -> None:
        """Reduce, normalise and clip g' exactly as the Trainer did g."""
        optimizer, model, criterion = self.optimizer, self.model, self.task._sam_criterion
        optimizer.all_reduce_grads(model)
        if utils.has_parameters(criterion):
            optimizer.all_reduce_grads(criterion)
        sample_size, loss_w, loss_eps = self.sums
        if self.world > 1:
            device = next(p for p in model.parameters()).device
            buf = torch.stack([_as_tensor(x, device) for x in (sample_size, loss_w, loss_eps)])
            buf = distributed_utils.all_reduce(buf, group=distributed_utils.get_data_parallel_group())
            sample_size, loss_w, loss_eps = buf[0], buf[1], buf[2]
        else:
            sample_size = float(sample_size)
        self.sums = (sample_size, loss_w, loss_eps)
        # The Trainer's factor: DDP averages over workers, so numer / sample_size gives sum / sample_size.
        optimizer.multiply_grads(self.world / (sample_size or 1.0))
        grad_norm = optimizer.clip_grad_norm(self.sam.clip_norm)  # fp16: raises OverflowError on overflow
        if not self.amp and not torch.isfinite(grad_norm).all():
            raise FloatingPointError("gradients at w + eps are Nan/Inf (second pass of the sharpness-aware update)")

    def base_step(self) -> None:
        with self.sam.descent():
            self._base_step()


class SharpnessAwareTask:
    """Mixin that turns a fairseq task's update into the two-pass SAM/ASAM update.

    Put it first in the bases: ``class TranslationSAMTask(SharpnessAwareTask, TranslationTask)``. With an
    optimizer that is not ``asam_adam``/``sam_adam`` the task behaves exactly like the wrapped one.
    ``self.sam_driver`` is the update's driver (built once, when the first update starts);
    ``self.sam_phase_times`` holds the last update's wall times in seconds.
    """

    runs_sharpness_aware_update = True  # what --optimizer asam_adam/sam_adam check for at startup
    update_adapter = FairseqUpdate

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sam_driver: UpdateDriver | None = None
        self._sam_driver_for = None  # the Trainer's optimizer the driver reads gradients and momenta behind
        self._sam_criterion = None
        self._sam_t_start = None
        self._sam_timing = os.environ.get("FAIRSEQ_ASAM_PHASE_TIMES", "") not in ("", "0")
        self._sam_ascents = 0
        self.sam_phase_times: dict[str, float] = {}

    def _sam_driver(self, sam, optimizer, model) -> UpdateDriver:
        if self.sam_driver is None or self._sam_driver_for is not optimizer:
            # Once per run (again only if the Trainer builds a new optimizer, e.g. --reset-optimizer on load).
            self.sam_driver, self._sam_driver_for = sam.build_driver(optimizer, model), optimizer
        return self.sam_driver

    # ---- first pass: the wrapped task's train_step, recorded -------------------------------------

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False, **kwargs):
        drv = self.sam_driver
        sam = None if drv is not None and drv.replaying else find_sharpness_optimizer(optimizer)
        if sam is None:  # the second pass's own calls, or a plain optimizer
            return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad, **kwargs)
        if drv is None or _grads_cleared(model):
            # The Trainer zeroed the grads: a new update (or a retry after an overflow or OOM) starts, and only
            # the micro-batches from here on make up its gradient. A perturbation left by a skipped update is
            # undone; a one-pass policy moves w to w + eps.
            drv = self._sam_driver(sam, optimizer, model)
            self._sam_t_start = self._clock(model)
            drv.begin_step()
        mb = _MicroBatch(sample, ignore_grad, kwargs)
        with drv.first_pass(mb):
            loss, sample_size, logging_output = super().train_step(
                sample, model, criterion, optimizer, update_num, ignore_grad, **kwargs
            )
        mb.sample_size = sample_size
        mb.loss = _loss_of(loss, logging_output)
        self._sam_criterion = criterion
        return loss, sample_size, logging_output

    # ---- the update ------------------------------------------------------------------------------

    def optimizer_step(self, optimizer, model, update_num):
        sam = find_sharpness_optimizer(optimizer)
        if sam is None:
            return super().optimizer_step(optimizer, model, update_num)
        drv = self.sam_driver
        if drv is None or not drv.recorded:
            raise RuntimeError(
                "the sharpness-aware optimizer_step() found no recorded micro-batches: the trainer must call "
                "task.train_step() for every micro-batch of the update before task.optimizer_step()"
            )
        t0 = self._clock(model)
        update = self.update_adapter(self, sam, optimizer, model, update_num,
                                     lambda: super(SharpnessAwareTask, self).optimizer_step(optimizer, model, update_num))
        result = drv.finish(update, scale=scheduled.grad_scale(optimizer),
                            clock=(lambda: self._clock(model)) if self._sam_timing else None)
        if result.second_pass and not result.skipped:
            times = {"first": t0 - self._sam_t_start} if self._sam_t_start is not None else {}
            times.update({_PHASES.get(k, k): v for k, v in result.times.items()})
            self.sam_phase_times = times
            self._sam_log(drv.perturbation, update, times)
        if not result.skipped:
            scheduled.log(sam)

    # ---- logging and timing ----------------------------------------------------------------------

    def _sam_log(self, perturbation, update, times) -> None:
        sample_size, loss_w, loss_eps = update.sums
        if perturbation.last_eps_norm is not None:
            metrics.log_scalar("eps_norm", perturbation.last_eps_norm, weight=1, priority=20, round=4)
        if update.applied_eps_norm is not None:
            metrics.log_scalar("eps_norm_applied", update.applied_eps_norm, weight=1, priority=20, round=4)
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


# The driver's phase names as fairseq's metrics call them (t_reduce_clip: the Trainer's reduce/normalise/clip).
_PHASES = {"after_second": "reduce_clip"}


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
