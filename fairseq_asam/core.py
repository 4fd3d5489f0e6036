"""The sharpness-aware step: ASAM (Kwon et al., ICML 2021, Section 4, Algorithm 1) and SAM (Foret et al.).

Torch only: fairseq and torchvision code call this module, they never re-derive the math.

One update with weights w, radius rho and normalization operator T_w (paper Eq. 5, plus eta I):

    g     = grad L(w)
    eps   = rho * T_w^2 g / ||T_w g||_2          (p = 2)
    eps   = rho * T_w sign(g)                    (p = inf)
    g'    = grad L(w + eps)
    w     <- w exactly (restored from a copy), then the base optimizer steps with g'

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
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ASAM", "SAM", "ParamSpec", "perturbation", "resolve_params"]

_NORMALIZATIONS = ("element", "filter")


def _check_p(p) -> float:
    try:
        pf = float(p)
    except (TypeError, ValueError):
        raise ValueError(f"Invalid p: {p!r}; p must be 2 or inf (float('inf') or the string 'inf')") from None
    if pf not in (2.0, math.inf):
        raise ValueError(f"Invalid p: {p!r}; p must be 2 or inf (float('inf') or the string 'inf')")
    return pf


def check_hyperparameters(rho, eta, p, normalization, *, adaptive: bool = True) -> float:
    """Validate the sharpness-aware hyper-parameters; returns p as a float (2.0 or inf)."""
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho) or rho <= 0:
        raise ValueError(f"Invalid rho: {rho!r}; rho (the radius of the perturbation) must be a finite number > 0")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
        raise ValueError(f"Invalid eta: {eta!r}; eta must be a finite number >= 0")
    pf = _check_p(p)
    if normalization not in _NORMALIZATIONS:
        raise ValueError(f"Invalid normalization: {normalization!r}; expected one of {_NORMALIZATIONS}")
    return pf


@dataclass(frozen=True)
class ParamSpec:
    """How one parameter is normalized.

    kind: "none" (T = 1: SAM, or a bias without bias normalization), "element" (T = |w| + eta)
    or "filter" (T = ||filter||_2 + eta for every entry of each output-channel filter).
    """

    name: str
    kind: str


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
    if isinstance(params, Tensor):
        raise TypeError("params must be an iterable of tensors, (name, tensor) pairs or param groups, got a Tensor")
    items = list(params)
    if not items:
        raise ValueError("ASAM/SAM got an empty parameter list")
    groups = items if isinstance(items[0], dict) else [{"params": items}]
    out: list[tuple[Tensor, ParamSpec]] = []
    seen: set[int] = set()
    for gi, group in enumerate(groups):
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError(f"param group {gi} must be a dict with a 'params' key, got {type(group).__name__}")
        plist = group["params"]
        plist = [plist] if isinstance(plist, Tensor) else list(plist)
        group_bias = group.get("is_bias")
        if group_bias is not None and not isinstance(group_bias, bool):
            raise ValueError(f"param group {gi}: 'is_bias' must be True or False, got {group_bias!r}")
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
            if group_bias is not None:
                is_bias = group_bias
            elif name is not None:
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
                kind = "filter"
            else:
                kind = "element"
            out.append((t, ParamSpec(label, kind)))
    return out


# ----------------------------------------------------------------------------------------------
# Kernels. The ascent works on the weights W, their grads G and the persistent buffers S (one per
# parameter), in two phases around the one host sync:
#
#   phase 1: S <- T (as scratch), G <- T g; returns ||T g||^2 (p = 2) or ||g||^2 (p = inf, only to
#            detect a non-finite gradient), on the device;
#   sync:    the norm, its finiteness, the scale rho / ||T g||;
#   phase 2: G <- T^2 g or T sign(g) (times alpha), S <- w + alpha G = w + eps; W is not written;
#            returns ||eps||^2 on the device.
#
# The optimizer then swaps storages: each parameter's .data becomes its buffer (w + eps) and the
# buffer keeps the untouched w, so the restore is a swap back: bit for bit, with no copy of w taken
# and no pass over memory. S serves as scratch for T first, so the ascent allocates nothing of
# parameter size. fp16 gradients are brought to the size of eps before the second multiplication by
# T, which could otherwise overflow (T^2 g with |w| of a few units); other dtypes fold the scale into
# the add.
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


def _total(parts) -> Tensor:
    dev = parts[0].device
    return torch.stack([q.to(device=dev, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
                        for q in parts]).sum()


def _sum_sq_foreach(tensors) -> Tensor:
    return _total([
        torch.stack(torch._foreach_norm(group, 2, dtype=_acc(group[0].dtype))).square().sum()
        for group in _by_device_dtype(tensors)
    ])


def _by_device_dtype(tensors):
    groups: dict = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return list(groups.values())


def _filter_t(w: Tensor, eta: float) -> Tensor:
    # Eq. 5 filter-wise: ||f_i||_2 + eta for every entry of filter i (an output channel).
    n = torch.linalg.vector_norm(w.reshape(w.shape[0], -1), dim=1, dtype=_acc(w.dtype)) + eta
    return n.to(w.dtype).reshape((w.shape[0],) + (1,) * (w.dim() - 1))


def _prescaled(g: Tensor, p: float) -> bool:
    return p == 2 and g.dtype == torch.float16


def _single_tensor_phase1(W, G, S, kinds, eta: float, p: float, c: float) -> Tensor:
    # c = 1/eta folds the "+ eta" of T into a fused multiply-add: g + g |w| / eta = (T g) / eta, which
    # saves a whole pass over memory (S keeps |w|). Every tensor then carries the same factor c, and
    # the scale in _ascent divides it out. c = 1: S <- T = |w| + eta, g <- T g.
    parts = []
    for w, g, s, kind in zip(W, G, S, kinds):
        if kind == "element":
            torch.abs(w, out=s)
            if c != 1.0:
                g.addcmul_(g, s, value=c)
            else:
                s.add_(eta)
                if p == 2:
                    g.mul_(s)
        elif kind == "filter" and p == 2:
            g.mul_(_filter_t(w, eta) * c)
        elif c != 1.0:
            g.mul_(c)
        parts.append(_sq(g))
    return _total(parts)


def _single_tensor_phase2(W, G, S, kinds, eta: float, p: float, scale: float, c: float):
    # Everything on one tensor while it is hot in cache, then the next one.
    parts, alphas = [], []
    for w, g, s, kind in zip(W, G, S, kinds):
        alpha = scale
        if p != 2:
            g.sign_()
        elif _prescaled(g, p):
            g.mul_(scale)
            alpha = 1.0
        if kind == "element":
            if c != 1.0:
                g.addcmul_(g, s, value=c)
            else:
                g.mul_(s)
        elif kind == "filter":
            g.mul_(_filter_t(w, eta) * c)
        elif c != 1.0:
            g.mul_(c)
        parts.append(_sq(g) * (alpha * alpha))
        alphas.append(alpha)
        torch.add(w, g, alpha=alpha, out=s)
    return _total(parts), alphas


def _multi_tensor_phase1(W, G, S, kinds, eta: float, p: float, c: float) -> Tensor:
    el = [i for i, k in enumerate(kinds) if k == "element"]
    if el:
        Se = [S[i] for i in el]
        torch._foreach_copy_(Se, [W[i] for i in el])
        torch._foreach_abs_(Se)
        torch._foreach_add_(Se, eta)
        if p == 2:
            torch._foreach_mul_([G[i] for i in el], Se)
    if p == 2:
        for i, k in enumerate(kinds):
            if k == "filter":
                G[i].mul_(_filter_t(W[i], eta))
    return _sum_sq_foreach(G)


def _multi_tensor_phase2(W, G, S, kinds, eta: float, p: float, scale: float, c: float):
    if p != 2:
        torch._foreach_sign_(G)
    pre = [i for i, g in enumerate(G) if _prescaled(g, p)]
    if pre:
        torch._foreach_mul_([G[i] for i in pre], scale)
    el = [i for i, k in enumerate(kinds) if k == "element"]
    if el:
        torch._foreach_mul_([G[i] for i in el], [S[i] for i in el])
    for i, k in enumerate(kinds):
        if k == "filter":
            G[i].mul_(_filter_t(W[i], eta))
    pre_set = set(pre)
    alphas = [1.0 if i in pre_set else scale for i in range(len(G))]
    by_alpha: dict[float, list[int]] = {}
    for i, a in enumerate(alphas):
        by_alpha.setdefault(a, []).append(i)
    parts = []
    for alpha, idx in by_alpha.items():
        parts.append(_sum_sq_foreach([G[i] for i in idx]) * (alpha * alpha))
        torch._foreach_copy_([S[i] for i in idx], [W[i] for i in idx])
        torch._foreach_add_([S[i] for i in idx], [G[i] for i in idx], alpha=alpha)
    return _total(parts), alphas


def _ascent(W, G, S, kinds, *, eta: float, p: float, rho: float, foreach: bool):
    """S <- w + eps, G <- eps / alpha, W untouched (see the kernels' comment).

    Returns (||eps||_2 as a device tensor, the per-tensor alphas), or None when the gradient is not
    finite (S and G then hold scratch).
    """
    phase1, phase2 = (
        (_multi_tensor_phase1, _multi_tensor_phase2) if foreach else (_single_tensor_phase1, _single_tensor_phase2)
    )
    # The loop kernel's factor c (see _single_tensor_phase1): not for fp16, where g / eta^2 could
    # overflow, nor for eta = 0.
    c = 1.0
    if not foreach and p == 2 and eta > 0 and not any(g.dtype == torch.float16 for g in G):
        c = 1.0 / eta
    sq = phase1(W, G, S, kinds, eta, p, c)
    # The one host sync of the update: a non-finite gradient must be reported to the caller.
    norm = float(sq.sqrt())  # = c ||T g||_2 (p = 2)
    if not math.isfinite(norm):
        return None
    if p == 2:
        # G becomes c^2 T^2 g: eps = rho T^2 g / ||T g|| = rho / (c norm) * G.
        scale = rho / (c * norm) if norm > 0 else 0.0  # an all-zero gradient: eps = 0, no NaN
    else:
        scale = rho
    eps_sq, alphas = phase2(W, G, S, kinds, eta, p, scale, c)
    return eps_sq.sqrt(), alphas


def perturbation(params, grads, *, rho: float, eta: float = 0.01, p=2, kinds=None, foreach: bool = False):
    """eps of the paper (Section 4) as new tensors, for inspection and tests; the optimizer works in place.

    ``kinds`` is one of "none"/"element"/"filter" per tensor (see ParamSpec); default all "element".
    """
    pf = _check_p(p)
    W = [w.detach().clone() for w in params]
    G = [g.detach().clone() for g in grads]
    S = [torch.empty_like(w) for w in W]
    kinds = list(kinds) if kinds is not None else ["element"] * len(W)
    out = _ascent(W, G, S, kinds, eta=eta, p=pf, rho=rho, foreach=foreach)
    if out is None:
        raise ValueError("the gradient is not finite")
    return [g * a for g, a in zip(G, out[1])]


class ASAM(torch.optim.Optimizer):
    """Adaptive Sharpness-Aware Minimization around any base optimizer.

    Args:
        params: ``model.named_parameters()`` (recommended: names decide which tensors are biases),
            plain tensors or param groups; see :func:`resolve_params` for the rule on unnamed 1-D tensors.
        base_optimizer: a ``torch.optim`` optimizer (or a fairseq optimizer) over the same parameters.
        rho: radius of the perturbation region (paper: 0.5 CIFAR-10, 1.0 CIFAR-100/ImageNet, 0.2 IWSLT'14).
        eta: the eta of T_w + eta I (paper: 0.01), for stability where weights are near zero.
        p: 2 or ``float("inf")``.
        normalization: ``"element"`` or ``"filter"`` (paper Eq. 5).
        normalize_bias: also normalize biases (T = |b| + eta); the paper's default is off (T = 1).
        foreach: ``None`` picks the way torch.optim does (foreach on CUDA, the per-tensor loop on
            CPU, where it measured faster); ``True``/``False`` force a kernel. Both give the same numbers.

    The wrapper shares ``param_groups`` with the base optimizer, so an LR scheduler built on either works.
    """

    _adaptive = True

    def __init__(
        self,
        params,
        base_optimizer,
        rho: float = 0.5,
        eta: float = 0.01,
        p=2,
        normalization: str = "element",
        normalize_bias: bool = False,
        *,
        foreach: bool | None = None,
    ):
        pf = check_hyperparameters(rho, eta, p, normalization)
        if foreach not in (None, True, False):
            raise ValueError(f"Invalid foreach: {foreach!r}; expected None, True or False")
        if not isinstance(normalize_bias, bool):
            raise ValueError(f"Invalid normalize_bias: {normalize_bias!r}; expected True or False")
        base_groups = getattr(base_optimizer, "param_groups", None)
        if base_groups is None or not callable(getattr(base_optimizer, "step", None)):
            raise ValueError(
                f"Invalid base_optimizer: {type(base_optimizer).__name__} has no param_groups/step(); "
                "pass an optimizer instance, e.g. torch.optim.SGD(model.parameters(), lr=0.1)"
            )
        specs = resolve_params(params, adaptive=self._adaptive, normalization=normalization, normalize_bias=normalize_bias)
        mine = {id(t) for t, _ in specs}
        theirs = {id(t) for g in base_groups for t in g["params"]}
        if mine != theirs:
            raise ValueError(
                f"the base optimizer must hold the same parameters as {type(self).__name__}: "
                f"{len(mine - theirs)} of the {len(mine)} parameters given are not in the base optimizer, "
                f"and {len(theirs - mine)} of its {len(theirs)} parameters were not given"
            )
        self.base_optimizer = base_optimizer
        self.rho = float(rho)
        self.eta = float(eta)
        self.p = pf
        self.normalization = normalization
        self.normalize_bias = normalize_bias
        self.foreach = foreach
        self._params = [t for t, _ in specs]
        self._specs = [s for _, s in specs]
        self._copies: dict[int, Tensor] = {}  # the one persistent extra buffer: a copy of w
        self._perturbed: list[Tensor] = []
        self.last_eps_norm: Tensor | None = None
        self.last_grad_finite = True
        defaults = dict(rho=self.rho, eta=self.eta, p=self.p)
        super().__init__(self._params, defaults)
        # Share, not copy: an LR scheduler on either object changes the lr the base optimizer uses.
        self.param_groups = base_optimizer.param_groups
        self.defaults = getattr(base_optimizer, "defaults", defaults)

    # -- the two half-steps --------------------------------------------------------------------

    def _use_foreach(self, tensors) -> bool:
        if self.foreach is not None:
            return self.foreach
        return bool(tensors) and all(t.is_cuda for t in tensors)

    @torch.no_grad()
    def ascent_step(self, zero_grad: bool = True) -> bool:
        """w -> w + eps using the gradients in ``.grad``; grads are zeroed afterwards.

        Returns False (weights untouched) when the gradient is not finite, so the caller can skip
        the update; ``descent_step()`` after a skipped ascent only runs the base optimizer if asked.
        """
        if self._perturbed:
            raise RuntimeError("ascent_step() called twice without descent_step(): the weights are still perturbed")
        W, G, S, kinds = [], [], [], []
        for t, spec in zip(self._params, self._specs):
            if t.grad is None:
                continue  # parameters with no grad are left alone
            if t.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients ({spec.name})")
            buf = self._copies.get(id(t))
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype or buf.device != t.device:
                buf = self._copies[id(t)] = torch.empty_like(t, memory_format=torch.preserve_format)
            W.append(t)
            G.append(t.grad)
            S.append(buf)
            kinds.append(spec.kind)
        if not W:
            self.last_grad_finite = True
            self.last_eps_norm = None
            return True
        out = _ascent(W, G, S, kinds, eta=self.eta, p=self.p, rho=self.rho, foreach=self._use_foreach(W))
        if zero_grad:
            self._zero(W)
        if out is None:
            self.last_grad_finite = False
            self.last_eps_norm = None
            return False
        self.last_grad_finite = True
        self.last_eps_norm = out[0]  # ||eps||_2 for logging, left on the device
        for t, buf in zip(W, S):
            # The forward now sees w + eps; w stays, untouched, in what was the buffer.
            t.data, self._copies[id(t)] = buf, t.data
        self._perturbed = W
        return True

    first_step = ascent_step  # the name used by the davda54/sam wrapper

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the weights of the last ascent bit for bit (the kept w, not w + eps - eps).

        The parameters get their storage with w back and the buffer keeps w + eps for reuse: no copy.
        Code that holds on to a parameter's old ``.data`` tensor across the ascent sees w throughout.
        """
        for t in self._perturbed:
            t.data, self._copies[id(t)] = self._copies[id(t)], t.data
        self._perturbed = []

    def descent_step(self, zero_grad: bool = True):
        """Restore w exactly, then run the base optimizer's step with the gradients taken at w + eps."""
        self.restore()
        out = self.base_optimizer.step()
        # torch's LR schedulers warn unless the optimizer's step() ran; descent_step() is that step.
        self._opt_called = True
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
        with torch.enable_grad():
            loss = closure()
        if not self.ascent_step():
            self.zero_grad()  # non-finite gradient: skip the update, weights untouched
            return loss
        with torch.enable_grad():
            closure()
        self.descent_step()
        return loss

    # -- plumbing ------------------------------------------------------------------------------

    @staticmethod
    def _zero(W):
        # The grads hold eps now; dropping them (as zero_grad(set_to_none=True) does) costs no pass
        # over memory, and the second backward writes fresh ones.
        for w in W:
            w.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        if set_to_none:
            self.base_optimizer.zero_grad()  # fairseq's optimizers take no set_to_none argument
        else:
            self.base_optimizer.zero_grad(set_to_none=False)

    def state_dict(self):
        return {
            "base": self.base_optimizer.state_dict(),
            "asam": dict(
                rho=self.rho,
                eta=self.eta,
                p=self.p,
                normalization=self.normalization,
                normalize_bias=self.normalize_bias,
                adaptive=self._adaptive,
            ),
        }

    def load_state_dict(self, state_dict) -> None:
        """Restores the base optimizer's state and these hyper-parameters (as torch.optim restores lr).

        A plain state dict of the base optimizer (no ``"base"`` key) is accepted too, to switch a run
        from its base optimizer to SAM/ASAM.
        """
        if self._perturbed:
            raise RuntimeError("load_state_dict() between ascent_step() and descent_step()")
        if "base" in state_dict:
            hp, base_state = state_dict.get("asam", {}), state_dict["base"]
        else:
            hp, base_state = {}, state_dict
        if hp.get("adaptive", self._adaptive) != self._adaptive:
            raise ValueError(
                f"this state dict was saved by {'ASAM' if hp['adaptive'] else 'SAM'}, not {type(self).__name__}; "
                "load state_dict['base'] to move the base optimizer's state across"
            )
        if hp:
            p = check_hyperparameters(hp["rho"], hp["eta"], hp["p"], hp["normalization"])
            if hp["normalization"] != self.normalization or hp["normalize_bias"] != self.normalize_bias:
                raise ValueError(
                    "the state dict's normalization/normalize_bias "
                    f"({hp['normalization']}/{hp['normalize_bias']}) differ from this optimizer's "
                    f"({self.normalization}/{self.normalize_bias}); construct it with the saved ones"
                )
            self.p, self.rho, self.eta = p, float(hp["rho"]), float(hp["eta"])
        # A copy: torch's optimizers keep the loaded tensors themselves, so loading the live state of
        # another optimizer would make the two share (and double-update) their moments.
        self.base_optimizer.load_state_dict(copy.deepcopy(base_state))
        # torch's load_state_dict replaces the base's param_groups list: share the new one.
        self.param_groups = self.base_optimizer.param_groups

    def __repr__(self) -> str:
        p = "inf" if self.p == math.inf else "2"
        extra = f", eta={self.eta}, normalization={self.normalization!r}, normalize_bias={self.normalize_bias}" if self._adaptive else ""
        return f"{type(self).__name__}(rho={self.rho}, p={p}{extra}, base={type(self.base_optimizer).__name__})"


class SAM(ASAM):
    """Sharpness-Aware Minimization (Foret et al., 2021): ASAM with T_w = I."""

    _adaptive = False

    def __init__(self, params, base_optimizer, rho: float = 0.05, p=2, *, foreach: bool | None = None):
        super().__init__(params, base_optimizer, rho=rho, eta=0.0, p=p, foreach=foreach)

    def __repr__(self) -> str:
        return f"SAM(rho={self.rho}, p={'inf' if self.p == math.inf else '2'}, base={type(self.base_optimizer).__name__})"

