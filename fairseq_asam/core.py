"""The sharpness-aware step: ASAM (Kwon et al., ICML 2021, Section 4, Algorithm 1) and SAM (Foret et al.).

Torch only. One object, :class:`Perturbation`, owns the math: the normalization operator T_w (paper
Eq. 5 plus eta I: element-wise, filter-wise, biases), which tensor is normalized how, the buffers, the
ascent w -> w + eps and the exact restore. Every caller uses it: the optimizer shells :class:`ASAM` and
:class:`SAM` below (perturbation + any base optimizer, ``torch.optim`` conventions), the fairseq task,
the vision training step and the sharpness measure. One update with weights w, radius rho:

    g     = grad L(w)
    eps   = rho * T_w^2 g / ||T_w g||_2          (p = 2)
    eps   = rho * T_w sign(g)                    (p = inf)
    g'    = grad L(w + eps)
    w     <- w exactly (copied back in place), then the base optimizer steps with g'

SAM is T_w = I. Example (runs as is)::

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

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import _compat
from .checks import check_bool, check_eta, check_p, check_rho, check_sharpness_hyperparameters
from .schedule import Full, Schedule

__all__ = [
    "ASAM", "SAM", "ParamSpec", "Perturbation", "check_hyperparameters", "filter_operator",
    "normalization_operator", "perturbation", "resolve_params",
]

_HYPER = ("rho", "eta", "p")


def check_hyperparameters(rho, eta, p, normalization="element", *, flags: dict[str, str] | None = None) -> float:
    """Validate the sharpness-aware hyper-parameters; returns p as a float (2.0 or inf).

    ``flags`` maps "rho"/"eta"/"p"/"normalization" to the names the caller's users write (default
    ``rho=`` ...); see :mod:`fairseq_asam.checks`.
    """
    return check_sharpness_hyperparameters(rho, eta, p, normalization, flags=flags)[2]


@dataclass(frozen=True)
class ParamSpec:
    """How one parameter is normalized.

    kind: "none" (T = 1: SAM, or a bias without bias normalization), "element" (T = |w| + eta)
    or "filter" (T = ||filter||_2 + eta for every entry of each output-channel filter).
    """

    name: str
    kind: str


def _spec(t: Tensor, name: str | None, label: str, *, is_bias: bool | None, adaptive: bool,
          normalization: str, normalize_bias: bool) -> ParamSpec:
    if is_bias is None:
        if name is not None:
            is_bias = name.endswith("bias")
        elif t.dim() >= 2:
            is_bias = False
        elif not adaptive or normalize_bias:
            is_bias = False  # the answer does not change the perturbation
        else:
            raise ValueError(
                f"ASAM cannot tell whether the 1-D parameter {label} is a bias (T = 1) or a weight "
                "(T = |w| + eta). Pass model.named_parameters() (names ending in 'bias' are biases), "
                "or param groups with 'is_bias': True/False, or normalize_bias=True."
            )
    if not adaptive or (is_bias and not normalize_bias):
        kind = "none"
    elif normalization == "filter" and t.dim() >= 3 and not is_bias:
        # Filter-wise needs whole filters: one output channel = one slice along dim 0.
        kind = "filter"
    else:
        kind = "element"
    return ParamSpec(label, kind)


def _resolve_groups(params, *, adaptive: bool, normalization: str, normalize_bias: bool, start: int = 0):
    """[(group dict without "params", [(tensor, ParamSpec), ...]), ...] from what torch.optim accepts."""
    if isinstance(params, Tensor):
        raise TypeError("params must be an iterable of tensors, (name, tensor) pairs or param groups, got a Tensor")
    items = list(params)
    if not items:
        raise ValueError("ASAM/SAM got an empty parameter list")
    groups = items if isinstance(items[0], dict) else [{"params": items}]
    out = []
    seen: set[int] = set()
    for gi, group in enumerate(groups, start):
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError(f"param group {gi} must be a dict with a 'params' key, got {type(group).__name__}")
        plist = group["params"]
        plist = [plist] if isinstance(plist, Tensor) else list(plist)
        group_bias = group.get("is_bias")
        if group_bias is not None and not isinstance(group_bias, bool):
            raise ValueError(f"param group {gi}: 'is_bias' must be True or False, got {group_bias!r}")
        specs = []
        for idx, entry in enumerate(plist):
            if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str):
                name, t = entry
            elif isinstance(entry, Tensor):
                name, t = None, entry
            else:
                raise TypeError(
                    f"param group {gi}, entry {idx}: expected a tensor or a (name, tensor) pair, got {type(entry).__name__}"
                )
            if id(t) in seen:
                raise ValueError(f"parameter {name or idx} appears more than once")
            seen.add(id(t))
            label = name if name is not None else f"group {gi} #{idx} (shape {list(t.shape)})"
            specs.append((t, _spec(t, name, label, is_bias=group_bias, adaptive=adaptive,
                                   normalization=normalization, normalize_bias=normalize_bias)))
        out.append(({k: v for k, v in group.items() if k != "params"}, specs))
    return out


def resolve_params(params, *, adaptive: bool, normalization: str, normalize_bias: bool):
    """Turn what the user passed into a list of (tensor, ParamSpec).

    Accepted, the way torch.optim accepts them:

    - ``model.named_parameters()`` (pairs ``(name, tensor)``): a name ending in ``bias`` is a bias;
    - plain tensors (``model.parameters()``);
    - param groups: dicts with ``"params"`` holding either of the above, and optionally
      ``"is_bias": True/False`` marking every tensor of the group.

    The documented rule for unnamed tensors: a tensor with two or more dimensions is a weight. A 1-D
    tensor is ambiguous (a bias, or the weight of a norm layer?), and when the answer changes the
    perturbation (ASAM without bias normalization) it raises ``ValueError`` instead of guessing.
    """
    groups = _resolve_groups(params, adaptive=adaptive, normalization=normalization, normalize_bias=normalize_bias)
    return [pair for _, specs in groups for pair in specs]


# ----------------------------------------------------------------------------------------------
# Kernels. The ascent works on the weights W, their grads G and one persistent buffer S per
# parameter, in two phases around the one host sync; both kernels do the same arithmetic, op for op:
#
#   phase 1: S <- |w| (scratch), G <- c T g; returns ||T g||^2 (p = 2) or ||g||^2 (p = inf, only to
#            detect a non-finite gradient), on the device;
#   sync:    the norm, its finiteness, the scale;
#   phase 2: G <- T^2 g or T sign(g), times the tensor's factor; S <- w; w <- w + eps in place;
#            returns ||eps||^2 on the device.
#
# c = 1/eta on element-wise tensors folds the "+ eta" of T into one multiply-add: g + g |w| / eta =
# (T g) / eta saves a pass over memory. fp16 tensors keep c = 1 (g / eta^2 could overflow) and are
# brought to the size of eps before their second multiplication by T (T^2 g overflows with |w| of a
# few units). The restore copies S back into each parameter's own storage, so views, aliases and
# compiled graphs see w + eps during the second pass and w after it.
# ----------------------------------------------------------------------------------------------


def _acc(dtype: torch.dtype) -> torch.dtype:
    # Norms of fp16/bf16 tensors are accumulated in fp32 (fp16 squares overflow at 256); fp64 stays fp64.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _sq(t: Tensor) -> Tensor:
    """||t||_2^2; a BLAS dot where it can (about twice as fast as vector_norm on CPU, measured)."""
    if t.dtype in (torch.float32, torch.float64) and t.is_contiguous():
        flat = t.view(-1)
        return torch.dot(flat, flat)
    return torch.linalg.vector_norm(t, dtype=_acc(t.dtype)).square()


def _total(parts, weights=None) -> Tensor:
    dev = parts[0].device
    vals = [q.to(device=dev, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32) for q in parts]
    if weights is not None:
        vals = [v * w if w != 1.0 else v for v, w in zip(vals, weights)]
    return torch.stack(vals).sum()


def _by_key(indices, key):
    groups: dict = {}
    for i in indices:
        groups.setdefault(key(i), []).append(i)
    return list(groups.items())


def _sum_sq_foreach(tensors) -> list[Tensor]:
    """||t||^2 per tensor, computed per (device, dtype) group with _foreach_norm."""
    out: list[Tensor | None] = [None] * len(tensors)
    for (_, dtype), idx in _by_key(range(len(tensors)), lambda i: (tensors[i].device, tensors[i].dtype)):
        norms = torch._foreach_norm([tensors[i] for i in idx], 2, dtype=_acc(dtype))
        for i, n in zip(idx, norms):
            out[i] = n.square()
    return out


def filter_operator(w: Tensor, eta: float) -> Tensor:
    """Eq. 5 filter-wise: ||f_i||_2 + eta for every entry of filter i (an output channel), broadcastable to w."""
    # flatten(1), not reshape(n, -1): a shard may hold no filter at all (fully_shard of 3 filters on 4 ranks).
    n = torch.linalg.vector_norm(w.flatten(1), dim=1, dtype=_acc(w.dtype)) + eta
    return n.to(w.dtype).reshape((w.shape[0],) + (1,) * (w.dim() - 1))


@torch.no_grad()
def normalization_operator(tensors, kinds, eta) -> list[Tensor]:
    """The diagonal of T_w (Eq. 5 plus eta I) for each tensor, shaped like it: |w| + eta ("element"),
    ||filter||_2 + eta ("filter", norms accumulated in fp32/fp64), 1 ("none"). ``eta``: one or one per tensor."""
    tensors = list(tensors)
    etas = [float(e) for e in eta] if isinstance(eta, (list, tuple)) else [float(eta)] * len(tensors)
    out = []
    for t, kind, e in zip(tensors, kinds, etas):
        w = t.detach()
        if kind == "element":
            out.append(w.abs() + e)
        elif kind == "filter":
            out.append(filter_operator(w, e).expand_as(w).clone())
        elif kind == "none":
            out.append(torch.ones_like(w))
        else:
            raise ValueError(f"kind must be element, filter or none, got {kind!r}")
    return out


@dataclass
class _Plan:
    """The tensors of one ascent and, per tensor, its kind and hyper-parameters."""

    W: list[Tensor]
    G: list[Tensor]
    S: list[Tensor]
    kinds: list[str]
    eta: list[float]
    rho: list[float]
    c: list[float]
    # Per tensor: the process group over which its (shard's) sums of squares are totalled; None for a
    # whole tensor. Set by _plan() for DTensors sharded by fully_shard (see _local_shard).
    groups: list[Any] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.W)


def _c_of(kind: str, eta: float, g: Tensor, p: float) -> float:
    if kind == "element" and p == 2 and eta > 0 and g.dtype != torch.float16:
        return 1.0 / eta
    return 1.0


def _single_tensor_phase1(P: _Plan, p: float) -> list[Tensor]:
    parts = []
    for w, g, s, kind, eta, c in zip(P.W, P.G, P.S, P.kinds, P.eta, P.c):
        if kind == "element":
            torch.abs(w, out=s)
            if c != 1.0:
                g.addcmul_(g, s, value=c)
            else:
                s.add_(eta)
                if p == 2:
                    g.mul_(s)
        elif kind == "filter" and p == 2:
            g.mul_(filter_operator(w, eta))
        parts.append(_sq(g))
    return parts


def _multi_tensor_phase1(P: _Plan, p: float) -> list[Tensor]:
    el = [i for i in range(P.n) if P.kinds[i] == "element"]
    if el:
        Se = [P.S[i] for i in el]
        torch._foreach_copy_(Se, [P.W[i] for i in el])
        torch._foreach_abs_(Se)
    for c, idx in _by_key(el, lambda i: P.c[i]):
        if c != 1.0:
            torch._foreach_addcmul_([P.G[i] for i in idx], [P.G[i] for i in idx], [P.S[i] for i in idx], value=c)
    for eta, idx in _by_key([i for i in el if P.c[i] == 1.0], lambda i: P.eta[i]):
        torch._foreach_add_([P.S[i] for i in idx], eta)
        if p == 2:
            torch._foreach_mul_([P.G[i] for i in idx], [P.S[i] for i in idx])
    if p == 2:
        for i in range(P.n):
            if P.kinds[i] == "filter":
                P.G[i].mul_(filter_operator(P.W[i], P.eta[i]))
    return _sum_sq_foreach(P.G)


def _factors(P: _Plan, p: float, norm: float) -> list[float]:
    # eps_i = alpha_i * G_i after phase 2, where G_i = c_i^2 T_i^2 g_i (p = 2) or T_i sign(g_i).
    if p != 2:
        return list(P.rho)
    if norm == 0:
        return [0.0] * P.n  # an all-zero gradient: eps = 0, no NaN
    return [r / (norm * c * c) for r, c in zip(P.rho, P.c)]


def _prescaled(g: Tensor, p: float) -> bool:
    return p == 2 and g.dtype == torch.float16


def _single_tensor_phase2(P: _Plan, p: float, alphas: list[float], apply: bool = True):
    # Everything on one tensor while it is hot in cache, then the next one. apply=False leaves S and W
    # alone (the sharded ascent moves w after its reduction, in _apply).
    parts, used = [], []
    for w, g, s, kind, eta, c, alpha in zip(P.W, P.G, P.S, P.kinds, P.eta, P.c, alphas):
        if p != 2:
            g.sign_()
        elif _prescaled(g, p):
            g.mul_(alpha)
            alpha = 1.0
        if kind == "element":
            if c != 1.0:
                g.addcmul_(g, s, value=c)
            else:
                g.mul_(s)
        elif kind == "filter":
            g.mul_(filter_operator(w, eta))
        parts.append(_sq(g))
        used.append(alpha)
        if apply:
            s.copy_(w)
            w.add_(g, alpha=alpha)
    return parts, used


def _multi_tensor_phase2(P: _Plan, p: float, alphas: list[float], apply: bool = True):
    if p != 2:
        torch._foreach_sign_(P.G)
    alphas = list(alphas)
    pre = [i for i in range(P.n) if _prescaled(P.G[i], p)]
    for a, idx in _by_key(pre, lambda i: alphas[i]):
        torch._foreach_mul_([P.G[i] for i in idx], a)
    for i in pre:
        alphas[i] = 1.0
    el = [i for i in range(P.n) if P.kinds[i] == "element"]
    for c, idx in _by_key(el, lambda i: P.c[i]):
        G = [P.G[i] for i in idx]
        if c != 1.0:
            torch._foreach_addcmul_(G, G, [P.S[i] for i in idx], value=c)
        else:
            torch._foreach_mul_(G, [P.S[i] for i in idx])
    for i in range(P.n):
        if P.kinds[i] == "filter":
            P.G[i].mul_(filter_operator(P.W[i], P.eta[i]))
    parts = _sum_sq_foreach(P.G)
    if apply:
        _apply(P, alphas, foreach=True)
    return parts, alphas


def _apply(P: _Plan, alphas: list[float], *, foreach: bool) -> None:
    """S <- w, w <- w + alpha G, in place."""
    if foreach:
        torch._foreach_copy_(P.S, P.W)
        for a, idx in _by_key(range(P.n), lambda i: alphas[i]):
            torch._foreach_add_([P.W[i] for i in idx], [P.G[i] for i in idx], alpha=a)
    else:
        for w, g, s, a in zip(P.W, P.G, P.S, alphas):
            s.copy_(w)
            w.add_(g, alpha=a)


def _ascent(P: _Plan, *, p: float, foreach: bool):
    """S <- w, w <- w + eps in place, G <- eps / alpha (see the kernels' comment).

    Returns (||eps||_2 as a device tensor, the per-tensor alphas), or None when the gradient is not
    finite (W untouched; S and G then hold scratch).
    """
    if any(g is not None for g in P.groups):
        return _ascent_sharded(P, p=p, foreach=foreach)
    phase1, phase2 = (
        (_multi_tensor_phase1, _multi_tensor_phase2) if foreach else (_single_tensor_phase1, _single_tensor_phase2)
    )
    parts = phase1(P, p)
    sq = _total(parts, [1.0 / (c * c) for c in P.c])
    # The one host sync of the update: a non-finite gradient must be reported to the caller.
    norm = float(sq.sqrt())  # = ||T g||_2 (p = 2), ||g||_2 (p = inf)
    if not math.isfinite(norm):
        return None
    alphas = _factors(P, p, norm)
    parts, used = phase2(P, p, alphas)
    eps_sq = _total(parts, [a * a for a in used])
    return eps_sq.sqrt(), used


# ----------------------------------------------------------------------------------------------
# Sharded parameters (DTensors of torch.distributed.fsdp.fully_shard, FSDP2). Each rank holds a slice
# of every tensor and the slice of its (reduce-scattered, i.e. global) gradient. Element-wise T and the
# scalings are local, so the kernels above run unchanged on the local slices, in place. Two things are
# not local: the norm ||T g|| (a norm of a shard is not the norm of the tensor: every rank would get a
# different, wrong eps), and filter-wise T (the norm of a whole filter). The first is one all-reduce of
# the per-shard sums; the second holds because fully_shard splits dim 0, the output channels, so every
# filter lies whole on one rank. _local_shard checks it instead of assuming it.
# ----------------------------------------------------------------------------------------------

_DTENSOR: Any = False  # the DTensor class once looked up; None where torch has no distributed support


def _dtensor_class():
    global _DTENSOR
    if _DTENSOR is False:
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # a torch built without distributed: nothing can be a DTensor
            DTensor = None
        _DTENSOR = DTensor
    return _DTENSOR


def _is_dtensor(t) -> bool:
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def _local(t: Tensor) -> Tensor:
    """The rank's own slice of a DTensor (a view: writing it writes the DTensor), or ``t`` itself."""
    return t.to_local() if _is_dtensor(t) else t


def _local_shard(w: Tensor, g: Tensor, spec: ParamSpec):
    """(local w, local g, the process group of its shard dimension or None) for one parameter."""
    if not _is_dtensor(w):
        if _is_dtensor(g):
            raise RuntimeError(f"{spec.name}: the gradient is a DTensor but the parameter is not")
        return w, g, None
    pl = tuple(w.placements)
    if not _is_dtensor(g) or tuple(g.placements) != pl or g.device_mesh != w.device_mesh:
        got = f"a DTensor {tuple(g.placements)}" if _is_dtensor(g) else f"a plain {type(g).__name__}"
        raise RuntimeError(
            f"{spec.name}: the parameter is a DTensor placed {pl} but its gradient is {got}; the sharpness-aware "
            "step needs the gradient reduced and sharded like the parameter (as fully_shard's backward leaves it)"
        )
    if any(not (q.is_shard() or q.is_replicate()) for q in pl):
        raise RuntimeError(
            f"{spec.name}: placements {pl} hold a partial (unreduced) value; the perturbation needs the reduced "
            "gradient: call it after backward() with gradient synchronization on"
        )
    dims = [i for i, q in enumerate(pl) if q.is_shard()]
    if len(dims) > 1:
        raise NotImplementedError(
            f"{spec.name} is sharded over {len(dims)} mesh dimensions {pl} (e.g. FSDP with tensor parallelism); "
            "the sharpness-aware step supports one sharded mesh dimension: fully_shard on a 1-D mesh, or HSDP"
        )
    if spec.kind == "filter" and dims and pl[dims[0]].dim not in (0, -w.dim()):
        raise ValueError(
            f"{spec.name}: filter-wise normalization needs whole filters (slices along dim 0), but the tensor is "
            f"sharded as {pl}; shard it with Shard(0) (fully_shard's default) or use normalization='element'"
        )
    group = w.device_mesh.get_group(dims[0]) if dims else None  # replicated: the whole tensor is here
    return w.to_local(), g.to_local(), group


def _reduce_by_group(vecs: dict) -> Tensor:
    """Sum the per-group vectors of local sums: all-reduced over each shard group, whole tensors (key None)
    added once. One collective per shard group, in the order the groups were met (the same on every rank)."""
    import torch.distributed as dist

    out = []
    for group, v in vecs.items():
        if group is not None:
            dist.all_reduce(v, group=group)
        out.append(v)
    dtype = torch.float64 if any(v.dtype == torch.float64 for v in out) else out[0].dtype
    return torch.stack([v.to(device=out[0].device, dtype=dtype) for v in out]).sum(0)


def _ascent_sharded(P: _Plan, *, p: float, foreach: bool):
    """_ascent for a plan with shards, with ONE all-reduce (per shard group) and one host sync.

    For p = inf and for gradients that are not fp16, phase 2's transform of G (sign, T) does not depend on
    the norm; only the final w + alpha G does. So it runs before the reduction, and the vector reduced holds
    both ||T g||^2 and ||eps||^2 * ||T g||^2 (p = 2): the logged ||eps|| costs no second collective.
    """
    if p == 2 and any(g.dtype == torch.float16 for g in P.G):
        raise ValueError(
            "fp16 gradients on a sharded model: the perturbation of fp16 gradients is scaled before its second "
            "multiplication by T, which needs the global norm first. Keep the sharded parameters in fp32 and "
            "compute in fp16 with fully_shard(mp_policy=MixedPrecisionPolicy(param_dtype=torch.float16)), or use bf16"
        )
    phase1, phase2 = (
        (_multi_tensor_phase1, _multi_tensor_phase2) if foreach else (_single_tensor_phase1, _single_tensor_phase2)
    )
    parts1 = phase1(P, p)
    parts2, _ = phase2(P, p, [1.0] * P.n, apply=False)
    # eps_i = alpha_i G_i with alpha_i = rho_i / (norm c_i^2) (p = 2) or rho_i (p = inf): see _factors.
    w1 = [1.0 / (c * c) for c in P.c]
    w2 = [(r / (c * c)) ** 2 for r, c in zip(P.rho, P.c)] if p == 2 else [r * r for r in P.rho]
    vecs: dict = {}
    for group, idx in _by_key(range(P.n), lambda i: P.groups[i] if P.groups else None):
        vecs[group] = torch.stack([_total([parts1[i] for i in idx], [w1[i] for i in idx]),
                                   _total([parts2[i] for i in idx], [w2[i] for i in idx])])
    tot = _reduce_by_group(vecs)
    norm_sq = float(tot[0])  # the one host sync, as in _ascent
    norm = math.sqrt(norm_sq) if norm_sq >= 0 else math.nan
    if not math.isfinite(norm):
        return None
    alphas = _factors(P, p, norm)
    _apply(P, alphas, foreach=foreach)
    if p != 2:
        eps_norm = tot[1].sqrt()
    elif norm == 0:
        eps_norm = torch.zeros_like(tot[1])
    else:
        eps_norm = (tot[1] / tot[0]).sqrt()
    return eps_norm, alphas


def perturbation(params, grads, *, rho: float, eta: float = 0.01, p=2, kinds=None, foreach: bool = False):
    """eps of the paper (Section 4) as new tensors, for inspection and tests; nothing passed in is modified.

    ``kinds`` is one of "none"/"element"/"filter" per tensor (see ParamSpec); default all "element".
    """
    pf = check_p(p)
    check_rho(rho)
    check_eta(eta)
    W = [w.detach().clone() for w in params]
    G = [g.detach().clone() for g in grads]
    kinds = list(kinds) if kinds is not None else ["element"] * len(W)
    P = _Plan(W, G, [torch.empty_like(w) for w in W], kinds, [float(eta)] * len(W), [float(rho)] * len(W),
              [_c_of(k, float(eta), g, pf) for k, g in zip(kinds, G)])
    out = _ascent(P, p=pf, foreach=foreach)
    if out is None:
        raise ValueError("the gradient is not finite")
    return [g * a for g, a in zip(P.G, out[1])]


def _like(t: Tensor, local: Tensor) -> Tensor:
    """``local`` as a DTensor placed like ``t`` when ``t`` is one (the eps of a shard is that shard's eps)."""
    if not _is_dtensor(t):
        return local
    return type(t).from_local(local, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride())


# ----------------------------------------------------------------------------------------------
# The perturbation object.
# ----------------------------------------------------------------------------------------------


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
        self.param_groups: list[dict[str, Any]] = []
        self._specs: dict[int, ParamSpec] = {}
        self._buffers: dict[int, Tensor] = {}  # one per parameter: scratch for |w|, then the kept w
        self._perturbed: list[Tensor] = []
        self.last_eps_norm: Tensor | None = None
        self.last_grad_finite = True
        for opts, specs in _resolve_groups(params, **self._rule()):
            self._append(self._group_of(opts, specs, len(self.param_groups)), specs)

    def _rule(self) -> dict:
        return dict(adaptive=self.adaptive, normalization=self.normalization, normalize_bias=self.normalize_bias)

    def _append(self, group: dict, specs) -> None:
        known = {id(t) for g in self.param_groups for t in g["params"]}
        dup = [s.name for t, s in specs if id(t) in known]
        if dup:
            raise ValueError(f"some parameters appear in more than one group: {', '.join(dup[:3])}")
        for t, s in specs:
            self._specs[id(t)] = s
        self.param_groups.append(group)

    def _group_of(self, opts: dict, specs, index: int) -> dict:
        """A param group of tensors with rho/eta/p (the defaults where not given), checked."""
        group = {k: v for k, v in opts.items() if k != "is_bias"}
        for k in _HYPER:
            group.setdefault(k, self.defaults[k])
        self._check_group(group, index)
        group["params"] = [t for t, _ in specs]
        return group

    def _resolve_new_group(self, param_group: dict, index: int):
        """(the group for an optimizer, its (tensor, ParamSpec) pairs) from what add_param_group() was given."""
        if not isinstance(param_group, dict):
            raise TypeError(f"add_param_group() takes a dict with a 'params' key, got {type(param_group).__name__}")
        ((opts, specs),) = _resolve_groups([param_group], start=index, **self._rule())
        return self._group_of(opts, specs, index), specs

    def _check_group(self, group: dict, i: int) -> None:
        where = f"param_groups[{i}]"
        group["rho"] = check_rho(group["rho"], f"{where}['rho']")
        group["eta"] = check_eta(group["eta"], f"{where}['eta']")
        group["p"] = check_p(group["p"], f"{where}['p']")

    def add_param_group(self, group: dict) -> None:
        """Add a group (tensors or (name, tensor) pairs, optional rho/eta/p/is_bias); it is perturbed too."""
        self._append(*self._resolve_new_group(group, len(self.param_groups)))

    # -- what it computes ------------------------------------------------------------------------

    def spec(self, t: Tensor) -> ParamSpec:
        """How ``t`` is normalized; tensors added to a shared group without a name get the unnamed rule."""
        s = self._specs.get(id(t))
        if s is None:
            s = self._specs[id(t)] = _spec(t, None, f"a tensor of shape {list(t.shape)} added without a name",
                                           is_bias=None, **self._rule())
        return s

    def named_specs(self) -> list[tuple[Tensor, ParamSpec]]:
        return [(t, self.spec(t)) for g in self.param_groups for t in g["params"]]

    @torch.no_grad()
    def operator(self, tensors: Iterable[Tensor] | None = None) -> list[Tensor]:
        """The diagonal of T_w (Eq. 5 plus eta I) for each tensor (default: every parameter), shaped like it.

        Norms are accumulated in fp32 (fp64 for fp64 tensors); 1 where the kind is "none".
        """
        eta_of = {id(t): float(g.get("eta", self.defaults["eta"])) for g in self.param_groups for t in g["params"]}
        tensors = list(tensors) if tensors is not None else [t for g in self.param_groups for t in g["params"]]
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
        freed below it resident (measured on fairseq's CPU update: peak RSS +1.43x parameter bytes over adam
        with per-tensor buffers, see docs/performance.md). Parameters whose layout has no exact view
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
        params = [t for g in self.param_groups for t in g["params"] if t.grad is not None]
        P, p = self._plan()
        if not P.W:
            self.last_grad_finite, self.last_eps_norm = True, None
            return True
        out = _ascent(P, p=p, foreach=self._use_foreach(P.W))
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
    def ascend_along(self, directions: Iterable[Tensor | None]) -> bool:
        """w -> w + eps in place with eps computed from ``directions`` (one per parameter, in ``param_groups``
        order; None: that tensor is not perturbed) in place of the gradient; ``.grad`` is not touched.

        The one-pass policies of :mod:`fairseq_asam.schedule` perturb w this way before the update's only
        forward/backward. Returns False (weights untouched) when the directions are not finite.
        """
        if self._perturbed:
            raise RuntimeError("ascend_along() called while the weights are still perturbed (restore() first)")
        params = [t for g in self.param_groups for t in g["params"]]
        directions = list(directions)
        if len(directions) != len(params):
            raise ValueError(f"ascend_along() needs one direction per parameter ({len(params)}), got {len(directions)}")
        # A private copy: the kernels use the gradient slot as scratch.
        gmap = {id(t): d.detach().to(device=t.device, dtype=t.dtype).clone()
                for t, d in zip(params, directions) if d is not None}
        if not gmap:
            return False
        P, p = self._plan(gmap)
        P.W = [w.data for w in P.W]
        out = _ascent(P, p=p, foreach=self._use_foreach(P.W))
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
        params = [t for g in self.param_groups for t in g["params"]]
        grads = list(grads)
        if len(grads) != len(params):
            raise ValueError(f"compute_eps() needs one gradient per parameter ({len(params)}), got {len(grads)}")
        gmap = {id(t): g.detach().clone() for t, g in zip(params, grads) if g is not None}
        saved = self._buffers
        self._buffers = {}
        try:
            P, p = self._plan(gmap)
            P.W = [w.detach().clone() for w in P.W]  # phase 2 writes w + eps into W
            out = _ascent(P, p=p, foreach=self._use_foreach(P.W)) if P.W else (None, [])
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

    def load_state_dict(self, state: dict) -> None:
        if self._perturbed:
            raise RuntimeError("load_state_dict() while the weights are perturbed (between ascend() and restore())")
        if state.get("adaptive", self.adaptive) != self.adaptive:
            raise ValueError(
                f"this state was saved by {'ASAM' if state['adaptive'] else 'SAM'}, "
                f"not {'ASAM' if self.adaptive else 'SAM'}"
            )
        if (state.get("normalization", self.normalization), state.get("normalize_bias", self.normalize_bias)) != (
                self.normalization, self.normalize_bias):
            raise ValueError(
                f"the state's normalization/normalize_bias ({state.get('normalization')}/{state.get('normalize_bias')}) "
                f"differ from this object's ({self.normalization}/{self.normalize_bias}); construct it with the saved ones"
            )
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


# ----------------------------------------------------------------------------------------------
# The optimizer shells.
# ----------------------------------------------------------------------------------------------


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
        if schedule is not None and not isinstance(schedule, Schedule):
            raise TypeError(f"schedule= must be a fairseq_asam.schedule.Schedule (EveryK(5), ...), got {schedule!r}")
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
        base_groups = getattr(base_optimizer, "param_groups", None)
        if base_groups is None or not callable(getattr(base_optimizer, "step", None)):
            raise ValueError(
                f"base_optimizer= must be an optimizer: {type(base_optimizer).__name__} has no param_groups/step(); "
                "pass an instance, e.g. torch.optim.SGD(model.parameters(), lr=0.1), or a class with its arguments"
            )
        mine = {id(t) for g in pert.param_groups for t in g["params"]}
        theirs = {id(t) for g in base_groups for t in g["params"]}
        if mine != theirs:
            raise ValueError(
                f"the base optimizer must hold the same parameters as {type(self).__name__}: "
                f"{len(mine - theirs)} of the {len(mine)} parameters given are not in the base optimizer, "
                f"and {len(theirs - mine)} of its {len(theirs)} parameters were not given"
            )
        # rho/eta/p move into the base's groups (per group, where the user gave them per group).
        hyper = {id(t): {k: g[k] for k in _HYPER} for g in pert.param_groups for t in g["params"]}
        for g in base_groups:
            vals = {tuple(sorted(hyper[id(t)].items())) for t in g["params"]}
            if len(vals) > 1:
                raise ValueError("the parameters of one base optimizer group were given different rho/eta/p")
            g.update(dict(vals.pop()) if vals else pert.defaults)
        defaults = dict(getattr(base_optimizer, "defaults", {}), **pert.defaults)
        super().__init__([t for g in pert.param_groups for t in g["params"]], defaults)
        self.base_optimizer = base_optimizer
        self.perturbation = pert  # set after torch's __init__, whose add_param_group calls must not reach the base
        self.schedule = schedule if schedule is not None else Full()
        self._second_pass: bool | None = None  # this update's decision, between the ascent and the descent
        self._share()

    def _share(self) -> None:
        # Share, not copy: a scheduler or a user changing lr or rho on either object changes what is used.
        self.param_groups = self.base_optimizer.param_groups
        self.perturbation.param_groups = self.base_optimizer.param_groups
        if isinstance(getattr(self.base_optimizer, "state", None), dict):
            self.state = self.base_optimizer.state

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
    def last_eps_norm(self) -> Tensor | None:
        """||eps||_2 of the last ascent (a device tensor), None if it was skipped."""
        return self.perturbation.last_eps_norm

    @property
    def last_grad_finite(self) -> bool:
        return self.perturbation.last_grad_finite

    # -- the two half-steps --------------------------------------------------------------------

    def ascent_step(self, zero_grad: bool = True) -> bool:
        """w -> w + eps using the gradients in ``.grad``.

        The gradients at w are consumed either way (their memory holds the ascent's scratch), so they
        are None afterwards; ``zero_grad`` is accepted for code written for davda54/sam. Returns False
        (weights untouched) when the gradient is not finite, so the caller can skip the update.
        """
        self._second_pass = True
        return self.perturbation.ascend()

    first_step = ascent_step  # the name used by the davda54/sam wrapper

    def restore(self) -> None:
        """Put back the weights of the last ascent bit for bit, in place."""
        self.perturbation.restore()

    def _grads(self) -> list:
        return [t.grad for g in self.param_groups for t in g["params"]]

    def begin_step(self) -> bool:
        """Before the update's first forward. One-pass schedules move w to w + eps here (returns True,
        and the update's only forward/backward runs there); every other schedule does nothing."""
        self._second_pass = None
        if not self.schedule.one_pass:
            return False
        return self.schedule.before_forward(self.perturbation, self.base_optimizer)

    def scheduled_ascent(self) -> bool:
        """After the first backward: the schedule decides from g whether this update runs the second pass.

        True: w is at w + eps now (as after :meth:`ascent_step`); run forward/backward again, then
        :meth:`descent_step`. False: call :meth:`descent_step` now; the base optimizer steps with g (or
        the schedule's rule applied to it). With the default schedule it always does the ascent.
        """
        if self.schedule.one_pass:
            self._second_pass = False  # the gradient just taken (at w + eps) is the update's gradient
            return False
        if not self.schedule.wants_second_pass(self._grads()):
            self._second_pass = False
            return False
        self._second_pass = True
        return self.perturbation.ascend()  # False: non-finite g, weights untouched, grads dropped

    def descent_step(self, zero_grad: bool = True):
        """Restore w exactly, then run the base optimizer's step with the gradients taken at w + eps
        (or, on an update the schedule runs without the second pass, with g and the schedule's rule)."""
        self.perturbation.restore()
        # Without scheduled_ascent() (a loop calling ascent_step()/descent_step()) the update is a full one.
        self.schedule.before_descent(self._grads(), True if self._second_pass is None else self._second_pass)
        self._second_pass = None
        out = self.base_optimizer.step()
        # torch's LR schedulers warn unless the optimizer's step() ran; descent_step() is that step.
        _compat.mark_optimizer_stepped(self)
        if zero_grad:
            self.zero_grad()
        return out

    second_step = descent_step

    def step(self, closure: Callable[[], Tensor] | None = None):
        """Both passes. ``closure`` must zero the grads, run forward and backward, and return the loss."""
        if closure is None:
            raise RuntimeError(
                f"{type(self).__name__}.step() needs a closure that zeroes the grads, runs forward and "
                "backward and returns the loss, e.g. step(lambda: (opt.zero_grad(), loss_fn(model(x), y).backward())...); "
                "or call ascent_step() and descent_step() around your own second forward/backward."
            )
        self.begin_step()
        with torch.enable_grad():
            loss = closure()
        if self.scheduled_ascent():
            with torch.enable_grad():
                closure()
        elif self._second_pass:
            self.zero_grad()  # non-finite gradient: skip the update, weights untouched
            self._second_pass = None
            return loss
        self.descent_step()
        return loss

    # -- plumbing ------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        """Add a group to the base optimizer and to the perturbation (tensors or (name, tensor) pairs)."""
        if not hasattr(self, "perturbation"):  # torch.optim.Optimizer.__init__ adds the initial groups
            return super().add_param_group(param_group)
        group, specs = self.perturbation._resolve_new_group(param_group, len(self.param_groups))
        self.base_optimizer.add_param_group(group)
        for t, s in specs:
            self.perturbation._specs[id(t)] = s

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
        if hp.get("adaptive", self._adaptive_now()) != self._adaptive_now():
            raise ValueError(
                f"this state dict was saved by {'ASAM' if hp['adaptive'] else 'SAM'}, not {type(self).__name__}; "
                "load state_dict['base'] to move the base optimizer's state across"
            )
        if ("normalization" in hp and hp["normalization"] != self.normalization) or (
                "normalize_bias" in hp and hp["normalize_bias"] != self.normalize_bias):
            raise ValueError(
                "the state dict's normalization/normalize_bias "
                f"({hp.get('normalization')}/{hp.get('normalize_bias')}) differ from this optimizer's "
                f"({self.normalization}/{self.normalize_bias}); construct it with the saved ones"
            )
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
        # torch's load_state_dict replaces the base's param_groups list: share the new one.
        self._share()
        for i, g in enumerate(self.param_groups):
            for k in _HYPER:
                if k not in g:
                    g[k] = legacy.get(k, current[i].get(k, self.perturbation.defaults[k]) if i < len(current)
                                      else self.perturbation.defaults[k])
            self.perturbation._check_group(g, i)

    def _adaptive_now(self) -> bool:
        return self.perturbation.adaptive

    def __repr__(self) -> str:
        p = "inf" if self.p == math.inf else "2"
        name = type(self).__name__
        if not self.perturbation.adaptive:
            return f"{name}(rho={self.rho}, p={p}, base={type(self.base_optimizer).__name__})"
        extra = "" if name == "ASAM" else "adaptive=True, "
        sched = "" if isinstance(self.schedule, Full) else f", schedule={self.schedule!r}"
        return (f"{name}({extra}rho={self.rho}, p={p}, eta={self.eta}, normalization={self.normalization!r}, "
                f"normalize_bias={self.normalize_bias}, base={type(self.base_optimizer).__name__}{sched})")


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
