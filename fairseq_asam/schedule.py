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

A training loop asks the optimizer (:class:`fairseq_asam.ASAM` with ``schedule=``) whether this update
needs the second pass; the same loop then runs every policy (runs as is)::

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

``opt.step(closure)`` does the same. Front ends build a policy from flags with :func:`make_schedule`
(``--asam-every``, ``--asam-reuse-alpha``, ``--asam-start``, ``--asam-adaptive-c``, ``--asam-one-pass``
in fairseq; ``--every`` ... in ``asam-vision-train``). The hooks a caller runs, in order, per update:
:meth:`Schedule.before_forward` (one-pass policies perturb), the first backward,
:meth:`Schedule.wants_second_pass` (the decision, from the update's final gradient g),
then either the ascent + second pass or nothing, and :meth:`Schedule.before_descent` (the gradient
rule, the counters) right before the base optimizer's step. ``docs/efficiency.md`` has the study
that compares the policies.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from . import checks

__all__ = [
    "AdaptiveTrigger", "EveryK", "Full", "LatePhase", "LookASAM", "OnePass", "Schedule", "make_schedule",
    "POLICIES",
]

Reduce = Callable[[list[Tensor]], None]  # averages tensors in place across data-parallel workers


def _grad_list(params: Sequence[Tensor]) -> list[Tensor | None]:
    return [p.grad for p in params]


def _sq_norm(tensors) -> float:
    """sum ||t||^2 in float64 (one host sync); inf/nan when a tensor is not finite."""
    ts = [t for t in tensors if t is not None]
    if not ts:
        return 0.0
    return float(torch.stack([torch.linalg.vector_norm(t, dtype=torch.float64).square().to(ts[0].device)
                              for t in ts]).sum())


class Schedule:
    """Base class and the full policy's behaviour: the second pass on every update.

    Counters: :attr:`updates` (descents done), :attr:`second_passes` (of them, with the second pass),
    :attr:`last_second_pass` (the last update's decision). :attr:`fraction` = second_passes / updates.
    """

    name = "full"
    one_pass = False  # True: no second pass ever; the caller runs before_forward() first

    def __init__(self) -> None:
        self.updates = 0
        self.second_passes = 0
        self.last_second_pass = False
        self._decision: bool | None = None

    # -- the hooks, in the order a caller runs them --------------------------------------------

    def before_forward(self, perturbation, base_optimizer=None, directions=None) -> bool:
        """Before the update's first forward. One-pass policies move w to w + eps (returns True)."""
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

    def before_descent(self, grads: Sequence[Tensor | None], second_pass: bool | None = None, *,
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

    # -- what it reports -------------------------------------------------------------------------

    @property
    def fraction(self) -> float:
        """Fraction of the updates so far that ran the second pass (0 before the first)."""
        return self.second_passes / self.updates if self.updates else 0.0

    def expected_passes(self, total_updates: int | None = None) -> float | None:
        """Forward/backward passes per update relative to the base optimizer, when known in advance."""
        return 2.0

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


class EveryK(Schedule):
    """The full update on updates 0, k, 2k, ...; the plain base step with g on the others.

    ``EveryK(1)`` is :class:`Full`, bit for bit. Periodic SAM as in MosaicML Composer's SAM
    (``interval``), which also scales rho up with k; here rho is the caller's (the optimizer's groups).
    """

    name = "every"

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = checks.check_every(k, "k=")

    def _decide(self, grads, scale, reduce) -> bool:
        return self.updates % self.k == 0

    def expected_passes(self, total_updates=None):
        return 1.0 + 1.0 / self.k

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

    def __init__(self, k: int, alpha: float) -> None:
        super().__init__(k)
        self.alpha = checks.check_nonnegative(alpha, "alpha=")
        self.direction: list[Tensor | None] | None = None
        self._g: list[Tensor | None] | None = None

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

    def expected_passes(self, total_updates=None):
        return 2.0 - self.start

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

    def __init__(self, c: float, beta: float = 0.9) -> None:
        super().__init__()
        self.c = checks.check_finite(c, "c=")
        b = checks.check_number(beta, "beta=")
        if not 0 <= b < 1:
            raise ValueError(f"beta= must be in [0, 1), got {beta}")
        self.beta = b
        self.mean = 0.0
        self.var = 0.0
        self.last_sq_norm: float | None = None

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
        self.last_sq_norm = sq
        if not math.isfinite(sq):
            return False
        b = self.beta
        self.mean = b * self.mean + (1 - b) * sq
        self.var = b * self.var + (1 - b) * (sq - self.mean) ** 2
        return sq >= self.mean + self.c * math.sqrt(self.var)

    def expected_passes(self, total_updates=None):
        return None  # depends on the gradients

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
    parameter). The first update (no direction yet) is a plain base step. d is older than g and
    smoother, so a larger rho than the two-pass update's may pay off (MSAM uses a several times
    larger rho than SAM); the study in ``docs/efficiency.md`` measures both.
    """

    name = "one_pass"
    one_pass = True
    DIRECTIONS = ("momentum", "previous")

    def __init__(self, direction: str = "momentum") -> None:
        super().__init__()
        if direction not in self.DIRECTIONS:
            raise ValueError(f"direction= must be one of {', '.join(self.DIRECTIONS)}, got {direction!r}")
        self.direction = direction
        self.previous: list[Tensor | None] | None = None
        self._perturbed = False

    @torch.no_grad()
    def before_forward(self, perturbation, base_optimizer=None, directions=None) -> bool:
        params = [t for g in perturbation.param_groups for t in g["params"]]
        if directions is None:
            if self.direction == "previous":
                directions = self.previous
            else:
                if base_optimizer is None:
                    raise ValueError("OnePass('momentum') needs the base optimizer (its momentum is the direction)")
                directions = [_momentum_of(base_optimizer, t) for t in params]
        if directions is None or all(d is None for d in directions):
            self._perturbed = False
            return False
        self._perturbed = perturbation.ascend_along(directions)
        return self._perturbed

    def _decide(self, grads, scale, reduce) -> bool:
        return False

    def before_descent(self, grads, second_pass=None, *, reduce=None) -> None:
        super().before_descent(grads, False, reduce=reduce)

    @torch.no_grad()
    def _descend(self, grads, second_pass, reduce) -> None:
        if self.direction != "previous":
            return
        sq = _sq_norm(grads)
        if not math.isfinite(sq):
            return  # a skipped (non-finite) update: keep the last good direction
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

    def expected_passes(self, total_updates=None):
        return 1.0

    def config(self):
        return {"direction": self.direction}

    def state_dict(self):
        s = super().state_dict()
        s["previous"] = None if self.previous is None else [
            None if t is None else t.detach().clone() for t in self.previous]
        return s

    def load_state_dict(self, state):
        super().load_state_dict(state)
        p = state.get("previous")
        self.previous = None if p is None else [None if t is None else t.detach().clone() for t in p]


def _momentum_of(base_optimizer, t: Tensor) -> Tensor | None:
    st = getattr(base_optimizer, "state", {}).get(t)
    if not st:
        return None
    for key in ("momentum_buffer", "exp_avg"):
        v = st.get(key)
        if isinstance(v, Tensor):
            return v
    return None


POLICIES = {"full": Full, "every": EveryK, "look": LookASAM, "late": LatePhase, "adaptive": AdaptiveTrigger,
            "one_pass": OnePass}


def make_schedule(*, every: int = 1, reuse_alpha: float | None = None, start: float | None = None,
                  adaptive_c: float | None = None, one_pass: str | None = None,
                  total_updates: int | None = None, flags: dict[str, str] | None = None) -> Schedule:
    """The policy the front ends' flags describe; at most one policy at a time.

    ``every`` k (> 1: :class:`EveryK`; with ``reuse_alpha``: :class:`LookASAM`), ``start`` (:class:`LatePhase`),
    ``adaptive_c`` (:class:`AdaptiveTrigger`), ``one_pass`` ("momentum"/"previous": :class:`OnePass`;
    None or "none": off). No option: :class:`Full`. ``flags`` maps these names to the flags users
    write, for the error messages (``--asam-every must be >= 1, got 0``).
    """
    f = {"every": "every=", "reuse_alpha": "reuse_alpha=", "start": "start=", "adaptive_c": "adaptive_c=",
         "one_pass": "one_pass="}
    f.update(flags or {})
    every = checks.check_every(every, f["every"])
    if reuse_alpha is not None:
        reuse_alpha = checks.check_nonnegative(reuse_alpha, f["reuse_alpha"])
    if start is not None:
        start = checks.check_fraction(start, f["start"])
    if adaptive_c is not None:
        adaptive_c = checks.check_finite(adaptive_c, f["adaptive_c"])
    if one_pass in (None, "none"):
        one_pass = None
    elif one_pass not in OnePass.DIRECTIONS:
        raise ValueError(f"{f['one_pass']} must be one of none, {', '.join(OnePass.DIRECTIONS)}, got {one_pass!r}")
    chosen = [name for name, on in (("every", every > 1 or reuse_alpha is not None), ("start", start is not None),
                                    ("adaptive_c", adaptive_c is not None), ("one_pass", one_pass is not None)) if on]
    if len(chosen) > 1:
        raise ValueError(f"choose one cheaper-update policy, got {' and '.join(f[c].rstrip('=') for c in chosen)}")
    if reuse_alpha is not None:
        if every < 2:
            raise ValueError(f"{f['reuse_alpha']} (Look-ASAM) needs {f['every']} k >= 2, got {every}")
        return LookASAM(every, reuse_alpha)
    if every > 1:
        return EveryK(every)
    if start is not None:
        return LatePhase(start, total_updates)
    if adaptive_c is not None:
        return AdaptiveTrigger(adaptive_c)
    if one_pass is not None:
        return OnePass(one_pass)
    return Full()
