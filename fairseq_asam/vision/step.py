"""One training update for SGD, SAM and ASAM (paper Section 4, Algorithm 1), with m-sharpness, DDP and AMP.

The perturbation itself is the core's :class:`~fairseq_asam.core.Perturbation` (``opt.perturbation`` of an
ASAM/SAM optimizer); this module only decides what the two passes see, and steps the base optimizer
itself because the fp16 GradScaler must unscale and step it (``scaler.step(opt.base_optimizer)``):

* m-sharpness (Foret et al. 2021, Section 4.1; the paper uses m = 32 for PyramidNet and 128 on ImageNet):
  each shard of m examples of the worker's batch gets its own eps from its own gradient. Per shard:
  first-pass grad, ``ascent_step()``, second-pass grad at w + eps_shard, ``restore()``; the second-pass
  grads are averaged (weighted by shard size) and the base optimizer steps once.
* DDP: the first pass runs under ``no_sync()``, so eps is per worker (no all-reduce); the second-pass
  gradients are averaged across workers.
* BatchNorm: the second forward pass normalizes with the batch's statistics, like the first, but does
  not fold them into the running statistics (they would describe weights w + eps that are never kept).
* fp16: one GradScaler. The first-pass gradients stay scaled: eps is invariant to scaling the gradient
  (p = 2 divides by its norm, p = inf takes its sign), so they need no unscale; a non-finite first-pass
  gradient makes ``ascent_step()`` return False and the update is skipped on every rank, with the scale
  backed off. The second-pass gradients are unscaled once, by ``scaler.step``.

    python -c "import torch; from fairseq_asam import ASAM; from fairseq_asam.vision.step import train_step; \
m = torch.nn.Linear(4, 3); b = torch.optim.SGD(m.parameters(), lr=0.1); \
o = ASAM(m.named_parameters(), b, rho=0.5); \
print(train_step(m, o, torch.nn.CrossEntropyLoss(), torch.randn(8, 4), torch.randint(3, (8,)), m_sharpness=4))"
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .. import _compat
from ..core import ASAM
from ..schedule import Full

__all__ = ["StepResult", "frozen_bn_stats", "train_step"]


@dataclass
class StepResult:
    loss: torch.Tensor  # first-pass loss at w (mean over the worker's batch), detached
    logits: torch.Tensor  # first-pass logits, detached (for the training accuracy)
    skipped: bool  # True when the update was skipped (non-finite gradient)
    eps_norm: torch.Tensor | None  # ||eps||_2 of the last shard's perturbation


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module):
    """BatchNorm layers in training mode use batch statistics but leave running_mean/var/num_batches alone.

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


def _is_ddp(model) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def _no_sync(model):
    return model.no_sync() if _is_ddp(model) else contextlib.nullcontext()


def _all_ranks_true(flag: bool, device) -> bool:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], device=device, dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _all_reduce_mean(tensors) -> None:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1 or not tensors:
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


def _skip(opt, scaler):
    opt.perturbation.restore()
    opt.zero_grad()
    if scaler is not None and scaler.is_enabled():
        # What scaler.update() does after an inf: back off. Done by hand because the skipped step recorded
        # no inf check, and every rank must take the same decision.
        scaler.update(scaler.get_scale() * scaler.get_backoff_factor())


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
) -> StepResult:
    """One update. ``optimizer`` is an :class:`ASAM`/SAM (two passes) or a plain torch optimizer (SGD).

    ``model`` may be wrapped in DistributedDataParallel; ``m_sharpness`` (m) splits the worker's batch
    into shards of m examples (None or m >= batch: one shard); ``scaler`` is a GradScaler for fp16;
    ``autocast`` a context manager factory (e.g. ``lambda: torch.autocast("cuda", torch.bfloat16)``).
    """
    ac = autocast if autocast is not None else contextlib.nullcontext
    if scaler is not None and not scaler.is_enabled():
        scaler = None
    if not isinstance(optimizer, ASAM):  # plain SGD: one pass
        optimizer.zero_grad()
        with ac():
            logits = model(x)
            loss = criterion(logits, y)
        _backward(loss, scaler)
        _base_step(optimizer, scaler)
        optimizer.zero_grad()
        return StepResult(loss.detach(), logits.detach(), False, None)

    n = x.shape[0]
    if not isinstance(optimizer.schedule, Full):
        if m_sharpness is not None and m_sharpness < n:
            raise ValueError("m-sharpness (--m) runs with the full update only; drop --m or the cheaper schedule")
        return _scheduled_step(model, optimizer, criterion, x, y, scaler, ac)
    if m_sharpness is None or m_sharpness >= n:
        return _two_pass(model, optimizer, criterion, x, y, scaler, ac)
    return _two_pass_sharded(model, optimizer, criterion, x, y, m_sharpness, scaler, ac)


def _two_pass(model, opt, criterion, x, y, scaler, ac) -> StepResult:
    opt.zero_grad()
    with _no_sync(model), ac():  # eps from this worker's gradient only (per-worker m-sharpness)
        logits = model(x)
        loss = criterion(logits, y)
    with _no_sync(model):
        _backward(loss, scaler)
    pert = opt.perturbation
    ok = _all_ranks_true(pert.ascend(), x.device)
    if not ok:
        _skip(opt, scaler)
        return StepResult(loss.detach(), logits.detach(), True, None)
    eps_norm = pert.last_eps_norm
    with frozen_bn_stats(model), ac():
        loss2 = criterion(model(x), y)
    _backward(loss2, scaler)  # DDP averages these grads across workers
    pert.restore()
    _base_step(opt.base_optimizer, scaler)
    opt.zero_grad()
    return StepResult(loss.detach(), logits.detach(), False, eps_norm)


def _two_pass_sharded(model, opt, criterion, x, y, m, scaler, ac) -> StepResult:
    params = [p for g in opt.base_optimizer.param_groups for p in g["params"] if p.requires_grad]
    acc = [torch.zeros_like(p) for p in params]  # the averaged second-pass gradient
    n = x.shape[0]
    losses, logits_all, ok, eps_norm = [], [], True, None
    opt.zero_grad()
    for xs, ys in zip(x.split(m), y.split(m)):
        # Every pass runs under no_sync: shards must not all-reduce; the average is reduced once below.
        with _no_sync(model):
            with ac():
                logits = model(xs)
                loss = criterion(logits, ys)
            _backward(loss, scaler)
            losses.append(loss.detach() * xs.shape[0])
            logits_all.append(logits.detach())
            if not opt.perturbation.ascend():
                ok = False
                break
            eps_norm = opt.perturbation.last_eps_norm
            with frozen_bn_stats(model), ac():
                loss2 = criterion(model(xs), ys)
            _backward(loss2, scaler)
        opt.perturbation.restore()
        w = xs.shape[0] / n
        with torch.no_grad():
            for a, p in zip(acc, params):
                if p.grad is not None:
                    a.add_(p.grad, alpha=w)
        opt.zero_grad()
    loss_mean = torch.stack(losses).sum() / sum(len(t) for t in logits_all)
    logits_cat = torch.cat(logits_all)
    if not _all_ranks_true(ok, x.device):
        _skip(opt, scaler)
        return StepResult(loss_mean, logits_cat, True, None)
    with torch.no_grad():
        _all_reduce_mean(acc)
        for a, p in zip(acc, params):
            p.grad = a
    _base_step(opt.base_optimizer, scaler)
    opt.zero_grad()
    return StepResult(loss_mean, logits_cat, False, eps_norm)


def _scheduled_step(model, opt, criterion, x, y, scaler, ac) -> StepResult:
    """One update under a cheaper schedule (:mod:`fairseq_asam.schedule`): the schedule decides from the
    first pass's gradient whether the second pass runs; otherwise the base optimizer steps with g.

    The first pass runs under ``no_sync`` as in the full update; when no second pass follows, its
    gradient is averaged across workers here (one flat all-reduce, what DDP would have done), and the
    schedule's statistics are averaged too so every worker takes the same decision.
    """
    sched, pert = opt.schedule, opt.perturbation
    params = [t for g in opt.param_groups for t in g["params"]]
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    reduce = _all_reduce_mean if distributed else None
    opt.zero_grad()
    sched.before_forward(pert, opt.base_optimizer)  # one-pass: w -> w + eps before the only pass
    with _no_sync(model), ac():
        logits = model(x)
        loss = criterion(logits, y)
    with _no_sync(model):
        _backward(loss, scaler)
    eps_norm = None
    if sched.one_pass:
        eps_norm = pert.last_eps_norm if pert.perturbed else None
        pert.restore()
        second = False
    else:
        scale = float(scaler.get_scale()) if scaler is not None else 1.0
        second = sched.wants_second_pass([t.grad for t in params], scale=scale, reduce=reduce)
    if second:
        if not _all_ranks_true(pert.ascend(), x.device):
            _skip(opt, scaler)
            return StepResult(loss.detach(), logits.detach(), True, None)
        eps_norm = pert.last_eps_norm
        with frozen_bn_stats(model), ac():
            loss2 = criterion(model(x), y)
        _backward(loss2, scaler)  # DDP averages these grads across workers
        pert.restore()
    else:
        with torch.no_grad():
            _all_reduce_mean([t.grad for t in params if t.grad is not None])
    sched.before_descent([t.grad for t in params], second, reduce=reduce)
    _base_step(opt.base_optimizer, scaler)
    opt.zero_grad()
    return StepResult(loss.detach(), logits.detach(), False, eps_norm)
