"""One training update for SGD, SAM and ASAM (paper Section 4, Algorithm 1), with m-sharpness, DDP and AMP.

The update runs the optimizer's update protocol (:mod:`fairseq_asam.core.update`: ``begin_step``, the first
pass, ``wants_second_pass``, ``ascent_step`` and the second pass where the schedule says so, ``end_step``),
so every schedule of :mod:`fairseq_asam.schedule` runs through the same micro-batch, DDP, FSDP, RNG and
GradScaler handling. This module only decides what the passes see, and steps the base optimizer itself
because the fp16 GradScaler must unscale and step it (``scaler.step(opt.base_optimizer)``):

* m-sharpness (Foret et al. 2021, Section 4.1; the paper uses m = 32 for PyramidNet and 128 on ImageNet):
  each shard of m examples of the worker's batch gets its own eps from its own gradient. Per shard:
  first-pass grad, ``ascent_step()``, second-pass grad at w + eps_shard, ``restore()``; the second-pass
  grads are averaged (weighted by shard size) and the base optimizer steps once. A schedule that skips
  second passes cannot run with it (its decision needs the whole update's gradient; the shards' ascents
  come before it): ``schedule.check_mode`` refuses that with the reason.
* DDP: the first pass runs under ``no_sync()``, so eps is per worker (no all-reduce); the second-pass
  gradients are averaged across workers.
* Gradient accumulation (``accum_steps`` N, like fairseq's ``--update-freq``): the worker's batch is cut
  into N micro-batches. The first pass runs over all of them, each loss weighted by its share of the
  examples, so the accumulated gradient is the whole update's mean gradient and eps comes from it; the
  second pass runs over the same micro-batch tensors (same augmentation), then the base optimizer steps
  once. With m-sharpness each shard of m examples still gets its own eps; a shard larger than a
  micro-batch is itself accumulated over micro-batches. Under DDP only the last micro-batch of the
  second pass all-reduces (``no_sync()`` for the others).
* Random state: the random numbers a forward pass draws (ShakeDrop, dropout) are replayed. The CPU
  (and CUDA) RNG state is saved before each micro-batch's first forward and restored before its second,
  so both passes of one update see the same draws (as fairseq_asam.fairseq_ext.task replays dropout);
  the state reached after the first pass is restored at the end. Models that draw nothing are unaffected.
* FSDP2 (``fully_shard``): both passes reduce-scatter, so eps comes from the global batch's gradient; the
  core totals the norm over the shards (one all-reduce), and every rank takes the same skip decision.
* BatchNorm: the second forward pass normalizes with the batch's statistics, like the first, but does
  not fold them into the running statistics (they would describe weights w + eps that are never kept).
* fp16: one GradScaler. The first-pass gradients stay scaled: eps is invariant to scaling the gradient
  (p = 2 divides by its norm, p = inf takes its sign), so they need no unscale; a non-finite first-pass
  gradient makes ``ascend()`` return False and the update is skipped on every rank, with the scale
  backed off. The second-pass gradients are unscaled once, by ``scaler.step``.

    python -c "import torch; from fairseq_asam import ASAM; from fairseq_asam.vision.step import train_step; \
m = torch.nn.Linear(4, 3); b = torch.optim.SGD(m.parameters(), lr=0.1); \
o = ASAM(m.named_parameters(), b, rho=0.5); \
print(train_step(m, o, torch.nn.CrossEntropyLoss(), torch.randn(8, 4), torch.randint(3, (8,)), m_sharpness=4, \
accum_steps=2))"
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..batchnorm import frozen_bn_stats
from ..core import ASAM
from ..core.update import UpdateAdapter, UpdateDriver, signal_overflow
from .fsdp import is_fsdp

__all__ = ["StepResult", "frozen_bn_stats", "train_step"]


@dataclass
class StepResult:
    loss: torch.Tensor  # first-pass loss at w (mean over the worker's batch), detached
    logits: torch.Tensor  # first-pass logits, detached (for the training accuracy)
    skipped: bool  # True when the update was skipped (non-finite gradient)
    eps_norm: torch.Tensor | None  # ||eps||_2 of the last shard's perturbation


def _is_ddp(model) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def _no_sync(model):
    return model.no_sync() if _is_ddp(model) else contextlib.nullcontext()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_ranks_true(flag: bool, device) -> bool:
    if not _distributed():
        return flag
    t = torch.tensor([1 if flag else 0], device=device, dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _all_reduce_mean(tensors) -> None:
    if not _distributed() or not tensors:
        return
    # One flat buffer: one collective instead of one per parameter.
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat.div_(dist.get_world_size())
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def _backward(loss, scaler):
    (scaler.scale(loss) if scaler is not None else loss).backward()


def _base_step(base, scaler):
    if scaler is not None:
        scaler.step(base)  # unscales the (second-pass) grads once; skips the step on inf/NaN
        scaler.update()
    else:
        base.step()


def _micro_batches(x, y, size: int) -> list:
    return list(zip(x.split(size), y.split(size)))


def _weighted(loss, k: int, n: int):
    # A micro-batch's mean loss times its share k/n of the examples: the accumulated gradient is the mean
    # over all n, what one batch of n gives. k == n (no accumulation) leaves the graph as it was.
    return loss if k == n else loss * (k / n)


def _first_pass(model, criterion, pieces, scaler, ac, *, driver: UpdateDriver | None = None, sync_last: bool = False):
    """Forward/backward at w over the micro-batches, under no_sync (eps is this worker's own); with
    ``sync_last`` the last micro-batch's backward all-reduces (a plain one-pass update under DDP). With a
    ``driver`` each micro-batch is recorded for the second pass, with the random state before its forward.

    Returns (the mean loss over all examples, the logits).
    """
    n = sum(len(ys) for _, ys in pieces)
    losses, logits = [], []
    for i, (xs, ys) in enumerate(pieces):
        with driver.first_pass((xs, ys), device=xs.device) if driver is not None else contextlib.nullcontext():
            with contextlib.nullcontext() if sync_last and i == len(pieces) - 1 else _no_sync(model):
                with ac():
                    out = model(xs)
                    loss = criterion(out, ys)
                _backward(_weighted(loss, len(ys), n), scaler)
        losses.append(loss.detach())
        logits.append(out.detach())
    if len(pieces) == 1:
        return losses[0], logits[0]
    loss = sum(ls * len(ys) for ls, (_, ys) in zip(losses, pieces)) / n
    return loss, torch.cat(logits)


class _VisionUpdate(UpdateAdapter):
    """The vision step's side of the update: a micro-batch's forward/backward at w + eps (under DDP the last
    one all-reduces the accumulated gradient when ``sync_last``), the base step through the GradScaler."""

    def __init__(self, model, criterion, opt, scaler, ac, n: int, *, sync_last: bool = True):
        self.model, self.criterion, self.opt, self.scaler, self.ac, self.n = model, criterion, opt, scaler, ac, n
        self.sync_last = sync_last

    def rerun(self, piece, last: bool) -> None:
        xs, ys = piece
        with contextlib.nullcontext() if self.sync_last and last else _no_sync(self.model):
            with self.ac():
                loss2 = self.criterion(self.model(xs), ys)
            _backward(_weighted(loss2, len(ys), self.n), self.scaler)

    def base_step(self) -> None:
        _base_step(self.opt.base_optimizer, self.scaler)

    def skip(self) -> None:
        self.opt.zero_grad()
        if self.scaler is not None:
            # Every rank skips (some may have a finite local gradient): the scaler must record an overflow
            # and back off as after one, through its own step.
            signal_overflow(self.opt.perturbation.params())
            _base_step(self.opt.base_optimizer, self.scaler)
            self.opt.zero_grad()


def _check_accum_steps(accum_steps) -> None:
    if isinstance(accum_steps, bool) or not isinstance(accum_steps, int) or accum_steps < 1:
        raise ValueError(f"accum_steps must be an integer >= 1, got {accum_steps!r}")


def train_step(
    model: nn.Module,
    optimizer,
    criterion,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    m_sharpness: int | None = None,
    scaler=None,
    autocast=None,
    accum_steps: int = 1,
) -> StepResult:
    """One update. ``optimizer`` is an :class:`ASAM`/SAM (with any schedule) or a plain torch optimizer (SGD).

    ``model`` may be wrapped in DistributedDataParallel or sharded with ``fully_shard``; ``m_sharpness`` (m)
    splits the worker's batch into shards of m examples (None or m >= batch: one shard); ``scaler`` is a
    GradScaler for fp16; ``autocast`` a context manager factory (e.g. ``lambda: torch.autocast("cuda",
    torch.bfloat16)``); ``accum_steps`` (N) runs each pass over N micro-batches of ceil(batch / N) examples
    (the update is the same as one batch's, in 1/N of the activation memory). ``y`` may be class indices
    or class probabilities (CutMix), whatever ``criterion`` takes.
    """
    _check_accum_steps(accum_steps)
    ac = autocast if autocast is not None else contextlib.nullcontext
    if scaler is not None and not scaler.is_enabled():
        scaler = None
    n = x.shape[0]
    micro = -(-n // accum_steps)  # ceil: an epoch's short last batch gives fewer micro-batches, none empty
    if not isinstance(optimizer, ASAM):  # plain SGD: one pass
        return _base_update(model, optimizer, criterion, _micro_batches(x, y, micro), scaler, ac)
    per_shard = m_sharpness is not None and m_sharpness < n
    if per_shard and is_fsdp(model):
        raise ValueError(
            "m-sharpness under FSDP: the first-pass gradient is reduce-scattered over all workers, so a "
            "per-shard eps cannot be formed; use DDP for m-sharpness, or m_sharpness=None with FSDP"
        )
    optimizer.schedule.check_mode(sharded="FSDP (fully_shard)" if is_fsdp(model) else None,
                                  per_shard_eps="m_sharpness=" if per_shard else None)
    if per_shard:
        return _update_per_shard(model, optimizer, criterion, x, y, m_sharpness, micro, scaler, ac)
    return _update(model, optimizer, criterion, _micro_batches(x, y, micro), scaler, ac)


def _base_update(model, optimizer, criterion, pieces, scaler, ac) -> StepResult:
    optimizer.zero_grad()
    # Under DDP only the last micro-batch's backward all-reduces the accumulated gradient.
    loss, logits = _first_pass(model, criterion, pieces, scaler, ac, sync_last=True)
    _base_step(optimizer, scaler)
    optimizer.zero_grad()
    return StepResult(loss, logits, False, None)


def _update(model, opt, criterion, pieces, scaler, ac) -> StepResult:
    """The update's sequence (:meth:`fairseq_asam.core.UpdateDriver.finish`) around this step's passes.

    The first pass runs under ``no_sync``: eps comes from this worker's own gradient (per-worker
    m-sharpness); the driver averages g across workers where no second pass runs (what DDP would have
    done), and the policy reads the workers' average, so every worker takes the same decision. Under FSDP
    both passes reduce-scatter: g is global already.
    """
    fsdp = is_fsdp(model)
    reduce = _all_reduce_mean if _distributed() and not fsdp else None
    drv = opt.driver
    opt.zero_grad()
    drv.begin_step()  # a one-pass schedule moves w to w + eps here
    loss, logits = _first_pass(model, criterion, pieces, scaler, ac, driver=drv)
    eps_norm = opt.last_eps_norm if opt.perturbation.perturbed else None
    scale = float(scaler.get_scale()) if scaler is not None else 1.0
    n = sum(len(ys) for _, ys in pieces)
    # DDP averages the second pass's gradient across workers in its last micro-batch.
    result = drv.finish(_VisionUpdate(model, criterion, opt, scaler, ac, n), scale=scale, reduce=reduce)
    opt.zero_grad()
    if result.skipped:
        return StepResult(loss, logits, True, None)
    if result.second_pass:
        eps_norm = opt.last_eps_norm
    return StepResult(loss, logits, False, eps_norm)


def _update_per_shard(model, opt, criterion, x, y, m, micro, scaler, ac) -> StepResult:
    """m-sharpness: the same protocol with one ascent per shard of m examples (the full update only)."""
    params = [p for p in opt.perturbation.params() if p.requires_grad]
    acc = [torch.zeros_like(p) for p in params]  # the averaged second-pass gradient
    n = x.shape[0]
    losses, logits_all, ok, eps_norm = [], [], True, None
    drv = opt.driver
    opt.zero_grad()
    drv.begin_step()
    for xs, ys in zip(x.split(m), y.split(m)):
        # A shard larger than a micro-batch is accumulated over micro-batches; its eps is still its own.
        pieces = _micro_batches(xs, ys, micro)
        # Every pass runs under no_sync: shards must not all-reduce; the average is reduced once below.
        loss, logits = _first_pass(model, criterion, pieces, scaler, ac, driver=drv)
        losses.append(loss * xs.shape[0])
        logits_all.append(logits)
        if not opt.ascent_step():
            ok = False
            break
        eps_norm = opt.last_eps_norm
        drv.second_pass(_VisionUpdate(model, criterion, opt, scaler, ac, xs.shape[0], sync_last=False))
        opt.restore()
        w = xs.shape[0] / n
        with torch.no_grad():
            for a, p in zip(acc, params):
                if p.grad is not None:
                    a.add_(p.grad, alpha=w)
        opt.zero_grad()
    loss_mean = torch.stack(losses).sum() / sum(len(t) for t in logits_all)
    logits_cat = torch.cat(logits_all)
    if not _all_ranks_true(ok, x.device):
        drv.skip_step()
        _VisionUpdate(model, criterion, opt, scaler, ac, n).skip()
        return StepResult(loss_mean, logits_cat, True, None)
    with torch.no_grad():
        _all_reduce_mean(acc)
        for a, p in zip(acc, params):
            p.grad = a
    opt.end_step()
    _base_step(opt.base_optimizer, scaler)
    opt.zero_grad()
    return StepResult(loss_mean, logits_cat, False, eps_norm)
