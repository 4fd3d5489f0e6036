"""The ``torch.optim`` shells :class:`ASAM` and :class:`SAM`: a perturbation, a schedule and any base optimizer.

ASAM (Kwon et al., ICML 2021, Section 4, Algorithm 1) and SAM (Foret et al., ICLR 2021) as optimizers:
:attr:`ASAM.perturbation` does the ascent and the restore, :attr:`ASAM.base_optimizer` the descent,
:attr:`ASAM.driver` runs the update protocol (:mod:`fairseq_asam.core.update`) with the policy of
``schedule=``. Example (runs as is)::

    import torch
    from fairseq_asam import ASAM
    model = torch.nn.Linear(4, 2)
    opt = ASAM(model.named_parameters(), torch.optim.SGD(model.parameters(), lr=0.1), rho=0.5)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.ascent_step()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.descent_step()
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .. import _compat
from ..checks import check_bool, check_eta, check_p, check_rho
from ..schedule import Full, Schedule
from .perturb import _HYPER, Perturbation
from .update import UpdateAdapter, UpdateDriver

__all__ = ["ASAM", "SAM"]


def _is_optimizer_class(obj) -> bool:
    return isinstance(obj, type) and callable(getattr(obj, "step", None))


def _tensors_only(params) -> list:
    """The groups/tensors for a base optimizer: names dropped, our own keys removed."""
    items = list(params)
    if items and isinstance(items[0], dict):
        out = []
        for g in items:
            g = dict(g)
            plist = [g["params"]] if isinstance(g["params"], Tensor) else list(g["params"])
            g["params"] = [e[1] if isinstance(e, tuple) else e for e in plist]
            g.pop("is_bias", None)
            out.append(g)
        return out
    return [e[1] if isinstance(e, tuple) else e for e in items]


def _from_lightning(closure) -> bool:
    """True for a closure PyTorch Lightning's precision plugins hand to ``optimizer.step`` (no import of it)."""
    f = closure.func if isinstance(closure, functools.partial) else closure
    owner = getattr(f, "__self__", None)
    module = type(owner).__module__ if owner is not None else getattr(f, "__module__", None) or ""
    return module.split(".")[0] in ("pytorch_lightning", "lightning")


class _Closure(UpdateAdapter):
    """``step(closure)``'s side of the update: the closure runs a pass, the base optimizer steps."""

    def __init__(self, base, closure, model):
        self.base, self.closure, self.model = base, closure, model

    def rerun(self, item, last: bool) -> None:
        with torch.enable_grad():
            self.closure()

    def base_step(self) -> None:
        self.base.step()


class ASAM(torch.optim.Optimizer):
    """Adaptive Sharpness-Aware Minimization (the paper's ASAM) around any base optimizer.

    A thin shell: :attr:`perturbation` (a :class:`Perturbation`) does the ascent and the restore,
    :attr:`base_optimizer` the descent. It follows ``torch.optim``: ``param_groups`` is the base
    optimizer's own list, and each group carries ``rho``, ``eta`` and ``p`` next to ``lr``, so an LR
    scheduler, a rho schedule (``group["rho"] = ...``) and ``state_dict()`` see them;
    :meth:`add_param_group` adds parameters to both.

    Args:
        params: ``model.named_parameters()`` (recommended: names decide which tensors are biases),
            plain tensors or param groups; see :func:`resolve_params` for the rule on unnamed 1-D tensors.
        base_optimizer: a ``torch.optim`` (or fairseq) optimizer instance over the same parameters, or an
            optimizer class, built here over ``params`` with ``**base_kwargs`` (``lr=0.1, momentum=0.9``).
        rho: radius of the perturbation region (paper: 0.5 CIFAR-10, 1.0 CIFAR-100/ImageNet, 0.2 IWSLT'14).
        eta: the eta of T_w + eta I (paper: 0.01), for stability where weights are near zero.
        p: 2 or ``float("inf")``.
        normalization: ``"element"`` or ``"filter"`` (paper Eq. 5).
        normalize_bias: also normalize biases (T = |b| + eta); the paper's default is off (T = 1).
        foreach: ``None`` picks the way torch.optim does; ``True``/``False`` force a kernel.
        schedule: which updates run the second pass (:mod:`fairseq_asam.schedule`: ``EveryK(5)``,
            ``LookASAM(5, 0.7)``, ``LatePhase(0.5, total)``, ``AdaptiveTrigger(1.0)``, ``OnePass()``);
            default :class:`~fairseq_asam.schedule.Full`, the paper's update every time. A loop that
            honours it calls :meth:`begin_step`, backward, :meth:`scheduled_ascent` (True: run the second
            forward/backward) and :meth:`descent_step`; :meth:`step` with a closure does so.
    """

    _adaptive = True

    def __init__(
        self,
        params,
        base_optimizer,
        rho: float = 0.5,
        eta: float = 0.01,
        p: float | str = 2,
        normalization: str = "element",
        normalize_bias: bool = False,
        *,
        foreach: bool | None = None,
        schedule: Schedule | None = None,
        **base_kwargs,
    ):
        self._init(params, base_optimizer, rho=rho, eta=eta, p=p, normalization=normalization,
                   normalize_bias=normalize_bias, adaptive=self._adaptive, foreach=foreach, base_kwargs=base_kwargs,
                   schedule=schedule)

    def _init(self, params, base_optimizer, *, rho, eta, p, normalization, normalize_bias, adaptive, foreach,
              base_kwargs, schedule=None):
        params = list(params) if not isinstance(params, Tensor) else params
        pert = Perturbation(params, rho=rho, eta=eta, p=p, normalization=normalization,
                            normalize_bias=normalize_bias, adaptive=adaptive, foreach=foreach)
        if _is_optimizer_class(base_optimizer):
            base_optimizer = base_optimizer(_tensors_only(params), **base_kwargs)
        elif base_kwargs:
            raise TypeError(
                f"unexpected keyword arguments {sorted(base_kwargs)}: they are for a base optimizer class "
                "(ASAM(params, torch.optim.SGD, lr=0.1)); an optimizer instance already has its own"
            )
        else:
            for g in pert.param_groups:
                extra = set(g) - {"params", *_HYPER}
                if extra or any(g[k] != pert.defaults[k] for k in _HYPER):
                    raise ValueError(
                        "with a base optimizer instance, set per-group options on the base optimizer's param "
                        f"groups (opt.param_groups[i]['rho'] = ...), not in the groups given to {type(self).__name__}"
                    )
        # One list of groups from here on: the base optimizer's, holding rho/eta/p next to lr.
        pert._bind(base_optimizer)
        defaults = dict(getattr(base_optimizer, "defaults", {}), **pert.defaults)
        super().__init__(pert.params(), defaults)
        # Set after torch's __init__, whose param_groups/add_param_group calls must not reach the base.
        self.__dict__.pop("_init_groups", None)
        self.base_optimizer = base_optimizer
        self.perturbation = pert
        self.driver = UpdateDriver(pert, schedule, momenta=self._momenta)

    # param_groups and state are the base optimizer's own (not copies): a scheduler or a user changing lr
    # or rho on either object changes what is used, also after load_state_dict() replaced the base's list.
    @property
    def param_groups(self) -> list[dict]:
        base = self.__dict__.get("base_optimizer")
        return base.param_groups if base is not None else self.__dict__.setdefault("_init_groups", [])

    @param_groups.setter
    def param_groups(self, groups: list[dict]) -> None:
        base = self.__dict__.get("base_optimizer")
        if base is None:
            self.__dict__["_init_groups"] = groups
        else:
            base.param_groups = groups

    @property
    def state(self):
        base = self.__dict__.get("base_optimizer")
        if base is not None and isinstance(getattr(base, "state", None), dict):
            return base.state
        return self.__dict__.setdefault("_own_state", {})

    @state.setter
    def state(self, value) -> None:
        base = self.__dict__.get("base_optimizer")
        if base is not None and isinstance(getattr(base, "state", None), dict):
            base.state = value
        else:
            self.__dict__["_own_state"] = value

    # -- hyper-parameters as attributes (the first group's), for convenience ------------------

    def _hp(self, k):
        return self.param_groups[0][k] if self.param_groups and k in self.param_groups[0] else self.perturbation.defaults[k]

    def _set_hp(self, k, v):
        for g in self.param_groups:
            g[k] = v

    rho = property(lambda self: self._hp("rho"), lambda self, v: self._set_hp("rho", check_rho(v)),
                   doc="rho of every group (reading: the first group's)")
    eta = property(lambda self: self._hp("eta"), lambda self, v: self._set_hp("eta", check_eta(v)),
                   doc="eta of every group (reading: the first group's)")
    p = property(lambda self: self._hp("p"), lambda self, v: self._set_hp("p", check_p(v)),
                 doc="p of every group (reading: the first group's)")
    normalization = property(lambda self: self.perturbation.normalization)
    normalize_bias = property(lambda self: self.perturbation.normalize_bias)
    foreach = property(lambda self: self.perturbation.foreach)

    @property
    def schedule(self) -> Schedule:
        """The cheaper-update policy (:mod:`fairseq_asam.schedule`); :class:`~fairseq_asam.schedule.Full` by default."""
        return self.driver.schedule

    def _momenta(self) -> list[Tensor | None]:
        # The base optimizer's momentum per parameter: SGD's momentum_buffer, Adam's exp_avg.
        state = getattr(self.base_optimizer, "state", {})
        out = []
        for t in self.perturbation.params():
            st = state.get(t) or {}
            out.append(next((v for k in ("momentum_buffer", "exp_avg") if isinstance(v := st.get(k), Tensor)), None))
        return out

    @property
    def last_eps_norm(self) -> Tensor | None:
        """||eps||_2 of the last ascent (a device tensor), None if it was skipped."""
        return self.perturbation.last_eps_norm

    @property
    def last_grad_finite(self) -> bool:
        return self.perturbation.last_grad_finite

    # -- the update protocol (fairseq_asam.core.update): every front end runs these, in this order --

    def begin_step(self, directions=None) -> bool:
        """An update starts, before its first forward. A one-pass policy moves w to w + eps here (returns
        True: the update's only forward/backward runs there); the others do nothing.

        ``directions``: the base optimizer's momentum per parameter when it is not in the base optimizer's
        state (``momentum_buffer``, ``exp_avg``), which is where it is read by default.

        The random state is saved here: :meth:`ascent_step` replays it, so the loop's second forward draws
        the same dropout masks as its first, and the end of the update puts back what the first left.
        """
        return self.driver.begin_step(directions, record=True)

    def wants_second_pass(self, grads=None, *, scale: float = 1.0, reduce=None) -> bool:
        """After the first backward: w goes back to w if :meth:`begin_step` moved it, and the schedule
        decides from the update's gradient whether the second pass runs (True: call :meth:`ascent_step`).

        ``grads``: g per parameter (default ``.grad``); ``scale``: the factor it carries (a GradScaler's
        scale); ``reduce``: averages tensors in place across workers where each worker holds its own g.
        """
        return self.driver.wants_second_pass(grads, scale=scale, reduce=reduce)

    def ascent_step(self, zero_grad: bool = True) -> bool:
        """w -> w + eps using the gradients in ``.grad``.

        The gradients at w are consumed either way (their memory holds the ascent's scratch), so they
        are None afterwards; ``zero_grad`` is accepted for code written for davda54/sam. Returns False
        (weights untouched) when the gradient is not finite: :meth:`descent_step` then skips the update.
        Called without :meth:`wants_second_pass` (the paper's loop), the update is the full one; a
        schedule that skips second passes refuses that at once, naming the loop to use instead.
        """
        return self.driver.ascent_step()

    first_step = ascent_step  # the name used by the davda54/sam wrapper

    def scheduled_ascent(self) -> bool:
        """:meth:`wants_second_pass` and, where it says yes, :meth:`ascent_step`: True when the loop must
        run the second forward/backward now (w is at w + eps). False: call :meth:`descent_step` now; it
        steps with g (and the schedule's rule), or skips the update when g was not finite
        (:attr:`last_grad_finite` is then False)."""
        return self.wants_second_pass() and self.ascent_step()

    def end_step(self, grads=None, *, reduce=None) -> bool:
        """Before the base optimizer's step, for front ends that step it themselves (a GradScaler):
        w restored bit for bit, the schedule's gradient rule on ``grads`` (default ``.grad``), its counters.
        False: this update found a non-finite gradient; skip the base step."""
        return self.driver.end_step(grads, reduce=reduce)

    def skip_step(self) -> None:
        """Abandon this update (a non-finite gradient): w restored, the gradients dropped, nothing counted."""
        self.driver.skip_step()
        self.zero_grad()

    def restore(self) -> None:
        """Put back the weights of the last ascent bit for bit, in place."""
        self.perturbation.restore()

    def descent_step(self, zero_grad: bool = True):
        """:meth:`end_step`, then the base optimizer's step with the gradient taken at w + eps (or, on an
        update the schedule runs without the second pass, with g and the schedule's rule)."""
        out = self.base_optimizer.step() if self.end_step() else None
        # torch's LR schedulers warn unless the optimizer's step() ran; descent_step() is that step.
        _compat.mark_optimizer_stepped(self)
        if zero_grad:
            self.zero_grad()
        return out

    second_step = descent_step

    def step(self, closure: Callable[[], Tensor] | None = None, *, model: nn.Module | None = None):
        """The whole update. ``closure`` must zero the grads, run forward and backward, and return the loss.

        Its second call (at w + eps) draws the same random numbers as its first (dropout masks), and the
        random state afterwards is what the first call left. ``model``: the module the closure runs; its
        BatchNorm layers then keep their running statistics unchanged in the second call
        (:func:`fairseq_asam.batchnorm.frozen_bn_stats`). Returns the first call's loss (at w).
        """
        if self._descent_only:
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            self.base_optimizer.step()
            return loss
        if closure is None:
            raise RuntimeError(
                f"{type(self).__name__}.step() needs a closure that zeroes the grads, runs forward and "
                "backward and returns the loss, e.g. step(lambda: (opt.zero_grad(), loss_fn(model(x), y).backward())...); "
                "or call ascent_step() and descent_step() around your own second forward/backward. "
                "(PyTorch Lightning steps it this way under precision='16-mixed': use "
                "fairseq_asam.integrations.lightning.SharpnessAwareMixin)"
            )
        if _from_lightning(closure):
            # Lightning hands over only the update's last micro-batch, and its closure fires the optimizer-step
            # hooks and clipping: a second call would be another micro-batch's update with the hooks twice.
            raise RuntimeError(
                f"PyTorch Lightning stepped {type(self).__name__} directly: put "
                "fairseq_asam.integrations.lightning.SharpnessAwareMixin first in the LightningModule's bases "
                "(automatic optimization), or call self.sharpness_step(closure) (manual optimization)"
            )
        self.driver.begin_step()
        with self.driver.first_pass(), torch.enable_grad():
            loss = closure()
        self.driver.finish(_Closure(self.base_optimizer, closure, model))
        # torch's LR schedulers warn unless the optimizer's step() ran; this is that step.
        _compat.mark_optimizer_stepped(self)
        self.zero_grad()
        return loss

    _descent_only = False

    @contextlib.contextmanager
    def descent_only(self):
        """Inside this block :meth:`step` is the base optimizer's step alone (a closure given runs once first):
        for a trainer whose precision plugin steps the optimizer after the update's sequence has run
        (:mod:`fairseq_asam.integrations.lightning`)."""
        self._descent_only = True
        try:
            yield
        finally:
            self._descent_only = False

    # -- plumbing ------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        """Add a group to the base optimizer and to the perturbation (tensors or (name, tensor) pairs)."""
        if not hasattr(self, "perturbation"):  # torch.optim.Optimizer.__init__ adds the initial groups
            return super().add_param_group(param_group)
        self.perturbation.add_param_group(param_group)  # checked there, added to the base's groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        if set_to_none:
            self.base_optimizer.zero_grad()  # fairseq's optimizers take no set_to_none argument
        else:
            self.base_optimizer.zero_grad(set_to_none=False)

    def state_dict(self) -> dict:
        """The base optimizer's state dict (rho/eta/p are in its param_groups) and the normalization rule."""
        pert = self.perturbation.state_dict()
        pert.pop("param_groups")
        return {"base": self.base_optimizer.state_dict(), "asam": pert, "schedule": self.schedule.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores the base optimizer's state and the hyper-parameters (as torch.optim restores lr).

        A plain state dict of the base optimizer (no ``"base"`` key) is accepted too, to switch a run
        from its base optimizer to SAM/ASAM; groups without rho/eta/p keep the current values.
        """
        if self.perturbation.perturbed:
            raise RuntimeError("load_state_dict() between ascent_step() and descent_step()")
        if "base" in state_dict:
            hp, base_state = dict(state_dict.get("asam", {})), state_dict["base"]
        else:
            hp, base_state = {}, state_dict
        self.perturbation.check_saved_rule(hp, hint="; load state_dict['base'] to move the base optimizer's state across")
        current = [{k: g[k] for k in _HYPER if k in g} for g in self.param_groups]
        legacy = {k: hp[k] for k in _HYPER if k in hp}  # state dicts written before rho moved into the groups
        for i, g in enumerate(base_state.get("param_groups", [])):
            trial = dict(current[i] if i < len(current) else self.perturbation.defaults, **legacy, **g)
            self.perturbation._check_group(trial, i)
        # A copy: torch's optimizers keep the loaded tensors themselves, so loading the live state of
        # another optimizer would make the two share (and double-update) their moments.
        if "schedule" in state_dict:
            self.schedule.load_state_dict(copy.deepcopy(state_dict["schedule"]))
        self.base_optimizer.load_state_dict(copy.deepcopy(base_state))
        for i, g in enumerate(self.param_groups):
            for k in _HYPER:
                if k not in g:
                    g[k] = legacy.get(k, current[i].get(k, self.perturbation.defaults[k]) if i < len(current)
                                      else self.perturbation.defaults[k])
            self.perturbation._check_group(g, i)

    def __repr__(self) -> str:
        p = "inf" if self.p == math.inf else "2"
        name = type(self).__name__
        if not self.perturbation.adaptive:
            return f"{name}(rho={self.rho}, p={p}, base={type(self.base_optimizer).__name__})"
        extra = "" if name == "ASAM" else "adaptive=True, "
        policy = "" if type(self.schedule) is Full else f", schedule={self.schedule!r}"
        return (f"{name}({extra}rho={self.rho}, p={p}, eta={self.eta}, normalization={self.normalization!r}, "
                f"normalize_bias={self.normalize_bias}, base={type(self.base_optimizer).__name__}{policy})")


class SAM(ASAM):
    """Sharpness-Aware Minimization (Foret et al., 2021): T_w = I.

    Also takes the constructor of the davda54/sam wrapper, so loops written for it run after changing
    only the import: ``SAM(model.parameters(), torch.optim.SGD, rho=0.05, adaptive=True, lr=0.1,
    momentum=0.9)`` (a base optimizer class plus its keyword arguments). ``adaptive=True`` gives that
    wrapper's adaptive SAM, which differs from the paper's ASAM in two defaults: eta = 0 (T = |w|) and
    every tensor normalized, biases and norm-layer weights included (``normalize_bias=True``). Pass
    ``eta=0.01, normalize_bias=False`` with ``model.named_parameters()`` for the paper's ASAM, or use
    :class:`ASAM`.
    """

    _adaptive = False

    def __init__(
        self,
        params,
        base_optimizer,
        rho: float = 0.05,
        p: float | str = 2,
        *,
        adaptive: bool = False,
        eta: float | None = None,
        normalization: str = "element",
        normalize_bias: bool | None = None,
        foreach: bool | None = None,
        schedule: Schedule | None = None,
        **base_kwargs,
    ):
        check_bool(adaptive, "adaptive=")
        if not adaptive and (eta is not None or normalize_bias is not None or normalization != "element"):
            raise ValueError("eta=, normalization= and normalize_bias= apply to SAM(adaptive=True) or ASAM only")
        self._init(params, base_optimizer, rho=rho, eta=0.0 if eta is None else eta, p=p,
                   normalization=normalization, normalize_bias=True if normalize_bias is None else normalize_bias,
                   adaptive=adaptive, foreach=foreach, base_kwargs=base_kwargs, schedule=schedule)

