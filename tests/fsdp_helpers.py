"""The FSDP2 side of tests/test_fsdp.py: a tiny model, a few SGD/SAM/ASAM updates through the vision
step, and the runs the test launches on gloo ranks (CPU; tests/workers.py starts them with torchrun's
environment), as these commands do by hand:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp_helpers.py train OUT
    python -m torch.distributed.run --standalone --nproc_per_node 1 tests/fsdp_helpers.py load OUT

``train`` writes, per configuration, the full weights after STEPS updates and the logged ||eps|| per
update (rank 0), the per-shard perturbation of one ascent with the collectives it issued (every rank),
and a sharded checkpoint (DCP) with the full model and optimizer state it holds. ``load`` reloads that
checkpoint with a different number of workers and writes the full state it got.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from fairseq_asam import ASAM, SAM
from fairseq_asam.vision import fsdp as vfsdp
from fairseq_asam.vision.step import train_step

STEPS = 4
BATCH = 8  # global batch; each of W workers takes BATCH / W examples
CONFIGS = {
    "sgd": dict(minimizer="sgd"),
    "sam": dict(minimizer="sam", rho=0.05),
    "asam-element": dict(minimizer="asam", rho=0.5, normalization="element"),
    "asam-filter": dict(minimizer="asam", rho=0.5, normalization="filter"),
    # The torch._foreach_* kernel (CUDA's default) on the shards, against the per-tensor loop unsharded.
    "asam-filter-foreach": dict(minimizer="asam", rho=0.5, normalization="filter", foreach=True),
}


class Tiny(nn.Module):
    """No BatchNorm: batch statistics are per worker, so with it 2 workers could not equal 1.

    Out-channel counts that 2 ranks split unevenly (5 -> 3 + 2, 3 -> 2 + 1) and one tensor with a single
    filter (rank 1's shard of gate.weight/gate.bias is empty)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, padding=1)
        self.conv2 = nn.Conv2d(5, 3, 3, padding=1)
        self.gate = nn.Conv2d(3, 1, 1)
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        h = h * torch.sigmoid(self.gate(h))
        return self.fc(h.mean((2, 3)))


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 3, 6, 6, generator=g), torch.randint(4, (BATCH,), generator=g)) for _ in range(STEPS)]


def build(cfg: dict, *, sharded: bool, mesh=None):
    torch.manual_seed(0)
    model = Tiny()
    if sharded:
        vfsdp.shard(model, blocks=[model.conv1, model.conv2], mesh=mesh)
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    if cfg["minimizer"] == "asam":
        opt = ASAM(model.named_parameters(), base, rho=cfg["rho"], normalization=cfg["normalization"],
                   foreach=cfg.get("foreach") if sharded else None)
    elif cfg["minimizer"] == "sam":
        opt = SAM(model.named_parameters(), base, rho=cfg["rho"])
    else:
        opt = base
    return model, opt, base


def full_state(model) -> dict:
    """Name -> full tensor (unsharded: all-gathered on every rank)."""
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


def run(cfg: dict, *, sharded: bool, rank: int = 0, world: int = 1, mesh=None):
    """STEPS updates; returns (model, opt, base, [||eps|| per update])."""
    model, opt, base = build(cfg, sharded=sharded, mesh=mesh)
    crit = nn.CrossEntropyLoss()
    eps = []
    per = BATCH // world
    for x, y in batches():
        r = train_step(model, opt, crit, x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per])
        eps.append(float(r.eps_norm) if r.eps_norm is not None else 0.0)
    return model, opt, base, eps


def first_grads(model, rank: int = 0, world: int = 1):
    x, y = batches()[0]
    per = BATCH // world
    nn.CrossEntropyLoss()(model(x[rank * per:(rank + 1) * per]), y[rank * per:(rank + 1) * per]).backward()


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def ascent_eps(model, opt) -> dict:
    """One ascent from the gradients in .grad, as each rank sees it (local slices): eps = (w + eps) - w,
    compute_eps() on the same gradients, applied_eps_norm(), and whether restore() was bit for bit."""
    names = [n for n, _ in model.named_parameters()]
    computed = opt.perturbation.compute_eps([p.grad for p in model.parameters()])
    before = {n: _local(p.detach()).clone() for n, p in model.named_parameters()}
    opt.ascent_step()
    after = {n: _local(p.detach()).clone() for n, p in model.named_parameters()}
    applied = float(opt.perturbation.applied_eps_norm())
    opt.restore()
    restored = all(torch.equal(_local(p.detach()), before[n]) for n, p in model.named_parameters())
    return {"eps": {n: after[n] - before[n] for n in before}, "restored": restored, "applied": applied,
            "computed": {n: _local(e).clone() for n, e in zip(names, computed)},
            "computed_is_dtensor": all(hasattr(e, "to_local") for e in computed)}


def _train(out: str) -> None:
    from torch.distributed.tensor.debug import CommDebugMode

    rank, world = dist.get_rank(), dist.get_world_size()
    result = {}
    for name, cfg in CONFIGS.items():
        model, opt, base, eps = run(cfg, sharded=True, rank=rank, world=world)
        result[name] = {"weights": full_state(model), "eps": eps}
    # One ascent, its collectives counted, on each configuration's fresh model.
    shards = {}
    for name in ("sam", "asam-element", "asam-filter", "asam-filter-foreach"):
        model, opt, _ = build(CONFIGS[name], sharded=True)
        first_grads(model, rank, world)
        with CommDebugMode() as comm:
            opt.ascent_step()
        opt.restore()
        opt.zero_grad()
        first_grads(model, rank, world)
        one = ascent_eps(model, opt)
        # The mistake of the popular implementations: the norm of this rank's slice only. Built from the
        # same local slices with an unsharded Perturbation, to show the test below tells the two apart.
        model2, _, _ = build(CONFIGS[name], sharded=True)
        first_grads(model2, rank, world)
        local = [(n, nn.Parameter(p.detach().to_local().clone())) for n, p in model2.named_parameters()]
        for (_, q), (_, p) in zip(local, model2.named_parameters()):
            q.grad = p.grad.to_local().clone()
        cls = ASAM if CONFIGS[name]["minimizer"] == "asam" else SAM
        kw = {"normalization": CONFIGS[name]["normalization"]} if cls is ASAM else {}
        naive = cls(local, torch.optim.SGD([q for _, q in local], lr=0.0), rho=CONFIGS[name]["rho"], **kw)
        before = {n: q.detach().clone() for n, q in local}
        naive.ascent_step()
        naive_eps = {n: q.detach() - before[n] for n, q in local}
        shards[name] = {**one, "naive": naive_eps,
                        "collectives": {str(k): v for k, v in comm.get_comm_counts().items()}}
    torch.save(shards, os.path.join(out, f"shards-rank{rank}.pt"))
    # A sharded checkpoint of a trained ASAM run, and the full state it must hold.
    model, opt, base, _ = run(CONFIGS["asam-filter"], sharded=True, rank=rank, world=world)
    ck = os.path.join(out, "ck")
    vfsdp.save_checkpoint(ck, model, opt, base, {"epoch": STEPS})
    ref = {"weights": full_state(model), "momentum": _full_momentum(model, base),
           "groups": [{k: g[k] for k in ("lr", "rho", "eta", "p")} for g in base.param_groups]}
    if rank == 0:
        result["world"] = world
        torch.save(result, os.path.join(out, f"train-{world}.pt"))
        torch.save(ref, os.path.join(out, "ck-full.pt"))
    dist.barrier()


def _full_momentum(model, base) -> dict:
    out = {}
    for n, p in model.named_parameters():
        buf = base.state[p]["momentum_buffer"]
        out[n] = (buf.full_tensor() if hasattr(buf, "full_tensor") else buf).detach().clone()
    return out


def _load(out: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    model, opt, base = build(CONFIGS["asam-filter"], sharded=True)
    opt.perturbation.param_groups[0]["rho"] = 9.0  # must come back as saved (0.5)
    meta = vfsdp.load_checkpoint(os.path.join(out, "ck"), model, opt, base)
    got = {"weights": full_state(model), "momentum": _full_momentum(model, base),
           "groups": [{k: g[k] for k in ("lr", "rho", "eta", "p")} for g in opt.param_groups],
           "shares_groups": opt.param_groups is base.param_groups is opt.perturbation.param_groups,
           "epoch": meta["epoch"]}
    # And it trains on: one more update runs on the resharded state.
    x, y = batches()[0]
    per = BATCH // world
    r = train_step(model, opt, nn.CrossEntropyLoss(), x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per])
    got["step_ok"] = not r.skipped and r.eps_norm is not None
    if rank == 0:
        torch.save(got, os.path.join(out, f"loaded-{world}.pt"))
    dist.barrier()


def _hsdp(out: str) -> None:
    """4 workers as 2 replicas x 2 shards (HSDP): the norm is totalled over the shard group only."""
    from torch.distributed.device_mesh import init_device_mesh

    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    result = {}
    for name in ("sam", "asam-filter"):
        model, _, _, eps = run(CONFIGS[name], sharded=True, rank=rank, world=world, mesh=mesh)
        result[name] = {"weights": full_state(model), "eps": eps,
                        "placements": str(next(model.parameters()).placements)}
    if rank == 0:
        torch.save(result, os.path.join(out, f"hsdp-{world}.pt"))
    dist.barrier()


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    try:
        {"train": _train, "load": _load, "hsdp": _hsdp}[mode](out)
    finally:
        dist.destroy_process_group()
