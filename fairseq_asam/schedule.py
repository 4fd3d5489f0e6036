"""When the sharpness-aware second pass runs: cheaper ASAM/SAM updates (a schedule over the two-pass update).

Every ASAM/SAM update (Kwon et al., ICML 2021, Section 4) costs two forward/backward passes. A
schedule decides, update by update, whether the full update runs (ascent to w + eps, second pass,
descent with g') and what the other updates do. Policies (torch only; state in ``state_dict()``):

=====================  ==========================================================  ===============
policy                 rule                                                        passes / update
=====================  ==========================================================  ===============
:class:`Full`          the paper's ASAM on every update (the default)               2
:class:`EveryK`        the full update every k-th update, the base step between     1 + 1/k
:class:`LookASAM`      every k with reuse (LookSAM, Liu et al., CVPR 2022, with      1 + 1/k
                       ASAM's eps): on a refresh update keep the unit direction
                       d of the part of g' orthogonal to g; on the others descend
                       with g + alpha ||g|| d
:class:`LatePhase`     the base step until a fraction ``start`` of the updates,     1 + (1 - start)
                       full updates after it ("SAM only at the end of training")
:class:`AdaptiveTrigger` the full update when ||g||^2 >= mean + c std of its         1 + the rate
                       running (exponential) statistics (AE-SAM, Jiang et al.,
                       ICLR 2023, with a fixed c)
:class:`OnePass`       no second pass: w is moved to w + eps *before* the update's   1
                       only forward/backward, eps from ASAM's T_w applied to a
                       direction already known: the base optimizer's momentum
                       ("momentum", as MSAM, Becker et al., TMLR 2024) or the
                       previous update's descent gradient ("previous")
=====================  ==========================================================  ===============

Every front end runs the same update protocol (:mod:`fairseq_asam.core.update`), so a policy is one
class here and nothing else in the package knows which one it holds. In Python the protocol is the
optimizer's (:class:`fairseq_asam.ASAM` with ``schedule=``): ``opt.step(closure)``, or a loop that asks
whether this update runs the second pass (runs as is)::

    import torch
    from fairseq_asam import ASAM
    from fairseq_asam.schedule import EveryK
    model = torch.nn.Linear(4, 2)
    opt = ASAM(model.named_parameters(), torch.optim.SGD(model.parameters(), lr=0.1), rho=0.5,
               schedule=EveryK(5))
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    for _ in range(10):
        opt.begin_step()                      # one-pass policies move w to w + eps here; else nothing
        torch.nn.functional.mse_loss(model(x), y).backward()
        if opt.scheduled_ascent():            # True: this update runs the second pass, w is at w + eps
            torch.nn.functional.mse_loss(model(x), y).backward()
        opt.descent_step()                    # w restored; the policy's gradient rule; the base step
    print(opt.schedule.second_passes, "of", opt.schedule.updates, "updates ran the second pass")  # 2 of 10

The paper's loop (``ascent_step()`` and the second backward on every update) is refused at its first
call by a policy that skips second passes. Each policy declares its options once (:class:`Option`);
:func:`make_schedule`, :func:`add_arguments` (argparse: ``asam-vision-train``), :func:`dataclass_fields`
(fairseq's ``--asam-*`` flags) and the values a resumed run must keep (:func:`options`) are generated
from :data:`POLICIES`. ``docs/efficiency.md`` has the study that compares the policies.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import checks

__all__ = [
    "AdaptiveTrigger", "EveryK", "Full", "LatePhase", "LookASAM", "OnePass", "Option", "POLICIES", "Schedule",
    "add_arguments", "dataclass_fields", "flags", "make_schedule", "options",
]

Reduce = Callable[[list[Tensor]], None]  # averages tensors in place across data-parallel workers


def _sq_norm(tensors) -> float:
    """sum ||t||^2 in float64 (one host sync); inf/nan when a tensor is not finite."""
    ts = [t for t in tensors if t is not None]
    if not ts:
        return 0.0
    return float(torch.stack([torch.linalg.vector_norm(t, dtype=torch.float64).square().to(ts[0].device)
                              for t in ts]).sum())


@dataclass(frozen=True)
class Option:
    """One option of a policy, declared once: every command line and :func:`make_schedule` come from it.

    ``name`` is the keyword of :func:`make_schedule` (``every``); a front end's flag is its prefix plus the
    name with dashes (``--asam-every``, ``--every``). ``check(value, flag)`` returns the value or raises
    ``ValueError`` naming the flag (:mod:`fairseq_asam.checks`). ``off`` is the value that leaves it unused.
    """

    name: str
    type: type
    check: Callable[[Any, str], Any]
    help: str
    off: Any = None
    metavar: str | None = None
    choices: tuple[str, ...] | None = None


class Schedule:
    """Base class and the full policy's behaviour: the second pass on every update.

    The hooks, in the order :class:`fairseq_asam.core.update.UpdateDriver` runs them: :meth:`begin_step`,
    :meth:`wants_second_pass`, :meth:`end_step` (the names the shell and the driver use too). A policy
    declares its options (:attr:`options`, :attr:`key`: the option whose value selects it) and builds
    itself from them (:meth:`from_options`).

    Counters: :attr:`updates` (descents done), :attr:`second_passes` (of them, with the second pass),
    :attr:`last_second_pass` (the last update's decision). :attr:`fraction` = second_passes / updates.
    """

    name = "full"
    options: tuple[Option, ...] = ()
    key: str | None = None  # the option that selects this policy in make_schedule()

    def __init__(self) -> None:
        self.updates = 0
        self.second_passes = 0
        self.last_second_pass = False
        self._decision: bool | None = None

    @classmethod
    def from_options(cls, values: dict[str, Any], total_updates: int | None = None,
                     flags: dict[str, str] | None = None) -> Schedule:
        """The policy for checked option values (its own options only); ``flags`` name them in errors."""
        return cls()

    # -- the hooks, in the order the update protocol runs them -------------------------------

    def begin_step(self, perturbation, directions=None) -> bool:
        """Before the update's first forward. One-pass policies move w to w + eps (returns True).

        ``directions``: the base optimizer's momentum, one tensor (or None) per parameter of
        ``perturbation.param_groups``, or a callable returning them; read only by a policy that needs it.
        """
        return False

    def wants_second_pass(self, grads: Sequence[Tensor | None], *, scale: float = 1.0,
                          reduce: Reduce | None = None) -> bool:
        """After the first backward, with the update's final gradient g (``grads``, one per parameter).

        ``scale``: the factor the gradients carry (a GradScaler's scale), divided out of norms;
        ``reduce``: averages tensors across workers when each worker holds its own g (the vision
        step's per-worker first pass), so that every worker takes the same decision and keeps the
        same state. True: the caller runs the ascent and the second pass.
        """
        self._decision = self._decide(grads, scale, reduce)
        return self._decision

    def _decide(self, grads, scale, reduce) -> bool:
        return True

    def end_step(self, grads: Sequence[Tensor | None], second_pass: bool | None = None, *,
                 reduce: Reduce | None = None) -> None:
        """Right before the base optimizer's step, with the gradient it will use (g' or g).

        Policies with a gradient rule change ``grads`` in place (Look-ASAM); the counters advance.
        ``second_pass`` defaults to the last :meth:`wants_second_pass` answer.
        """
        sp = self._decision if second_pass is None else bool(second_pass)
        sp = bool(sp)
        self._descend(grads, sp, reduce)
        self.updates += 1
        self.second_passes += int(sp)
        self.last_second_pass = sp
        self._decision = None

    def _descend(self, grads, second_pass, reduce) -> None:
        pass

    # -- what front ends may ask -------------------------------------------------------------------

    @property
    def full_every_update(self) -> bool:
        """True when every update is the paper's full update (this policy never skips the second pass)."""
        return True

    @property
    def needs_total_updates(self) -> bool:
        """True when the policy needs the run's number of updates (:meth:`set_total_updates`) and has none."""
        return False

    @property
    def trains_at_perturbed_weights(self) -> bool:
        """True when every training forward runs at w + eps (one pass per update), so that BatchNorm's running
        statistics describe weights that are never kept: a front end recomputes them at w after training
        (docs/efficiency.md measures what that recompute is worth)."""
        return False

    def check_full_update(self) -> None:
        """Raise unless the paper's loop (an ascent on every update, no decision asked) is this policy's update."""
        if not self.full_every_update:
            raise RuntimeError(
                f"ascent_step() without asking the schedule: {self!r} runs the second pass on some updates "
                "only, and this loop would run it on every update (full price, and not the schedule's "
                "update). Use opt.step(closure), or the loop: opt.begin_step(); loss.backward(); "
                "if opt.scheduled_ascent(): loss.backward(); opt.descent_step()"
            )

    def check_mode(self, *, sharded: str | None = None, per_shard_eps: str | None = None) -> None:
        """Raise ``ValueError`` when the policy cannot run in a front end's mode; each argument is the flag
        that turned the mode on (``"--fsdp"``, ``"--m"``), None when it is off. The full update runs in all."""
        if per_shard_eps and not self.full_every_update:
            raise ValueError(
                f"{per_shard_eps} (m-sharpness) with {self!r}: m-sharpness takes each shard's eps from that "
                "shard's own first pass, inside the update, before the policy's decision on the whole update's "
                f"gradient exists; use {per_shard_eps} with the full update"
            )

    # -- what it reports -------------------------------------------------------------------------

    @property
    def fraction(self) -> float:
        """Fraction of the updates so far that ran the second pass (0 before the first)."""
        return self.second_passes / self.updates if self.updates else 0.0

    def set_total_updates(self, total: int) -> None:
        """The number of updates of the run (only :class:`LatePhase` needs it)."""

    # -- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"policy": self.name, "config": self.config(), "updates": self.updates,
                "second_passes": self.second_passes, "last_second_pass": self.last_second_pass}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("policy", self.name) != self.name:
            raise ValueError(f"this schedule state was saved by the {state['policy']!r} policy, not {self.name!r}; "
                             "resume with the same schedule flags")
        self.updates = int(state["updates"])
        self.second_passes = int(state["second_passes"])
        self.last_second_pass = bool(state.get("last_second_pass", False))
        self._decision = None

    def config(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        cfg = ", ".join(f"{k}={v}" for k, v in self.config().items())
        return f"{type(self).__name__}({cfg})"


class Full(Schedule):
    """The paper's ASAM: the ascent and the second pass on every update (2 passes)."""

    name = "full"


class EveryK(Schedule):
    """The full update on updates 0, k, 2k, ...; the plain base step with g on the others.

    ``EveryK(1)`` is :class:`Full`, bit for bit. Periodic SAM as in MosaicML Composer's SAM
    (``interval``), which also scales rho up with k; here rho is the caller's (the optimizer's groups).
    """

    name = "every"
    options = (Option("every", int, checks.check_every, off=1, metavar="K", help=(
        "run the two-pass update on every K-th update only, the base optimizer's plain step between "
        "(1 + 1/K passes per update; 1: every update, the paper's update)")),)
    key = "every"

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = checks.check_every(k, "k=")

    @classmethod
    def from_options(cls, values, total_updates=None, flags=None):
        return cls(values["every"])

    @property
    def full_every_update(self) -> bool:
        return self.k == 1

    def _decide(self, grads, scale, reduce) -> bool:
        return self.updates % self.k == 0

    def config(self):
        return {"k": self.k}


class LookASAM(EveryK):
    """LookSAM's reuse (Liu et al., "Towards Efficient and Scalable Sharpness-Aware Minimization", CVPR
    2022, Algorithm 1) with ASAM's eps: every k with the second pass's information kept in between.

    On a refresh update (0, k, 2k, ...): the full update with g' = grad L(w + eps); it keeps
    d = g_v / ||g_v||, g_v = g' - (g'.g / ||g||^2) g (the part of g' orthogonal to g). On the other
    updates the base optimizer steps with g + alpha ||g|| d. One stored tensor per parameter.
    """

    name = "look"
    options = EveryK.options + (Option("reuse_alpha", float, checks.check_nonnegative, metavar="ALPHA", help=(
        "Look-ASAM (LookSAM's reuse, Liu et al. 2022) with the every-K option K >= 2: between the two-pass "
        "updates descend with g + alpha ||g|| d, d the last second pass's gradient part orthogonal to g "
        "(LookSAM: alpha 0.7)")),)
    key = "reuse_alpha"

    def __init__(self, k: int, alpha: float) -> None:
        super().__init__(k)
        self.alpha = checks.check_nonnegative(alpha, "alpha=")
        self.direction: list[Tensor | None] | None = None
        self._g: list[Tensor | None] | None = None

    @classmethod
    def from_options(cls, values, total_updates=None, flags=None):
        f = flags or {}
        if values["every"] < 2:
            raise ValueError(f"{f.get('reuse_alpha', 'reuse_alpha=')} (Look-ASAM) needs "
                             f"{f.get('every', 'every=')} k >= 2, got {values['every']}")
        return cls(values["every"], values["reuse_alpha"])

    @property
    def full_every_update(self) -> bool:
        return False

    def check_mode(self, *, sharded=None, per_shard_eps=None) -> None:
        super().check_mode(sharded=sharded, per_shard_eps=per_shard_eps)
        _refuse_sharded(self, sharded, "dot products and norms of g and g'")

    def _decide(self, grads, scale, reduce) -> bool:
        refresh = super()._decide(grads, scale, reduce)
        if refresh:
            # The ascent consumes g (its memory holds scratch); the refresh needs it afterwards.
            self._g = [None if g is None else g.detach().clone() for g in grads]
            if reduce is not None:
                reduce([g for g in self._g if g is not None])
        return refresh

    @torch.no_grad()
    def _descend(self, grads, second_pass, reduce) -> None:
        if second_pass:
            g = self._g or [None] * len(grads)
            self._g = None
            if len(g) != len(grads):
                raise ValueError(f"the refresh update got {len(grads)} gradients, its first pass {len(g)}")
            pairs = [(a, b) for a, b in zip(g, grads) if a is not None and b is not None]
            gg = _dot(pairs, lambda a, b: (a, a))
            gpg = _dot(pairs, lambda a, b: (b, a))
            coef = gpg / gg if gg > 0 else 0.0
            v = []
            for a, b in zip(g, grads):
                if a is None or b is None:
                    v.append(None)
                    continue
                acc = torch.float64 if b.dtype == torch.float64 else torch.float32  # fp16 grads: fp32 direction
                v.append(b.detach().to(acc) - coef * a.to(acc))
            nv = math.sqrt(_sq_norm(v))
            if math.isfinite(nv) and nv > 0:
                self.direction = [None if t is None else t.div_(nv) for t in v]
            # else: g' parallel to g, or not finite (skipped by the base step): keep the old direction
            return
        if self.direction is None or self.alpha == 0:
            return
        gnorm = math.sqrt(_sq_norm(grads))
        if not math.isfinite(gnorm):
            return  # the base step (or its GradScaler) skips a non-finite update anyway
        for g, d in zip(grads, self.direction):
            if g is not None and d is not None:
                g.add_(d.to(device=g.device, dtype=g.dtype), alpha=self.alpha * gnorm)

    def config(self):
        return {"k": self.k, "alpha": self.alpha}

    def state_dict(self):
        s = super().state_dict()
        s["direction"] = None if self.direction is None else [
            None if d is None else d.detach().clone() for d in self.direction]
        return s

    def load_state_dict(self, state):
        super().load_state_dict(state)
        d = state.get("direction")
        self.direction = None if d is None else [None if t is None else t.detach().clone() for t in d]
        self._g = None


def _dot(pairs, which) -> float:
    if not pairs:
        return 0.0
    parts = []
    for a, b in pairs:
        x, y = which(a, b)
        acc = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
        parts.append(torch.dot(x.reshape(-1).to(acc), y.reshape(-1).to(acc)).double().cpu())
    return float(torch.stack(parts).sum())


class LatePhase(Schedule):
    """Plain base steps for the first ``start`` fraction of the run's updates, full updates after.

    Needs the run's number of updates (``total_updates=`` or :meth:`set_total_updates`): the switch
    is at update ``ceil(start * total)``. ``start = 0`` is :class:`Full`; ``start = 1`` the base optimizer.
    """

    name = "late"
    options = (Option("start", float, checks.check_fraction, metavar="FRACTION", help=(
        "late phase: the base optimizer's plain step for this fraction of the run's updates (in [0, 1]), "
        "the two-pass update after it")),)
    key = "start"

    @classmethod
    def from_options(cls, values, total_updates=None, flags=None):
        return cls(values["start"], total_updates)

    @property
    def full_every_update(self) -> bool:
        return self.start == 0

    @property
    def needs_total_updates(self) -> bool:
        return self.total_updates is None

    def __init__(self, start: float, total_updates: int | None = None) -> None:
        super().__init__()
        self.start = checks.check_fraction(start, "start=")
        self.total_updates = None
        if total_updates is not None:
            self.set_total_updates(total_updates)

    def set_total_updates(self, total: int) -> None:
        self.total_updates = checks.check_int(total, "total_updates=", minimum=1)

    @property
    def switch(self) -> int:
        if self.total_updates is None:
            raise RuntimeError("LatePhase needs the run's number of updates: LatePhase(start, total_updates=N) "
                               "or schedule.set_total_updates(N) before the first update")
        return math.ceil(self.start * self.total_updates)

    def _decide(self, grads, scale, reduce) -> bool:
        return self.updates >= self.switch

    def config(self):
        return {"start": self.start, "total_updates": self.total_updates}

    def state_dict(self):
        s = super().state_dict()
        s["total_updates"] = self.total_updates
        return s

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if state.get("total_updates") is not None and self.total_updates is None:
            self.total_updates = int(state["total_updates"])


class AdaptiveTrigger(Schedule):
    """AE-SAM's switch (Jiang et al., "An Adaptive Policy to Employ Sharpness-Aware Minimization", ICLR
    2023, Algorithm 1) with a fixed c: the full update when ||g||^2 >= mu + c sigma.

    mu and sigma^2 are exponential moving averages updated with this update's ||g||^2 before the test
    (``beta`` = 0.9 as in the paper): mu <- beta mu + (1 - beta) ||g||^2, sigma^2 <- beta sigma^2 +
    (1 - beta) (||g||^2 - mu)^2. Larger c: fewer second passes. A non-finite g leaves the statistics alone
    and takes the plain step (which the base optimizer or its GradScaler skips).
    """

    name = "adaptive"
    options = (Option("adaptive_c", float, checks.check_finite, metavar="C", help=(
        "adaptive trigger (AE-SAM, Jiang et al. 2023): the two-pass update when ||g||^2 >= its running mean "
        "+ C running standard deviations, the plain step otherwise (larger C: fewer)")),)
    key = "adaptive_c"

    @classmethod
    def from_options(cls, values, total_updates=None, flags=None):
        return cls(values["adaptive_c"])

    @property
    def full_every_update(self) -> bool:
        return False

    def check_mode(self, *, sharded=None, per_shard_eps=None) -> None:
        super().check_mode(sharded=sharded, per_shard_eps=per_shard_eps)
        _refuse_sharded(self, sharded, "the norm of g")

    def __init__(self, c: float, beta: float = 0.9) -> None:
        super().__init__()
        self.c = checks.check_finite(c, "c=")
        b = checks.check_number(beta, "beta=")
        if not 0 <= b < 1:
            raise ValueError(f"beta= must be in [0, 1), got {beta}")
        self.beta = b
        self.mean = 0.0
        self.var = 0.0

    def _decide(self, grads, scale, reduce) -> bool:
        if reduce is not None:
            # Every worker must take the same decision: the workers' ||g_local||^2, averaged.
            ts = [g for g in grads if g is not None]
            dev = ts[0].device if ts else "cpu"
            buf = torch.tensor([_sq_norm(grads)], dtype=torch.float64, device=dev)
            reduce([buf])
            sq = float(buf)
        else:
            sq = _sq_norm(grads)
        sq = sq / (float(scale) ** 2)
        if not math.isfinite(sq):
            return False
        b = self.beta
        self.mean = b * self.mean + (1 - b) * sq
        self.var = b * self.var + (1 - b) * (sq - self.mean) ** 2
        return sq >= self.mean + self.c * math.sqrt(self.var)

    def config(self):
        return {"c": self.c, "beta": self.beta}

    def state_dict(self):
        s = super().state_dict()
        s.update(mean=self.mean, var=self.var)
        return s

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.mean, self.var = float(state["mean"]), float(state["var"])


class OnePass(Schedule):
    """One forward/backward per update: w -> w + eps before it, eps from ASAM's T_w applied to a known
    direction d instead of this update's g; the base optimizer steps with grad L(w + eps) at w.

    ``direction="momentum"``: d = the base optimizer's momentum (SGD's ``momentum_buffer``, Adam's
    ``exp_avg``), as in MSAM (Becker et al., "Momentum-SAM: Sharpness Aware Minimization without
    Computational Overhead", TMLR 2024), where the normalized momentum points up the loss like g.
    ``direction="previous"``: d = the previous update's descent gradient (one stored tensor per
    parameter). The first update (no direction yet) is a plain base step. MSAM uses a several times
    larger rho than SAM; with ASAM's element-wise T_w the study in ``docs/efficiency.md`` found the
    same rho as the two-pass update's best on an MLP and a much smaller one on conv nets with
    BatchNorm (1/16-1/4 of it, chosen on validation), where one pass then stays close to the base
    optimizer.
    """

    name = "one_pass"
    DIRECTIONS = ("momentum", "previous")
    options = (Option("one_pass", str, lambda v, flag: _check_choice(v, flag, ("none", "momentum", "previous")),
                      off="none", choices=("none", "momentum", "previous"), help=(
        "one forward/backward per update: perturb w before it, along T_w applied to the base optimizer's "
        "momentum (momentum; Adam's first moment; as MSAM, Becker et al. 2024) or to the previous update's "
        "gradient (previous); none: off")),)
    key = "one_pass"

    @classmethod
    def from_options(cls, values, total_updates=None, flags=None):
        return cls(values["one_pass"])

    @property
    def full_every_update(self) -> bool:
        return False

    @property
    def trains_at_perturbed_weights(self) -> bool:
        return True

    def __init__(self, direction: str = "momentum") -> None:
        super().__init__()
        if direction not in self.DIRECTIONS:
            raise ValueError(f"direction= must be one of {', '.join(self.DIRECTIONS)}, got {direction!r}")
        self.direction = direction
        self.previous: list[Tensor | None] | None = None
        self._fresh = False  # previous holds the last update's gradient (not yet used up as scratch)
        self._begun = False

    @torch.no_grad()
    def begin_step(self, perturbation, directions=None) -> bool:
        self._begun = True
        if self.direction == "previous":
            # The stored gradient is the kernels' scratch (no copy per update): it is used up here, refilled
            # in end_step, and an update begun again before that (a retried batch) runs unperturbed.
            directions, self._fresh = (self.previous if self._fresh else None), False
            scratch = True
        else:
            if directions is None:
                raise ValueError("OnePass('momentum') needs the base optimizer's momentum (directions=)")
            directions = directions() if callable(directions) else directions
            scratch = False  # the base optimizer's own state
        if directions is None or all(d is None for d in directions):
            return False  # the first update: no direction yet, a plain step
        return perturbation.ascend_along(directions, scratch=scratch)

    def _decide(self, grads, scale, reduce) -> bool:
        if not self._begun:
            raise RuntimeError("OnePass perturbs w before the update's forward: call opt.begin_step() before "
                               "the first forward of every update (opt.step(closure) does)")
        self._begun = False
        return False

    def end_step(self, grads, second_pass=None, *, reduce=None) -> None:
        self._begun = False
        super().end_step(grads, False, reduce=reduce)

    @torch.no_grad()
    def _descend(self, grads, second_pass, reduce) -> None:
        if self.direction != "previous":
            return
        # No finiteness test here (a host sync and a pass over g per update): a non-finite g, whose step the
        # base optimizer or its GradScaler skips, makes the next update's ascent find it and run unperturbed.
        self._fresh = True
        if self.previous is None or len(self.previous) != len(grads):
            self.previous = [None if g is None else g.detach().clone() for g in grads]
        else:
            for i, g in enumerate(grads):
                if g is None:
                    self.previous[i] = None
                elif self.previous[i] is None or self.previous[i].shape != g.shape:
                    self.previous[i] = g.detach().clone()
                else:
                    self.previous[i].copy_(g)

    def config(self):
        return {"direction": self.direction}

    def state_dict(self):
        s = super().state_dict()
        s["previous"] = None if self.previous is None or not self._fresh else [
            None if t is None else t.detach().clone() for t in self.previous]
        return s

    def load_state_dict(self, state):
        super().load_state_dict(state)
        p = state.get("previous")
        self.previous = None if p is None else [None if t is None else t.detach().clone() for t in p]
        self._fresh = self.previous is not None


def _check_choice(value, flag: str, choices) -> str:
    if value not in choices:
        raise ValueError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _refuse_sharded(policy, flag: str | None, what: str) -> None:
    if flag:
        raise ValueError(
            f"{flag} with {policy!r}: the policy reads {what} over all tensors, and under FSDP each rank holds "
            f"only a shard of each; totalling them across ranks is not implemented. Use {flag} with the full "
            "update, EveryK, LatePhase or OnePass, or this policy with DDP"
        )


POLICIES: dict[str, type[Schedule]] = {
    cls.name: cls for cls in (Full, EveryK, LookASAM, LatePhase, AdaptiveTrigger, OnePass)
}


def options() -> dict[str, Option]:
    """Every policy's options, each once, in the order of :data:`POLICIES`."""
    out: dict[str, Option] = {}
    for cls in POLICIES.values():
        for o in cls.options:
            out.setdefault(o.name, o)
    return out


def _flag(name: str, flags: dict[str, str] | None) -> str:
    return (flags or {}).get(name, f"{name}=")


def make_schedule(*, total_updates: int | None = None, flags: dict[str, str] | None = None, **values) -> Schedule:
    """The policy that option values describe (the keywords are :func:`options`' names; None or the option's
    ``off`` value leaves it unused); at most one policy at a time, :class:`Full` when none is chosen.

    ``flags`` maps option names to the flags users write, for the error messages (``--asam-every must be
    >= 1, got 0``); ``total_updates`` is the run's number of updates (:class:`LatePhase` needs it).
    """
    opts = options()
    unknown = sorted(set(values) - set(opts))
    if unknown:
        raise TypeError(f"make_schedule() got unknown options {unknown}; known: {sorted(opts)}")
    checked = {}
    for name, o in opts.items():
        v = values.get(name)
        checked[name] = o.off if v is None else o.check(v, _flag(name, flags))
    chosen = [cls for cls in POLICIES.values() if cls.key is not None and checked[cls.key] != opts[cls.key].off]
    # A policy that reads another's key (Look-ASAM reads every's K) takes that key with it.
    taken = {o.name for cls in chosen for o in cls.options if o.name != cls.key}
    chosen = [cls for cls in chosen if cls.key not in taken]
    if len(chosen) > 1:
        raise ValueError("choose one cheaper-update policy, got "
                         + " and ".join(_flag(cls.key, flags).rstrip("=") for cls in chosen))
    if not chosen:
        return Full()
    cls = chosen[0]
    return cls.from_options({o.name: checked[o.name] for o in cls.options}, total_updates, flags)


def flags(prefix: str = "--") -> dict[str, str]:
    """{option name: its command-line flag}: ``prefix`` plus the name with dashes (``--asam-reuse-alpha``)."""
    return {name: prefix + name.replace("_", "-") for name in options()}


def add_arguments(parser, *, prefix: str = "--") -> dict[str, str]:
    """Add every option to an argparse parser (or group) as ``prefix + name`` with dashes; values are checked
    while parsing. Returns {option name: flag}, for :func:`make_schedule`'s ``flags``."""
    out = flags(prefix)
    for name, o in options().items():
        flag = out[name]
        kw: dict[str, Any] = {"default": o.off, "help": o.help, "dest": name}
        if o.choices is not None:
            kw["choices"] = o.choices
        else:
            kw["type"] = checks.argparse_type(o.check, flag, convert=o.type)
            kw["metavar"] = o.metavar
        parser.add_argument(flag, **kw)
    return out


def dataclass_fields(prefix: str, *, choice_enum=None) -> list[tuple[str, Any, Any]]:
    """[(field name, type, dataclasses.field)] for a config dataclass (fairseq's ``--asam-*`` flags), with
    each option's help text; ``choice_enum`` turns choices into fairseq's ChoiceEnum."""
    import dataclasses
    from typing import Optional

    out = []
    for name, o in options().items():
        typ: Any = o.type
        if o.choices is not None and choice_enum is not None:
            typ = choice_enum(list(o.choices))
        elif o.off is None:
            typ = Optional[o.type]  # noqa: UP045 (fairseq's dataclass reader wants typing.Optional)
        out.append((prefix + name, typ, dataclasses.field(default=o.off, metadata={"help": o.help})))
    return out
