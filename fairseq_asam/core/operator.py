"""The normalization operator T_w of ASAM (Kwon et al., ICML 2021, Eq. 5, plus eta I): its one definition.

T_w = diag(|w| + eta) element-wise; filter-wise, ||f||_2 + eta for every entry of each convolution filter
(an output channel); 1 where a tensor is not normalized (SAM, or a bias). The kernels
(:mod:`fairseq_asam.core.kernels`) fold T into their arithmetic for speed and are tested against this
definition (``tests/test_core.py``)::

    python -c "import torch; from fairseq_asam.core.operator import normalization_operator; \
print(normalization_operator([torch.tensor([-2.0, 0.0, 3.0])], ['element'], 0.01))"
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["accumulation_dtype", "filter_operator", "normalization_operator"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype norms are accumulated in: fp32 for fp16/bf16 (fp16 squares overflow at 256), fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def filter_operator(w: Tensor, eta: float) -> Tensor:
    """Eq. 5 filter-wise: ||f_i||_2 + eta for every entry of filter i (an output channel), broadcastable to w."""
    # flatten(1), not reshape(n, -1): a shard may hold no filter at all (fully_shard of 3 filters on 4 ranks).
    n = torch.linalg.vector_norm(w.flatten(1), dim=1, dtype=accumulation_dtype(w.dtype)) + eta
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

