"""fairseq's side of the update protocol (:mod:`fairseq_asam.core.update`): where the gradients and Adam's
momentum live behind fairseq's optimizer wrappers.

The optimizer builds the update's driver with :func:`descent_grads` and :func:`momenta`
(``FairseqSharpnessAdam.build_driver``); the task holds it and runs each update through it, reading the
update's final gradient (all-reduced, normalised, clipped by the Trainer) with the factor of
:func:`grad_scale`; :func:`log` writes the metrics ``second_pass`` (1/0 per update, averaged over the log
interval) and ``second_pass_frac`` (since the start of training).

The gradient a policy reads is the one Adam steps with: the model's grads, or under ``--fp16`` the fp32
master grads (split per parameter when fairseq flattened them), aligned with the model's trainable
parameters. They may still carry fairseq's pending fp16 factor (loss scale, 1 / sample size, clip
coefficient), passed to the protocol as their scale.
"""

from fairseq import metrics
from fairseq.optim.fp16_optimizer import FP16Optimizer, MemoryEfficientFP16Optimizer

from .. import _compat

__all__ = ["descent_grads", "grad_scale", "log", "momenta"]


def _masters(optimizer, model):
    """[(master tensor, offset, shape) per trainable model parameter] under FP16Optimizer, else None."""
    if not isinstance(optimizer, FP16Optimizer):
        return None
    params = [p for p in model.parameters() if p.requires_grad]
    fp32 = optimizer.fp32_params
    if isinstance(fp32, dict):  # flattened: one flat master per device, parameters in order
        offsets, out = {}, []
        for p in params:
            key = p.device.index
            off = offsets.get(key, 0)
            out.append((fp32[key], off, p.shape))
            offsets[key] = off + p.numel()
        return out
    return [(m, None, p.shape) for m, p in zip(fp32, params)]


def _view(t, off, shape):
    if t is None:
        return None
    return t if off is None else t[off: off + shape.numel()].view(shape)


def descent_grads(optimizer, model):
    """The gradients Adam will step with, one per trainable model parameter (views where flattened)."""
    masters = _masters(optimizer, model)
    if masters is None:
        return [p.grad for p in model.parameters() if p.requires_grad]
    return [_view(m.grad, off, shape) for m, off, shape in masters]


def momenta(sam, optimizer, model):
    """Adam's first moments (exp_avg) per trainable model parameter; None where there is none yet."""
    state = sam.optimizer.state  # the torch Adam inside fairseq's optimizer (over the masters under --fp16)
    masters = _masters(optimizer, model)
    if masters is None:
        return [state.get(p, {}).get("exp_avg") for p in model.parameters() if p.requires_grad]
    return [_view(state.get(m, {}).get("exp_avg"), off, shape) for m, off, shape in masters]


def grad_scale(optimizer) -> float:
    """The factor fairseq's pending fp16 multiply leaves on the gradients (1 without --fp16)."""
    if isinstance(optimizer, (FP16Optimizer, MemoryEfficientFP16Optimizer)):
        f = _compat.fp16_multiply_factor(optimizer)
        f = float(f) if f is not None else 1.0
        return 1.0 / f if f else 1.0
    return 1.0


def log(sam) -> None:
    s = sam.schedule
    metrics.log_scalar("second_pass", float(s.last_second_pass), weight=1, priority=21, round=2)
    metrics.log_scalar("second_pass_frac", s.fraction, weight=1, priority=22, round=3)
