"""The perturbation object: the ascent w -> w + eps and the exact restore (Kwon et al., ICML 2021, Section 4).

Torch only; it owns T_w's rule per parameter (:mod:`~fairseq_asam.core.params`), the buffers, the ascent
(:mod:`~fairseq_asam.core.kernels`, :mod:`~fairseq_asam.core.sharded`) and the in-place restore. It knows
nothing of schedules: the update protocol (:mod:`~fairseq_asam.core.update`) drives it. Runs as is::

    python -c "import torch; from fairseq_asam import Perturbation; m = torch.nn.Linear(4, 2); \
pert = Perturbation(m.named_parameters(), rho=0.5); m(torch.randn(8, 4)).square().mean().backward(); \
print(pert.ascend(), pert.last_eps_norm); pert.restore()"
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .. import checks
from ..checks import check_bool, check_eta, check_p, check_rho
from .kernels import _ascent, _c_of, _Plan
from .operator import normalization_operator
from .params import ParamSpec, _resolve_groups, _spec
from .sharded import _ascent_sharded, _is_dtensor, _like, _local, _local_shard, _reduce_by_group

__all__ = ["HYPERPARAMETERS", "Perturbation", "check_hyperparameters"]

HYPERPARAMETERS = ("rho", "eta", "p")  # per param group, next to lr
_HYPER = HYPERPARAMETERS


def check_hyperparameters(rho, eta, p, normalization="element", *, flags: dict[str, str] | None = None) -> float:
    """Validate the sharpness-aware hyper-parameters; returns p as a float (2.0 or inf).

    ``flags`` maps "rho"/"eta"/"p"/"normalization" to the names the caller's users write (default
    ``rho=`` ...); see :mod:`fairseq_asam.checks`.
    """
    return checks.check_sharpness_hyperparameters(rho, eta, p, normalization, flags=flags)[2]


def _run_ascent(P: _Plan, *, p: float, foreach: bool):
    # Sharded tensors (DTensors) need their norms totalled over the shards; whole tensors do not.
    if any(g is not None for g in P.groups):
        return _ascent_sharded(P, p=p, foreach=foreach)
    return _ascent(P, p=p, foreach=foreach)


class Perturbation:
    """The ascent w -> w + eps and the exact restore (paper Section 4), for any training loop.

    Args:
        params: ``model.named_parameters()`` (recommended: names decide which tensors are biases),
            plain tensors, or param groups (dicts with ``"params"``; optional ``"is_bias"``, and
            ``"rho"``/``"eta"``/``"p"`` for that group); see :func:`resolve_params`.
        rho, eta, p: the defaults of every group (radius, the eta of T_w + eta I, 2 or inf).
        normalization: ``"element"`` or ``"filter"`` (Eq. 5). normalize_bias: T = |b| + eta on biases.
        adaptive: ASAM (True) or SAM (False: T = I, eta unused).
        foreach: ``None`` picks like torch.optim (foreach on CUDA, the per-tensor loop on CPU, where it
            measured faster); both kernels do the same arithmetic.

    ``param_groups`` holds rho, eta and p per group, the way torch.optim holds lr: change them between
    updates (a rho schedule) and :meth:`state_dict` carries them. eps uses the norm of T g over every
    tensor that has a gradient (all groups together); each group's eps is scaled by its own rho.

    Use::

        pert = Perturbation(model.named_parameters(), rho=0.5)
        loss_fn(model(x), y).backward()
        pert.ascend()        # w -> w + eps in place; the gradients are consumed (set to None)
        loss_fn(model(x), y).backward()
        pert.restore()       # w copied back in place, bit for bit
        base_optimizer.step()
    """

    def __init__(
        self,
        params,
        *,
        rho: float,
        eta: float = 0.01,
        p: float | str = 2,
        normalization: str = "element",
        normalize_bias: bool = False,
        adaptive: bool = True,
        foreach: bool | None = None,
        owner=None,
    ):
        check_bool(adaptive, "adaptive=")
        pf = check_hyperparameters(rho, eta, p, normalization)
        check_bool(normalize_bias, "normalize_bias=")
        if foreach not in (None, True, False):
            raise ValueError(f"foreach= must be None, True or False, got {foreach!r}")
        self.adaptive = adaptive
        self.normalization = normalization
        self.normalize_bias = normalize_bias
        self.foreach = foreach
        self.defaults = dict(rho=float(rho), eta=float(eta) if adaptive else 0.0, p=pf)
        self._groups: list[dict[str, Any]] = []
        self._owner = None  # an optimizer whose param_groups are the one list of rho/eta/p (the shells' base)
        self._specs: dict[int, ParamSpec] = {}
        self._buffers: dict[int, Tensor] = {}  # one per parameter: scratch for |w|, then the kept w
        self._perturbed: list[Tensor] = []
        self.last_eps_norm: Tensor | None = None
        self.last_grad_finite = True
        for opts, specs in _resolve_groups(params, **self._rule()):
            self._append(self._group_of(opts, specs, len(self._groups)), specs)
        if owner is not None:
            self._bind(owner)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The groups with rho/eta/p: this object's own, or (``owner=``) the owner optimizer's own list, so a
        scheduler, ``load_state_dict`` or a user changing either changes what the next ascent uses."""
        return self._owner.param_groups if self._owner is not None else self._groups

    def _bind(self, owner) -> None:
        """Make ``owner``'s param_groups the only list: rho/eta/p move into its groups (per group, where they
        were given per group), and this object keeps no copy."""
        base_groups = getattr(owner, "param_groups", None)
        if base_groups is None or not callable(getattr(owner, "step", None)):
            raise ValueError(
                f"base_optimizer= must be an optimizer: {type(owner).__name__} has no param_groups/step(); "
                "pass an instance, e.g. torch.optim.SGD(model.parameters(), lr=0.1), or a class with its arguments"
            )
        mine = {id(t) for g in self._groups for t in g["params"]}
        theirs = {id(t) for g in base_groups for t in g["params"]}
        if mine != theirs:
            raise ValueError(
                "the base optimizer must hold the same parameters as the sharpness-aware optimizer: "
                f"{len(mine - theirs)} of the {len(mine)} parameters given are not in the base optimizer, "
                f"and {len(theirs - mine)} of its {len(theirs)} parameters were not given"
            )
        hyper = {id(t): {k: g[k] for k in _HYPER} for g in self._groups for t in g["params"]}
        for g in base_groups:
            vals = {tuple(sorted(hyper[id(t)].items())) for t in g["params"]}
            if len(vals) > 1:
                raise ValueError("the parameters of one base optimizer group were given different rho/eta/p")
            g.update(dict(vals.pop()) if vals else self.defaults)
        self._owner, self._groups = owner, []

    def _rule(self) -> dict:
        return dict(adaptive=self.adaptive, normalization=self.normalization, normalize_bias=self.normalize_bias)

    def _append(self, group: dict, specs) -> None:
        known = {id(t) for g in self.param_groups for t in g["params"]}
        dup = [s.name for t, s in specs if id(t) in known]
        if dup:
            raise ValueError(f"some parameters appear in more than one group: {', '.join(dup[:3])}")
        for t, s in specs:
            self._specs[id(t)] = s
        if self._owner is not None:
            self._owner.add_param_group(group)
        else:
            self._groups.append(group)

    def _group_of(self, opts: dict, specs, index: int) -> dict:
        """A param group of tensors with rho/eta/p (the defaults where not given), checked."""
        group = {k: v for k, v in opts.items() if k != "is_bias"}
        for k in _HYPER:
            group.setdefault(k, self.defaults[k])
        self._check_group(group, index)
        group["params"] = [t for t, _ in specs]
        return group


    def _check_group(self, group: dict, i: int) -> None:
        where = f"param_groups[{i}]"
        group["rho"] = check_rho(group["rho"], f"{where}['rho']")
        group["eta"] = check_eta(group["eta"], f"{where}['eta']")
        group["p"] = check_p(group["p"], f"{where}['p']")

    def add_param_group(self, group: dict) -> None:
        """Add a group (tensors or (name, tensor) pairs, optional rho/eta/p/is_bias); it is perturbed too.
        With an owner optimizer the group (its tensors, lr, rho/eta/p) is added to the owner's groups."""
        if not isinstance(group, dict):
            raise TypeError(f"add_param_group() takes a dict with a 'params' key, got {type(group).__name__}")
        index = len(self.param_groups)
        ((opts, specs),) = _resolve_groups([group], start=index, **self._rule())
        self._append(self._group_of(opts, specs, index), specs)

    # -- what it computes ------------------------------------------------------------------------

    def spec(self, t: Tensor) -> ParamSpec:
        """How ``t`` is normalized; tensors added to a shared group without a name get the unnamed rule."""
        s = self._specs.get(id(t))
        if s is None:
            s = self._specs[id(t)] = _spec(t, None, f"a tensor of shape {list(t.shape)} added without a name",
                                           is_bias=None, **self._rule())
        return s

    def params(self) -> list[Tensor]:
        """Every parameter, in ``param_groups`` order (the order of the gradient lists the protocol takes)."""
        return [t for g in self.param_groups for t in g["params"]]

    def named_specs(self) -> list[tuple[Tensor, ParamSpec]]:
        return [(t, self.spec(t)) for t in self.params()]

    @torch.no_grad()
    def operator(self, tensors: Iterable[Tensor] | None = None) -> list[Tensor]:
        """The diagonal of T_w (Eq. 5 plus eta I) for each tensor (default: every parameter), shaped like it.

        Norms are accumulated in fp32 (fp64 for fp64 tensors); 1 where the kind is "none".
        """
        eta_of = {id(t): float(g.get("eta", self.defaults["eta"])) for g in self.param_groups for t in g["params"]}
        tensors = list(tensors) if tensors is not None else self.params()
        etas = [eta_of.get(id(t), self.defaults["eta"]) if self.adaptive else 0.0 for t in tensors]
        return normalization_operator(tensors, [self.spec(t).kind for t in tensors], etas)

    def _plan(self, grads: dict[int, Tensor] | None = None) -> tuple[_Plan, float]:
        W, G, S, kinds, etas, rhos, cs, shard_groups = [], [], [], [], [], [], [], []
        ps = set()
        for gi, group in enumerate(self.param_groups):
            for k in _HYPER:
                group.setdefault(k, self.defaults[k])
            self._check_group(group, gi)  # a scheduler or a user may have changed them
            eta = group["eta"] if self.adaptive else 0.0
            for t in group["params"]:
                g = t.grad if grads is None else grads.get(id(t))
                if g is None:
                    continue  # parameters with no grad are left alone
                spec = self.spec(t)
                if g.is_sparse:
                    raise RuntimeError(f"the sharpness-aware perturbation does not support sparse gradients ({spec.name})")
                # A DTensor (fully_shard) is worked on through its local slice; its group totals the norm.
                w, g, shard_group = _local_shard(t.data if grads is None else t, g, spec)
                buf = self._buffers.get(id(t))
                if buf is None or buf.shape != w.shape or buf.dtype != w.dtype or buf.device != w.device:
                    self._allocate_buffers()
                    buf = self._buffers[id(t)]
                ps.add(group["p"])
                W.append(w)
                G.append(g)
                S.append(buf)
                shard_groups.append(shard_group)
                kinds.append(spec.kind)
                etas.append(eta)
                rhos.append(group["rho"])
                cs.append(_c_of(spec.kind, eta, g, group["p"]))
        if len(ps) > 1:
            raise ValueError(f"every param group must have the same p, got {sorted(ps)}")
        return _Plan(W, G, S, kinds, etas, rhos, cs, shard_groups), (ps.pop() if ps else self.defaults["p"])

    def _allocate_buffers(self) -> None:
        """One buffer per parameter (its local shard for a DTensor), all carved from one flat tensor per
        (dtype, device): a block of many megabytes, which glibc serves with mmap, never from the heap, so a
        persistent buffer allocated in the middle of an update cannot pin the heap's top and keep the memory
        freed below it resident (docs/performance.md measures the peak memory). Parameters whose layout has no exact view
        (overlapping or non-dense strides) get a buffer of their own."""
        tensors = []
        for group in self.param_groups:
            for t in group["params"]:
                w = t.data.to_local() if _is_dtensor(t.data) else t.data
                tensors.append((t, w))
        flat: dict = {}
        for t, w in tensors:
            if w.is_contiguous() or (w.dim() == 4 and w.is_contiguous(memory_format=torch.channels_last)):
                flat.setdefault((w.dtype, w.device), []).append((t, w))
            else:
                self._buffers[id(t)] = torch.empty_like(w, memory_format=torch.preserve_format)
        for (dtype, device), items in flat.items():
            block = torch.empty(sum(w.numel() for _, w in items), dtype=dtype, device=device)
            off = 0
            for t, w in items:
                # The same strides as the parameter (channels_last stays channels_last), inside the block.
                self._buffers[id(t)] = block.as_strided(w.shape, w.stride(), off)
                off += w.numel()

    def _use_foreach(self, tensors) -> bool:
        if self.foreach is not None:
            return self.foreach
        return bool(tensors) and all(t.is_cuda for t in tensors)

    @torch.no_grad()
    def ascend(self, set_to_none: bool = True) -> bool:
        """w -> w + eps in place from the gradients in ``.grad``, which are consumed.

        ``set_to_none=True`` drops the gradients (as ``zero_grad()`` does, no pass over memory);
        ``False`` zeroes them in place, so the second backward accumulates into the same tensors instead
        of allocating new ones (one memset; it keeps the allocator from fragmenting the heap between the
        passes, which costs peak memory on the CPU with glibc's default settings).

        Returns False when the gradient is not finite: the weights are untouched and the caller skips
        the update. w is kept in a persistent buffer (allocated once per parameter, reused).
        """
        if self._perturbed:
            raise RuntimeError("ascend() called twice without restore(): the weights are still perturbed")
        params = [t for t in self.params() if t.grad is not None]
        P, p = self._plan()
        if not P.W:
            self.last_grad_finite, self.last_eps_norm = True, None
            return True
        out = _run_ascent(P, p=p, foreach=self._use_foreach(P.W))
        # The grads hold scratch now; the second backward needs them gone or zero.
        if set_to_none:
            for t in params:
                t.grad = None
        else:
            grads = [t.grad for t in params]
            if self._use_foreach(grads):
                torch._foreach_zero_(grads)
            else:
                for g in grads:
                    g.zero_()
        if out is None:
            self.last_grad_finite, self.last_eps_norm = False, None
            return False
        self.last_grad_finite = True
        self.last_eps_norm = out[0]  # ||eps||_2 for logging, left on the device
        self._perturbed = params
        return True

    @torch.no_grad()
    def ascend_along(self, directions: Iterable[Tensor | None], *, scratch: bool = False) -> bool:
        """w -> w + eps in place with eps computed from ``directions`` (one per parameter, in ``param_groups``
        order; None: that tensor is not perturbed) in place of the gradient; ``.grad`` is not touched.

        The one-pass policies of :mod:`fairseq_asam.schedule` perturb w this way before the update's only
        forward/backward. Returns False (weights untouched) when the directions are not finite.
        ``scratch=True`` lets the kernels overwrite the direction tensors (their values are gone afterwards;
        saves a copy of the parameters' size per update); the default works on a copy.
        """
        if self._perturbed:
            raise RuntimeError("ascend_along() called while the weights are still perturbed (restore() first)")
        params = self.params()
        directions = list(directions)
        if len(directions) != len(params):
            raise ValueError(f"ascend_along() needs one direction per parameter ({len(params)}), got {len(directions)}")
        # The kernels use the gradient slot as scratch: a private copy unless the caller gave its tensors up.
        gmap = {id(t): (d.detach() if scratch and d.dtype == t.dtype and d.device == t.device
                        else d.detach().to(device=t.device, dtype=t.dtype).clone())
                for t, d in zip(params, directions) if d is not None}
        if not gmap:
            return False
        P, p = self._plan(gmap)
        P.W = [w.data for w in P.W]
        out = _run_ascent(P, p=p, foreach=self._use_foreach(P.W))
        if out is None:
            self.last_grad_finite, self.last_eps_norm = False, None
            return False
        self.last_grad_finite = True
        self.last_eps_norm = out[0]
        self._perturbed = [t for t in params if id(t) in gmap]
        return True

    @property
    def perturbed(self) -> bool:
        """True between :meth:`ascend` and :meth:`restore`."""
        return bool(self._perturbed)

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the kept w back into each parameter's own storage, bit for bit (not w + eps - eps)."""
        if not self._perturbed:
            return
        W = [_local(t.data) for t in self._perturbed]
        S = [self._buffers[id(t)] for t in self._perturbed]
        if self._use_foreach(W):
            torch._foreach_copy_(W, S)
        else:
            for w, s in zip(W, S):
                w.copy_(s)
        self._perturbed = []

    @torch.no_grad()
    def applied_eps_norm(self) -> Tensor | None:
        """||w_eps - w||_2 of the perturbation as stored in the weights' dtype (fp32 arithmetic), while perturbed.

        In fp16/bf16 weights much of a small eps rounds away; :attr:`last_eps_norm` is the intended norm.
        On sharded parameters every rank must call it (it all-reduces the shards' sums).
        """
        if not self._perturbed:
            return None
        vecs: dict = {}
        for t in self._perturbed:
            w, _, group = _local_shard(t.data, t.data, self.spec(t))
            q = (w.float() - self._buffers[id(t)].float()).square().sum().reshape(1)
            vecs[group] = vecs[group] + q.to(vecs[group].device) if group in vecs else q
        return _reduce_by_group(vecs)[0].sqrt()

    @torch.no_grad()
    def compute_eps(self, grads: Iterable[Tensor | None]) -> list[Tensor | None]:
        """eps for the given gradients (one per parameter, in ``param_groups`` order; None: no eps) as new
        tensors, with this object's T_w and hyper-parameters; the weights are not touched."""
        params = self.params()
        grads = list(grads)
        if len(grads) != len(params):
            raise ValueError(f"compute_eps() needs one gradient per parameter ({len(params)}), got {len(grads)}")
        gmap = {id(t): g.detach().clone() for t, g in zip(params, grads) if g is not None}
        saved = self._buffers
        self._buffers = {}
        try:
            P, p = self._plan(gmap)
            P.W = [w.detach().clone() for w in P.W]  # phase 2 writes w + eps into W
            out = _run_ascent(P, p=p, foreach=self._use_foreach(P.W)) if P.W else (None, [])
        finally:
            self._buffers = saved
        if out is None:
            raise ValueError("the gradient is not finite")
        eps = {id(t): _like(t, g * a) for t, g, a in zip([t for t in params if id(t) in gmap], P.G, out[1])}
        return [eps.get(id(t)) for t in params]

    # -- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The hyper-parameters per group and the normalization rule (the buffers are scratch, not state)."""
        return {
            "param_groups": [{k: g[k] for k in _HYPER if k in g} for g in self.param_groups],
            "normalization": self.normalization,
            "normalize_bias": self.normalize_bias,
            "adaptive": self.adaptive,
        }

    def check_saved_rule(self, state: dict, *, hint: str = "") -> None:
        """Raise ``ValueError`` when a saved state's rule (ASAM or SAM, normalization, bias rule) is not this
        object's; keys missing from ``state`` are not checked. ``hint`` ends the message."""
        if state.get("adaptive", self.adaptive) != self.adaptive:
            raise ValueError(
                f"this state was saved by {'ASAM' if state['adaptive'] else 'SAM'}, "
                f"not {'ASAM' if self.adaptive else 'SAM'}{hint}"
            )
        if (state.get("normalization", self.normalization), state.get("normalize_bias", self.normalize_bias)) != (
                self.normalization, self.normalize_bias):
            raise ValueError(
                f"the state's normalization/normalize_bias ({state.get('normalization')}/{state.get('normalize_bias')}) "
                f"differ from this object's ({self.normalization}/{self.normalize_bias}); construct it with the saved ones"
            )

    def load_state_dict(self, state: dict) -> None:
        if self._perturbed:
            raise RuntimeError("load_state_dict() while the weights are perturbed (between ascend() and restore())")
        self.check_saved_rule(state)
        groups = state.get("param_groups", [])
        if len(groups) != len(self.param_groups):
            raise ValueError(f"the state has {len(groups)} param groups, this object {len(self.param_groups)}")
        for i, saved in enumerate(groups):
            trial = dict(self.param_groups[i], **saved)
            self._check_group(trial, i)
        for i, (group, saved) in enumerate(zip(self.param_groups, groups)):
            group.update({k: saved[k] for k in _HYPER if k in saved})
            self._check_group(group, i)

    def __repr__(self) -> str:
        g = self.param_groups[0] if self.param_groups else self.defaults
        p = "inf" if g["p"] == math.inf else "2"
        if not self.adaptive:
            return f"Perturbation(SAM, rho={g['rho']}, p={p})"
        return (f"Perturbation(ASAM, rho={g['rho']}, p={p}, eta={g['eta']}, normalization={self.normalization!r}, "
                f"normalize_bias={self.normalize_bias})")

