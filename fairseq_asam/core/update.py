"""The update's sequence, written once: every front end runs a sharpness-aware update through :class:`UpdateDriver`.

One update (Kwon et al., ICML 2021, Section 4, with a cheaper-update policy of :mod:`fairseq_asam.schedule`):

1. :meth:`UpdateDriver.begin_step` before the first forward (a one-pass policy moves w to w + eps here);
2. the first forward/backward over the update's micro-batches, each inside
   :meth:`UpdateDriver.first_pass`, which records it with the random state its forward draws from;
3. :meth:`UpdateDriver.finish` with the front end's :class:`UpdateAdapter`, which runs the rest:
   the policy's decision on the update's gradient g (:meth:`~UpdateDriver.wants_second_pass`), the
   ascent w -> w + eps (:meth:`~UpdateDriver.ascent_step`) or the skip of an update whose g is not
   finite, the second forward/backward over *every* recorded micro-batch with its first pass's random
   state (the same dropout masks) and BatchNorm's running statistics left alone, the exact restore of
   w, the policy's gradient rule (:meth:`~UpdateDriver.end_step`), then the adapter's base step.

A front end hands :meth:`UpdateDriver.finish` only what differs: how to run one recorded micro-batch's
forward/backward again (:meth:`UpdateAdapter.rerun`), what a skipped update does there
(:meth:`UpdateAdapter.skip`: a GradScaler's inf through :func:`signal_overflow`, fairseq's overflow), and
its base step (:meth:`UpdateAdapter.base_step`); optional hooks let fairseq rescale fp16 gradients
before the ascent and reduce/clip g' after the restore. ``opt.step(closure)``, the vision step, the
fairseq task, the Hugging Face Trainer and the Lightning module all run this one sequence, and none of
them knows which policy it holds. The protocol's steps keep one name each, in the shell
(:class:`~fairseq_asam.ASAM`), here and in the policies: ``begin_step``, ``wants_second_pass``,
``ascent_step``, ``end_step``, ``skip_step``. Runs as is::

    python -c "import torch; from fairseq_asam import ASAM; from fairseq_asam.schedule import EveryK; \\
m = torch.nn.Linear(4, 2); o = ASAM(m.named_parameters(), torch.optim.SGD(m.parameters(), lr=0.1), rho=0.5, \\
schedule=EveryK(2)); x = torch.randn(8, 4); f = lambda: (o.zero_grad(), m(x).square().mean().backward()); \\
[o.step(lambda: f()) for _ in range(4)]; print(o.schedule.second_passes, 'of', o.schedule.updates)"
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..batchnorm import frozen_bn_stats
from ..replay import random_state, set_random_state
from ..schedule import Full, Reduce, Schedule
from .perturb import Perturbation

__all__ = ["UpdateAdapter", "UpdateDriver", "UpdateResult", "signal_overflow"]

Directions = Sequence[Tensor | None] | Callable[[], Sequence[Tensor | None]]


class UpdateAdapter:
    """What one front end does differently in an update; :meth:`UpdateDriver.finish` calls it.

    :meth:`rerun` and :meth:`base_step` are each front end's own; the other hooks do nothing by default.
    ``model``: the module the passes run (its BatchNorm layers keep their running statistics during the
    second pass); None when the front end has none to give.
    """

    model: nn.Module | None = None

    def rerun(self, item: Any, last: bool) -> None:
        """One recorded micro-batch's forward/backward again, at w + eps (``item`` as given to
        :meth:`UpdateDriver.first_pass`; ``last``: the update's last micro-batch, where DDP all-reduces)."""
        raise NotImplementedError

    def base_step(self) -> None:
        """The base optimizer's step with the gradient the update ends with (through a GradScaler, fairseq's
        optimizer wrappers ...); a no-op where the trainer steps the optimizer itself afterwards."""
        raise NotImplementedError

    def skip(self) -> None:
        """A skipped update (g not finite): w is restored and the gradients are dropped already; what the
        front end's trainer does after an overflow (e.g. :func:`signal_overflow`, then the base step)."""

    def overflowed(self) -> bool:
        """True when the front end already knows the first pass overflowed (fairseq's ``--amp``)."""
        return False

    def before_ascent(self) -> None:
        """Right before w -> w + eps (fairseq rescales its fp16 gradients here)."""

    def after_ascent(self) -> None:
        """Right after w -> w + eps, once per update."""

    def before_second_pass(self) -> None:
        """Before each run of the second pass (zero the front end's own gradient state)."""

    def second_pass_ok(self) -> bool:
        """After the second pass at w + eps: False runs it again (an overflow retried at a lower loss scale)."""
        return True

    def after_second_pass(self) -> None:
        """After w is restored, before the policy's gradient rule (fairseq reduces and clips g' here)."""


@dataclass
class UpdateResult:
    """What :meth:`UpdateDriver.finish` did: ``second_pass`` (the ascent and the second pass ran),
    ``skipped`` (g was not finite: no base step of the update's own), ``times`` (seconds per phase, when
    a clock was given: ascent, second, restore, after_second, base_step)."""

    second_pass: bool
    skipped: bool
    times: dict[str, float] = field(default_factory=dict)


@dataclass
class _Record:
    item: Any
    state: dict  # the random state before this micro-batch's first forward
    device: torch.device | str | None


def signal_overflow(params: Sequence[Tensor]) -> None:
    """An inf gradient on the smallest of ``params``: a GradScaler's next ``unscale_``/``step`` finds it, skips
    the optimizer step and backs off its scale with its growth count restarted, exactly as after an fp16
    overflow (``scaler.update(new_scale)`` would set the scale only). The public way to make a GradScaler
    (torch's, Accelerate's, Lightning's) skip an update every rank must skip."""
    smallest = min((p for p in params if p.requires_grad), key=lambda p: p.numel())
    smallest.grad = torch.full_like(smallest, float("inf"))


class _Clock:
    def __init__(self, clock: Callable[[], float] | None):
        self.clock = clock
        self.times: dict[str, float] = {}
        self._last = clock() if clock is not None else 0.0

    def mark(self, phase: str) -> None:
        if self.clock is not None:
            now = self.clock()
            self.times[phase] = now - self._last
            self._last = now


class UpdateDriver:
    """Runs one policy's updates on one perturbation object: the update's sequence, for every front end.

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
        self._records: list[_Record] = []  # this update's micro-batches, in first-pass order
        self._manual: _Record | None = None  # begin_step(record=True): a loop that runs its passes itself
        self._after_first: dict | None = None  # the random state the first pass left, put back at the end
        self._replaying = False

    def _param_grads(self) -> list[Tensor | None]:
        return [t.grad for t in self.perturbation.params()]

    # -- the protocol, in order ------------------------------------------------------------------

    def begin_step(self, directions: Directions | None = None, *, record: bool = False) -> bool:
        """An update starts: a perturbation or records left by an abandoned update (an overflow fairseq
        retried, an exception) are dropped, then the policy may move w to w + eps (returns True when it did).

        ``directions``: the base optimizer's momentum (tensors, or a callable returning them) when it is not
        where ``momenta`` says. ``record=True`` (the shell's manual loop): the random state is saved here
        and replayed by :meth:`ascent_step` for the loop's own second forward.
        """
        self.perturbation.restore()
        self._second_pass = None
        self._skipped = False
        self._records = []
        self._manual = _Record(None, random_state(), None) if record else None
        self._after_first = None
        return self.schedule.begin_step(self.perturbation, directions if directions is not None else self.momenta)

    @contextlib.contextmanager
    def first_pass(self, item: Any = None, *, device: torch.device | str | None = None) -> Iterator[None]:
        """Around one micro-batch's first forward/backward: records ``item`` (what :meth:`UpdateAdapter.rerun`
        gets back) with the random state before it (CPU, and ``device``'s for a CUDA device)."""
        rec = _Record(item, random_state(device), device)
        yield
        self._records.append(rec)

    @property
    def replaying(self) -> bool:
        """True while :meth:`finish` runs the second pass (a front end whose rerun re-enters its own
        first-pass code tells the two apart with it)."""
        return self._replaying

    @property
    def recorded(self) -> int:
        """How many micro-batches this update has recorded so far."""
        return len(self._records)

    def wants_second_pass(self, grads: Sequence[Tensor | None] | None = None, *, scale: float = 1.0,
                          reduce: Reduce | None = None) -> bool:
        """After the first backward: w goes back to w (if :meth:`begin_step` moved it), the policy decides.

        ``grads``: the update's gradient g, one per parameter (default ``.grad``); ``scale``: the factor
        they carry (divided out where a policy reads a norm); ``reduce``: averages tensors in place across
        workers, when each worker holds its own g. True: run :meth:`ascent_step` and the second pass.
        """
        self.perturbation.restore()
        grads = self._grads() if grads is None else list(grads)
        self._second_pass = bool(self.schedule.wants_second_pass(grads, scale=scale, reduce=reduce))
        return self._second_pass

    def ascent_step(self, set_to_none: bool = True) -> bool:
        """w -> w + eps from the gradients in ``.grad`` (consumed). False: g is not finite, the weights are
        untouched and the update must be skipped (:meth:`skip_step`).

        Called without :meth:`wants_second_pass` (the paper's two-pass loop), the update is a full one;
        a policy that skips second passes refuses that at once.
        """
        if self._second_pass is None:
            self.schedule.check_full_update()
            self._second_pass = True
        elif not self._second_pass:
            raise RuntimeError("ascent_step() on an update the policy runs without the second pass "
                               f"({self.schedule!r} said no): call end_step() and step the base optimizer")
        ok = self.perturbation.ascend(set_to_none)
        self._skipped = self._skipped or not ok
        if ok and self._manual is not None:
            # The manual loop runs its second forward next: it draws what its first forward drew.
            self._after_first = random_state()
            set_random_state(self._manual.state)
            self._manual = None
        return ok

    def end_step(self, grads: Sequence[Tensor | None] | None = None, *, reduce: Reduce | None = None) -> bool:
        """Right before the base optimizer's step: w restored bit for bit, the policy's gradient rule on
        ``grads`` (the gradient the base optimizer steps with; default ``.grad``), its counters.

        Returns False (nothing counted) when this update's ascent found a non-finite gradient: the
        caller skips the base step, as after :meth:`skip_step`.
        """
        self.perturbation.restore()
        self._put_back_random_state()
        if self._skipped:
            self._second_pass, self._skipped = None, False
            return False
        grads = self._grads() if grads is None else list(grads)
        self.schedule.end_step(grads, bool(self._second_pass), reduce=reduce)
        self._second_pass = None
        return True

    def skip_step(self) -> None:
        """Abandon this update (non-finite gradient): w restored, nothing counted."""
        self.perturbation.restore()
        self._put_back_random_state()
        self._second_pass, self._skipped = None, False

    def restore(self) -> None:
        """w restored bit for bit, the update still open."""
        self.perturbation.restore()

    def _put_back_random_state(self) -> None:
        self._manual = None
        if self._after_first is not None:
            set_random_state(self._after_first)
            self._after_first = None

    # -- the rest of the update, for every front end ---------------------------------------------

    def finish(self, adapter: UpdateAdapter, *, grads: Sequence[Tensor | None] | None = None, scale: float = 1.0,
               reduce: Reduce | None = None, clock: Callable[[], float] | None = None) -> UpdateResult:
        """Everything after the first pass: decide, ascend or skip, the second pass over every recorded
        micro-batch (each with its first pass's random state, BatchNorm statistics left alone), restore,
        the policy's gradient rule, then the adapter's base step.

        ``grads``/``scale``/``reduce`` as for :meth:`wants_second_pass` (with ``reduce``, each worker holds
        its own g: it is averaged here when no second pass runs, and every worker takes the same skip
        decision); ``clock``: a time source, for :attr:`UpdateResult.times`.
        """
        records, self._records = self._records, []
        t = _Clock(clock)
        second = self.wants_second_pass(grads, scale=scale, reduce=reduce)
        if adapter.overflowed():
            self.skip_step()
            adapter.skip()
            return UpdateResult(second, True, t.times)
        if not second:
            if reduce is not None:
                with torch.no_grad():
                    reduce([g for g in (self._grads() if grads is None else grads) if g is not None])
            return self._descend(adapter, grads, reduce, t, second=False)
        if not records:
            raise RuntimeError("finish() found no recorded micro-batches: run each first forward/backward of "
                               "the update inside driver.first_pass(item)")
        adapter.before_ascent()
        ok = self.ascent_step()
        if reduce is not None:
            ok = _agree(ok, reduce, self.perturbation.params())
        if not ok:
            self.skip_step()
            adapter.skip()
            return UpdateResult(True, True, t.times)
        adapter.after_ascent()
        t.mark("ascent")
        try:
            while True:
                adapter.before_second_pass()
                self._replay(records, adapter)
                if adapter.second_pass_ok():
                    break
        finally:
            t.mark("second")
            self.restore()  # w copied back in place, bit for bit, also when the second pass raised
            t.mark("restore")
        adapter.after_second_pass()
        t.mark("after_second")
        return self._descend(adapter, grads, reduce, t, second=True)

    def _descend(self, adapter: UpdateAdapter, grads, reduce, t: _Clock, *, second: bool) -> UpdateResult:
        if not self.end_step(grads, reduce=reduce):
            adapter.skip()
            return UpdateResult(second, True, t.times)
        adapter.base_step()
        t.mark("base_step")
        return UpdateResult(second, False, t.times)

    def second_pass(self, adapter: UpdateAdapter) -> None:
        """The second pass over the micro-batches recorded since the last one, for an update that ascends
        more than once (m-sharpness: one ascent per shard of m examples, each followed by its own second
        pass); :meth:`finish` runs it for every other update."""
        records, self._records = self._records, []
        if not records:
            raise RuntimeError("second_pass() found no recorded micro-batches: run each first forward/backward "
                               "inside driver.first_pass(item)")
        self._replay(records, adapter)

    def _replay(self, records: list[_Record], adapter: UpdateAdapter) -> None:
        """The second pass: each micro-batch again with the random state of its first pass; the state the
        first pass left is put back afterwards (training goes on drawing what one pass would have left)."""
        after_first = random_state(records[0].device)
        model = adapter.model
        self._replaying = True
        try:
            with frozen_bn_stats(model) if model is not None else contextlib.nullcontext():
                for i, rec in enumerate(records):
                    set_random_state(rec.state)
                    adapter.rerun(rec.item, i == len(records) - 1)
        finally:
            self._replaying = False
            set_random_state(after_first)

    def __repr__(self) -> str:
        return f"UpdateDriver({self.perturbation!r}, {self.schedule!r})"


def _agree(ok: bool, reduce: Reduce, params: Sequence[Tensor]) -> bool:
    """Every worker's answer, through the front end's own reduction: True only where all said True."""
    device = params[0].device if params else "cpu"
    flag = torch.tensor([1.0 if ok else 0.0], dtype=torch.float32, device=device)
    reduce([flag])
    return bool(flag.item() == 1.0)
