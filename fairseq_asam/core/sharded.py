"""Sharded parameters: the ascent on DTensors of ``torch.distributed.fsdp.fully_shard`` (FSDP2).

The kernels of :mod:`fairseq_asam.core.kernels` run on each rank's local slices; this module adds what is
not local: the norm ||T g|| totalled over the shards (one all-reduce per shard group) and the check that
filter-wise T sees whole filters. ``tests/test_fsdp.py`` runs it on two gloo processes::

    python -m pytest tests/test_fsdp.py -q
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .kernels import _apply, _by_key, _factors, _phases, _Plan, _total
from .params import ParamSpec

# Sharded parameters (DTensors of torch.distributed.fsdp.fully_shard, FSDP2). Each rank holds a slice
# of every tensor and the slice of its (reduce-scattered, i.e. global) gradient. Element-wise T and the
# scalings are local, so the kernels run unchanged on the local slices, in place. Two things are
# not local: the norm ||T g|| (a norm of a shard is not the norm of the tensor: every rank would get a
# different, wrong eps), and filter-wise T (the norm of a whole filter). The first is one all-reduce of
# the per-shard sums; the second holds because fully_shard splits dim 0, the output channels, so every
# filter lies whole on one rank. _local_shard checks it instead of assuming it.

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
    phase1, phase2 = _phases(foreach)
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



def _like(t: Tensor, local: Tensor) -> Tensor:
    """``local`` as a DTensor placed like ``t`` when ``t`` is one (the eps of a shard is that shard's eps)."""
    if not _is_dtensor(t):
        return local
    return type(t).from_local(local, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride())



# ---- the policy's state in sharded checkpoints (torch.distributed.checkpoint, DCP) -------------------
# A policy keeps per-parameter tensors (one-pass's previous gradient, ...) shaped like the parameters: under
# FSDP each rank holds DTensor shards of them, which only a sharded checkpoint can store and reshard. The rest
# of its state (counters, options) is the same on every rank and goes into a plain file. Keys are parameter
# names, so a checkpoint of N workers loads on M. asam-vision-train --fsdp and the Hugging Face Trainer under
# FSDP2 both write and read it through these three functions.


def split_schedule_state(opt) -> tuple[dict, dict[str, Tensor]]:
    """``opt.schedule``'s state as (the rest, for a plain file; each per-parameter list replaced by
    ``{"tensor_list": [names of its tensors]}``) and ({"<key>/<parameter name>": tensor}, for DCP); None
    entries are left out."""
    state = opt.schedule.state_dict()
    names = [s.name for _, s in opt.perturbation.named_specs()]
    meta, tensors = {}, {}
    for key, value in state.items():
        if isinstance(value, list) and len(value) == len(names) and any(torch.is_tensor(v) for v in value):
            meta[key] = {"tensor_list": [n for n, v in zip(names, value) if v is not None]}
            tensors.update({f"{key}/{n}": v for n, v in zip(names, value) if v is not None})
        else:
            meta[key] = value
    return meta, tensors


def schedule_templates(opt, meta: dict) -> dict[str, Tensor]:
    """Empty tensors (DTensor shards where the parameters are sharded) for DCP to load ``meta``'s lists into."""
    params = {s.name: t for t, s in opt.perturbation.named_specs()}
    return {f"{key}/{n}": torch.empty_like(params[n]) for key, v in meta.items()
            if isinstance(v, dict) and "tensor_list" in v for n in v["tensor_list"]}


def join_schedule_state(opt, meta: dict, tensors: dict[str, Tensor]) -> dict:
    """The state :func:`split_schedule_state` split, put back together (for ``opt.schedule.load_state_dict``)."""
    names = [s.name for _, s in opt.perturbation.named_specs()]
    state = {}
    for key, value in meta.items():
        if isinstance(value, dict) and "tensor_list" in value:
            state[key] = [tensors.get(f"{key}/{n}") for n in names]
        else:
            state[key] = value
    return state
