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

from .. import _compat
from ..core import ASAM
from ..replay import random_state, set_random_state
from .fsdp import is_fsdp

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


def _skip(opt, scaler):
    opt.skip_step()
    if scaler is not None and scaler.is_enabled():
        # Back off exactly as scaler.update() does after an overflow: lower the scale *and* restart its growth
        # count (update(new_scale) sets the scale only, so the next good steps grew it straight back). The
        # skipped step recorded no inf check, and on some ranks the local gradient may even be finite (every
        # rank must take the same decision), so record one through the public API: an inf gradient on the
        # smallest parameter, unscale_, update.
        params = [p for g in opt.base_optimizer.param_groups for p in g["params"] if p.requires_grad]
        smallest = min(params, key=lambda p: p.numel())
        smallest.grad = torch.full_like(smallest, float("inf"))
        scaler.unscale_(opt.base_optimizer)
        scaler.update()
        opt.zero_grad()


def _micro_batches(x, y, size: int) -> list:
    return list(zip(x.split(size), y.split(size)))


def _weighted(loss, k: int, n: int):
    # A micro-batch's mean loss times its share k/n of the examples: the accumulated gradient is the mean
    # over all n, what one batch of n gives. k == n (no accumulation) leaves the graph as it was.
    return loss if k == n else loss * (k / n)


def _first_pass(model, criterion, pieces, scaler, ac, *, sync_last: bool = False):
    """Forward/backward at w over the micro-batches, under no_sync (eps is this worker's own); with
    ``sync_last`` the last micro-batch's backward all-reduces (a plain one-pass update under DDP).

    Returns (the random state before each forward, the mean loss over all examples, the logits).
    """
    n = sum(len(ys) for _, ys in pieces)
    states, losses, logits = [], [], []
    for i, (xs, ys) in enumerate(pieces):
        states.append(random_state(xs.device))
        with contextlib.nullcontext() if sync_last and i == len(pieces) - 1 else _no_sync(model):
            with ac():
                out = model(xs)
                loss = criterion(out, ys)
            _backward(_weighted(loss, len(ys), n), scaler)
        losses.append(loss.detach())
        logits.append(out.detach())
    if len(pieces) == 1:
        return states, losses[0], logits[0]
    loss = sum(ls * len(ys) for ls, (_, ys) in zip(losses, pieces)) / n
    return states, loss, torch.cat(logits)


def _second_pass(model, criterion, pieces, states, scaler, ac, *, sync_last: bool) -> None:
    """Forward/backward at w + eps over the same micro-batches, each with its first pass's random state.

    ``sync_last``: under DDP the last micro-batch's backward all-reduces the accumulated gradient; the
    others (and all of them when False) run under no_sync. BatchNorm statistics are left alone.
    """
    n = sum(len(ys) for _, ys in pieces)
    after_first = random_state(pieces[0][0].device)
    try:
        for i, ((xs, ys), state) in enumerate(zip(pieces, states)):
            set_random_state(state)  # ShakeDrop/dropout: the draws of this micro-batch's first pass
            sync = sync_last and i == len(pieces) - 1
            with contextlib.nullcontext() if sync else _no_sync(model):
                with frozen_bn_stats(model), ac():
                    loss2 = criterion(model(xs), ys)
                _backward(_weighted(loss2, len(ys), n), scaler)
    finally:
        # Training continues from where one pass would have left the generators (next batch's draws).
        set_random_state(after_first)


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
    _, loss, logits = _first_pass(model, criterion, pieces, scaler, ac, sync_last=True)
    _base_step(optimizer, scaler)
    optimizer.zero_grad()
    return StepResult(loss, logits, False, None)


def _update(model, opt, criterion, pieces, scaler, ac) -> StepResult:
    """The update protocol (fairseq_asam.core.update) around this step's passes, for every schedule.

    The first pass runs under ``no_sync``: eps comes from this worker's own gradient (per-worker
    m-sharpness). When the schedule runs no second pass, that gradient is averaged across workers here
    (one flat all-reduce, what DDP would have done), and the schedule reads the workers' average, so every
    worker takes the same decision. Under FSDP both passes reduce-scatter: g is global already.
    """
    fsdp = is_fsdp(model)
    reduce = _all_reduce_mean if _distributed() and not fsdp else None
    opt.zero_grad()
    opt.begin_step()  # a one-pass schedule moves w to w + eps here
    states, loss, logits = _first_pass(model, criterion, pieces, scaler, ac)
    eps_norm = opt.last_eps_norm if opt.perturbation.perturbed else None
    scale = float(scaler.get_scale()) if scaler is not None else 1.0
    if opt.wants_second_pass(scale=scale, reduce=reduce):
        ok = opt.ascent_step()
        if not fsdp:  # under FSDP the norm is global already: the same answer on every rank
            ok = _all_ranks_true(ok, logits.device)
        if not ok:
            _skip(opt, scaler)
            return StepResult(loss, logits, True, None)
        eps_norm = opt.last_eps_norm
        _second_pass(model, criterion, pieces, states, scaler, ac, sync_last=True)  # DDP averages across workers
    elif reduce is not None:
        with torch.no_grad():
            reduce([t.grad for t in opt.perturbation.params() if t.grad is not None])
    opt.end_step(reduce=reduce)
    _base_step(opt.base_optimizer, scaler)
    opt.zero_grad()
    return StepResult(loss, logits, False, eps_norm)


def _update_per_shard(model, opt, criterion, x, y, m, micro, scaler, ac) -> StepResult:
    """m-sharpness: the same protocol with one ascent per shard of m examples (the full update only)."""
    params = [p for p in opt.perturbation.params() if p.requires_grad]
    acc = [torch.zeros_like(p) for p in params]  # the averaged second-pass gradient
    n = x.shape[0]
    losses, logits_all, ok, eps_norm = [], [], True, None
    opt.zero_grad()
    opt.begin_step()
    for xs, ys in zip(x.split(m), y.split(m)):
        # A shard larger than a micro-batch is accumulated over micro-batches; its eps is still its own.
        pieces = _micro_batches(xs, ys, micro)
        # Every pass runs under no_sync: shards must not all-reduce; the average is reduced once below.
        states, loss, logits = _first_pass(model, criterion, pieces, scaler, ac)
        losses.append(loss * xs.shape[0])
        logits_all.append(logits)
        if not opt.ascent_step():
            ok = False
            break
        eps_norm = opt.last_eps_norm
        _second_pass(model, criterion, pieces, states, scaler, ac, sync_last=False)
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
        _skip(opt, scaler)
        return StepResult(loss_mean, logits_cat, True, None)
    with torch.no_grad():
        _all_reduce_mean(acc)
        for a, p in zip(acc, params):
            p.grad = a
    opt.end_step()
    _base_step(opt.base_optimizer, scaler)
    opt.zero_grad()
    return StepResult(loss_mean, logits_cat, False, eps_norm)
