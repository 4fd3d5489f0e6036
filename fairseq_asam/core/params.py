"""Which tensor is normalized how: the parameter specs of ASAM's T_w (paper Eq. 5 and the bias rule).

``model.named_parameters()``, plain tensors or param groups become (tensor, :class:`ParamSpec`) pairs;
a name ending in ``bias`` is a bias (T = 1 unless biases are normalized), and an unnamed 1-D tensor is
refused where the answer would change the perturbation::

    python -c "import torch; from fairseq_asam.core import resolve_params; \
print(resolve_params(torch.nn.Conv2d(3, 4, 3).named_parameters(), adaptive=True, normalization='filter', normalize_bias=False))"
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["ParamSpec", "resolve_params"]


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

