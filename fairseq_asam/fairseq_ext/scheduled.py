"""The cheaper-update schedule (:mod:`fairseq_asam.schedule`) inside fairseq's two-pass update.

The task (``task.py``) calls four hooks; everything that depends on fairseq's optimizer wrappers is here:

- :func:`begin_update` before the first micro-batch's forward: a one-pass policy moves w to w + eps;
- :func:`decide` in ``optimizer_step``, on the update's final gradient (all-reduced, normalised, clipped
  by the Trainer): restores a one-pass perturbation, returns whether the ascent and second pass run;
- :func:`before_descent` right before Adam's step: the policy's gradient rule (Look-ASAM) and counters;
- :func:`log` the metrics: ``second_pass`` (1/0 per update, averaged over the log interval: the
  fraction of the interval's updates that ran it) and ``second_pass_frac`` (since the start of training).

The gradient a schedule reads is the one Adam steps with: the model's grads, or under ``--fp16`` the
fp32 master grads (split per parameter when fairseq flattened them), aligned with the model's trainable
parameters. They may still carry fairseq's pending fp16 factor (loss scale, 1 / sample size, clip
coefficient); the policies' rules are invariant to a common factor, and the adaptive trigger divides
it out of ||g||^2.
"""

from fairseq import metrics
from fairseq.optim.fp16_optimizer import FP16Optimizer, MemoryEfficientFP16Optimizer

from .. import _compat

__all__ = ["begin_update", "before_descent", "decide", "descent_grads", "log"]


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


def _momenta(sam, optimizer, model):
    """Adam's first moments (exp_avg) per trainable model parameter; None where there is none yet."""
    state = sam.optimizer.state  # the torch Adam inside fairseq's optimizer (over the masters under --fp16)
    masters = _masters(optimizer, model)
    if masters is None:
        return [state.get(p, {}).get("exp_avg") for p in model.parameters() if p.requires_grad]
    return [_view(state.get(m, {}).get("exp_avg"), off, shape) for m, off, shape in masters]


def _grad_factor(optimizer) -> float:
    if isinstance(optimizer, (FP16Optimizer, MemoryEfficientFP16Optimizer)):
        f = _compat.fp16_multiply_factor(optimizer)
        return float(f) if f is not None else 1.0
    return 1.0


def begin_update(sam, optimizer, model) -> None:
    """A new update starts (the Trainer zeroed the grads): undo a perturbation left by an update fairseq
    skipped (fp16 overflow, OOM), then let a one-pass policy perturb w before the first forward."""
    schedule = sam.schedule
    if not schedule.one_pass:
        return
    pert = sam.perturber(model)
    pert.restore()
    dirs = _momenta(sam, optimizer, model) if schedule.direction == "momentum" else None
    schedule.before_forward(pert, directions=dirs)


def decide(sam, optimizer, model) -> bool:
    """True: this update runs the ascent and the second pass. Restores a one-pass perturbation first."""
    schedule = sam.schedule
    if schedule.one_pass:
        sam.perturber(model).restore()  # the gradient just taken at w + eps is the update's gradient
        return False
    factor = _grad_factor(optimizer)
    return schedule.wants_second_pass(descent_grads(optimizer, model), scale=1.0 / factor if factor else 1.0)


def before_descent(sam, optimizer, model, second_pass: bool) -> None:
    sam.schedule.before_descent(descent_grads(optimizer, model), second_pass)


def log(sam) -> None:
    s = sam.schedule
    metrics.log_scalar("second_pass", float(s.last_second_pass), weight=1, priority=21, round=2)
    metrics.log_scalar("second_pass_frac", s.fraction, weight=1, priority=22, round=3)
