"""The ascent w -> w + eps of ASAM/SAM (paper Section 4): a per-tensor loop and a foreach kernel.

Both kernels do the same arithmetic, op for op, and are tested against each other and against the
definition of T_w in :mod:`fairseq_asam.core.operator` (``tests/test_core.py``). :func:`perturbation`
returns eps as new tensors, for inspection::

    python -c "import torch; from fairseq_asam.core import perturbation; \
print(perturbation([torch.tensor([1.0, -2.0])], [torch.tensor([0.5, 0.5])], rho=0.5))"
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..checks import check_eta, check_p, check_rho
from .operator import accumulation_dtype as _acc
from .operator import filter_operator

__all__ = ["perturbation"]


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


def _phases(foreach: bool):
    return (_multi_tensor_phase1, _multi_tensor_phase2) if foreach else (_single_tensor_phase1, _single_tensor_phase2)


def _ascent(P: _Plan, *, p: float, foreach: bool):
    """S <- w, w <- w + eps in place, G <- eps / alpha (see the kernels' comment).

    Returns (||eps||_2 as a device tensor, the per-tensor alphas), or None when the gradient is not
    finite (W untouched; S and G then hold scratch).
    """
    phase1, phase2 = _phases(foreach)
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

