"""Sharded training for asam-vision-train: FSDP2 (``torch.distributed.fsdp.fully_shard``) and sharded
checkpoints (``torch.distributed.checkpoint``, DCP).

With ``--fsdp`` every block and then the whole model are wrapped with ``fully_shard``: each rank holds a
slice (dim 0) of every parameter, of its gradient and of the momentum. The SAM/ASAM step itself is the
core's (:class:`fairseq_asam.core.Perturbation` works on the local slices and totals the norm with one
all-reduce, paper Section 4). The first-pass gradient is reduce-scattered, i.e. averaged over all workers,
so eps comes from the gradient of the whole global batch (no m-sharpness): 2 workers give the weights of 1
worker with the same global batch (without BatchNorm, whose batch statistics are per worker).

Checkpoints are DCP directories (``<run-dir>/checkpoint_last.dcp/``: every rank writes its own shards,
``meta.pt`` holds the epoch, history, scheduler and the ASAM shell's state); they load with any number of
workers, and without a process group for evaluation (:func:`load_full_model_state`).

    torchrun --nproc_per_node 4 -m fairseq_asam.vision --fsdp --dataset cifar100 --model wrn28_10 \\
        --minimizer asam --run-dir runs/wrn-asam-fsdp
"""

from __future__ import annotations

import math
import os
import shutil

import torch
import torch.distributed as dist
from torch import nn

from ..core.sharded import join_schedule_state, schedule_templates, split_schedule_state

__all__ = ["CHECKPOINT", "EvenBatches", "block_modules", "init_process_group", "is_fsdp",
           "load_checkpoint", "load_full_model_state", "save_checkpoint", "shard"]

CHECKPOINT = "checkpoint_last.dcp"  # the directory name, next to checkpoint_last.pt of unsharded runs
META = "meta.pt"

# The residual / dense blocks of fairseq_asam.vision.models and torchvision's ResNets, by class name so
# that this module needs neither import. A block is the unit that is all-gathered before its forward and
# freed after it: the memory peak is one block's full weights, not the model's.
_BLOCK_NAMES = {"_BasicBlockA", "_WideBlock", "_DenseLayer", "_Transition", "_ResNeXtBlock", "BasicBlock",
                "Bottleneck"}


def block_modules(model: nn.Module) -> list[nn.Module]:
    """The blocks of ``model`` that get their own ``fully_shard`` (VGG has none: one unit, the model)."""
    return [m for m in model.modules() if type(m).__name__ in _BLOCK_NAMES]


def shard(model: nn.Module, *, blocks: list[nn.Module] | None = None, mesh=None) -> nn.Module:
    """``fully_shard`` each block, then the whole model (in place; returns ``model``).

    Call it before building the optimizer: the parameters become DTensors, new objects. ``blocks``
    defaults to :func:`block_modules`.
    """
    from torch.distributed.fsdp import fully_shard

    for m in blocks if blocks is not None else block_modules(model):
        fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_fsdp(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without distributed support
        return False
    return isinstance(model, FSDPModule)


def init_process_group(backend: str) -> None:
    """A process group even for one worker (fully_shard needs a device mesh): torchrun's environment, or a
    one-rank group on a free local port when the command runs without torchrun."""
    if dist.is_initialized():
        return
    if "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend)
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", world_size=1, rank=0)


class EvenBatches:
    """The batches of ``loader``, then empty ones up to ``n_batches``: under FSDP every forward all-gathers,
    so every rank must run as many forwards as the others, also when its share of the test set is shorter.
    An empty batch adds nothing to the sums of ``train.evaluate``."""

    def __init__(self, loader, n_batches: int, example: torch.Tensor):
        self.loader, self.n_batches, self.example = loader, n_batches, example

    @staticmethod
    def count(n_examples: int, world: int, batch_size: int) -> int:
        """The batches of the rank with the most examples (rank 0 of ``range(rank, n, world)``)."""
        return math.ceil(math.ceil(n_examples / world) / batch_size)

    def __iter__(self):
        n = 0
        for batch in self.loader:
            n += 1
            yield batch
        for _ in range(self.n_batches - n):
            yield self.example.new_empty((0, *self.example.shape)), torch.empty(0, dtype=torch.long)


# ---- checkpoints (torch.distributed.checkpoint) -----------------------------------------------------


def _states(model, base, opt=None, schedule_meta=None):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    # Keyed by parameter names (FQNs), each rank's slices as DTensors: DCP reshards them on load.
    msd, osd = get_state_dict(model, base)
    out = {"model": msd, "optimizer": osd}
    if opt is not None and opt is not base:
        out["schedule"] = _schedule_tensors(opt, schedule_meta)
    return out


def _schedule_tensors(opt, schedule_meta):
    if schedule_meta is None:  # saving: the live tensors
        return split_schedule_state(opt)[1]
    return schedule_templates(opt, schedule_meta)  # loading: shards shaped like the parameters, to be filled


def save_checkpoint(path: str, model: nn.Module, opt, base: torch.optim.Optimizer, meta: dict) -> None:
    """Every rank writes its shards of the model and of ``base``'s state; rank 0 writes ``meta`` (the
    epoch, history, scheduler, the ASAM shell's state...). Written to ``<path>.tmp`` and renamed: a run
    killed while saving keeps its previous checkpoint."""
    import torch.distributed.checkpoint as dcp

    rank = dist.get_rank()
    tmp, old = f"{path}.tmp", f"{path}.old"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    dcp.save(_states(model, base, opt), checkpoint_id=tmp)
    if rank == 0:
        meta = dict(meta)
        if opt is not base:
            meta["asam"] = opt.state_dict()["asam"]  # the normalization rule; rho/eta/p are in base's groups
            # The schedule's counters (the same on every rank); its per-parameter tensors are in the shards.
            meta["schedule"] = split_schedule_state(opt)[0]
        torch.save(meta, os.path.join(tmp, META))
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def read_meta(path: str) -> dict:
    f = os.path.join(path, META)
    if not os.path.isfile(f):
        raise FileNotFoundError(f"{path} is not a sharded asam-vision-train checkpoint (no {META})")
    return torch.load(f, map_location="cpu", weights_only=True)


def load_checkpoint(path: str, model: nn.Module, opt, base: torch.optim.Optimizer) -> dict:
    """Load the model's and the optimizer's shards (resharded to this run's workers); returns the meta."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    meta = read_meta(path)
    sched_meta = meta.get("schedule") if opt is not base else None
    sd = _states(model, base, opt if sched_meta is not None else None, sched_meta)
    dcp.load(sd, checkpoint_id=path)
    set_state_dict(model, base, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"])
    if opt is not base:
        # Through the shell, so that it checks the normalization rule and shares base's new param_groups.
        opt.load_state_dict({"base": base.state_dict(), "asam": meta.get("asam", {})})
        if sched_meta is not None:
            opt.schedule.load_state_dict(join_schedule_state(opt, sched_meta, sd.get("schedule", {})))
    return meta


def load_full_model_state(path: str, model: nn.Module) -> None:
    """Load a sharded checkpoint's weights into an ordinary (unsharded) model, without a process group."""
    import torch.distributed.checkpoint as dcp

    sd = {"model": model.state_dict()}
    dcp.load(sd, checkpoint_id=path, no_dist=True)
    model.load_state_dict(sd["model"])
