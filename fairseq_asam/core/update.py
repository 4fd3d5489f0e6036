"""The update protocol: the one sequence of calls every front end runs for a sharpness-aware update.

One update (Kwon et al., ICML 2021, Section 4, with a cheaper-update policy of :mod:`fairseq_asam.schedule`):

1. :meth:`UpdateDriver.begin` before the first forward (a one-pass policy moves w to w + eps here);
2. the first forward/backward (over all micro-batches, without a cross-worker reduction where the
   front end can avoid one);
3. :meth:`UpdateDriver.wants_second_pass` with the update's gradient g: w goes back to w if step 1 moved
   it, and the policy decides;
4. where it said yes: :meth:`UpdateDriver.ascend` (w -> w + eps from ``.grad``) and the second
   forward/backward at w + eps;
5. :meth:`UpdateDriver.end` with the gradient the base optimizer will use: w restored bit for bit,
   the policy's gradient rule, its counters; then the front end's base step (``optimizer.step()``, a
   GradScaler's ``scaler.step(base)``, fairseq's optimizer step).

:meth:`UpdateDriver.skip` replaces 4-5 when the gradient is not finite. A loop that calls
:meth:`ascend` without asking (the paper's loop: ``ascent_step()``/``descent_step()``) is the full
update; with a policy that skips second passes it is refused at its first call (the policy says so), so
it is never silently a different update. The front ends pass what differs between them: the
gradients to use, the scale they carry (a GradScaler's, fairseq's pending factor), a reduction across
workers, and where the base optimizer's momentum lives. None of them knows which policy it holds. The
:class:`~fairseq_asam.ASAM` shell runs this sequence in ``step(closure)`` and in its manual-loop
methods; the fairseq task and the vision step run it around their own passes::

    python -c "import torch; from fairseq_asam import ASAM; from fairseq_asam.schedule import EveryK; \\
m = torch.nn.Linear(4, 2); o = ASAM(m.named_parameters(), torch.optim.SGD(m.parameters(), lr=0.1), rho=0.5, \\
schedule=EveryK(2)); x = torch.randn(8, 4); f = lambda: (o.zero_grad(), m(x).square().mean().backward()); \\
[o.step(lambda: f()) for _ in range(4)]; print(o.schedule.second_passes, 'of', o.schedule.updates)"
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

from ..schedule import Full, Reduce, Schedule
from .perturb import Perturbation

__all__ = ["UpdateDriver"]

Directions = Sequence[Tensor | None] | Callable[[], Sequence[Tensor | None]]


class UpdateDriver:
    """Runs one policy's updates on one perturbation object, in the order of the protocol above.

    Args:
        perturbation: the :class:`~fairseq_asam.core.Perturbation` over the parameters the forward uses.
        schedule: the policy (default :class:`~fairseq_asam.schedule.Full`, the paper's update).
        momenta: where the base optimizer's momentum lives: a callable returning one tensor (or None)
            per parameter in ``perturbation.param_groups`` order; read only by a policy that asks for it.
        grads: the gradients the policy reads when a call passes none (default: each parameter's ``.grad``).
    """

    def __init__(self, perturbation: Perturbation, schedule: Schedule | None = None, *,
                 momenta: Callable[[], Sequence[Tensor | None]] | None = None,
                 grads: Callable[[], list[Tensor | None]] | None = None):
        if schedule is not None and not isinstance(schedule, Schedule):
            raise TypeError(f"schedule= must be a fairseq_asam.schedule.Schedule (EveryK(5), ...), got {schedule!r}")
        self.perturbation = perturbation
        self.schedule = schedule if schedule is not None else Full()
        self.momenta = momenta
        self._grads = grads or self._param_grads
        self._second_pass: bool | None = None  # this update's decision; None: not asked
        self._skipped = False

    def _param_grads(self) -> list[Tensor | None]:
        return [t.grad for t in self.perturbation.params()]

    # -- the protocol, in order ------------------------------------------------------------------

    def begin(self, directions: Directions | None = None) -> bool:
        """An update starts: a perturbation left by an abandoned update (an overflow fairseq retried, an
        exception) is undone, then the policy may move w to w + eps (returns True when it did).

        ``directions``: the base optimizer's momentum (tensors, or a callable returning them) when it
        is not where ``momenta`` says.
        """
        self.perturbation.restore()
        self._second_pass = None
        self._skipped = False
        return self.schedule.begin(self.perturbation, directions if directions is not None else self.momenta)

    def wants_second_pass(self, grads: Sequence[Tensor | None] | None = None, *, scale: float = 1.0,
                          reduce: Reduce | None = None) -> bool:
        """After the first backward: w goes back to w (if :meth:`begin` moved it), the policy decides.

        ``grads``: the update's gradient g, one per parameter (default ``.grad``); ``scale``: the factor
        they carry (divided out where a policy reads a norm); ``reduce``: averages tensors in place across
        workers, when each worker holds its own g. True: run :meth:`ascend` and the second pass.
        """
        self.perturbation.restore()
        grads = self._grads() if grads is None else list(grads)
        self._second_pass = bool(self.schedule.wants_second_pass(grads, scale=scale, reduce=reduce))
        return self._second_pass

    def ascend(self, set_to_none: bool = True) -> bool:
        """w -> w + eps from the gradients in ``.grad`` (consumed). False: g is not finite, the weights are
        untouched and the update must be skipped (:meth:`skip`).

        Called without :meth:`wants_second_pass` (the paper's two-pass loop), the update is a full one;
        a policy that skips second passes refuses that at once.
        """
        if self._second_pass is None:
            self.schedule.check_full_update()
            self._second_pass = True
        elif not self._second_pass:
            raise RuntimeError("ascend() on an update the policy runs without the second pass "
                               f"({self.schedule!r} said no): call end() and step the base optimizer")
        ok = self.perturbation.ascend(set_to_none)
        self._skipped = self._skipped or not ok
        return ok

    def end(self, grads: Sequence[Tensor | None] | None = None, *, reduce: Reduce | None = None) -> bool:
        """Right before the base optimizer's step: w restored bit for bit, the policy's gradient rule on
        ``grads`` (the gradient the base optimizer steps with; default ``.grad``), its counters.

        Returns False (nothing counted) when this update's ascent found a non-finite gradient: the
        caller skips the base step, as after :meth:`skip`.
        """
        self.perturbation.restore()
        if self._skipped:
            self._second_pass, self._skipped = None, False
            return False
        grads = self._grads() if grads is None else list(grads)
        self.schedule.before_descent(grads, bool(self._second_pass), reduce=reduce)
        self._second_pass = None
        return True

    def skip(self) -> None:
        """Abandon this update (non-finite gradient): w restored, nothing counted."""
        self.perturbation.restore()
        self._second_pass, self._skipped = None, False

    def restore(self) -> None:
        """w restored bit for bit, the update still open (a front end that reduces g' before :meth:`end`)."""
        self.perturbation.restore()

    def __repr__(self) -> str:
        return f"UpdateDriver({self.perturbation!r}, {self.schedule!r})"
