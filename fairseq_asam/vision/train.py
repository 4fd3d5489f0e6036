"""asam-vision-train: CIFAR-10/100 and ImageNet with SGD, SAM or ASAM (paper Section 5.2, 5.4; Tables 2, 3, 4, 6).

The defaults are the paper's (Section 5.2): batch 128, lr 0.1 with cosine decay, momentum 0.9, weight
decay 5e-4, label smoothing 0.1, crop with 4-pixel padding + flip; 200 epochs for SAM/ASAM and 400 for
SGD; rho 0.5 / 1.0 (ASAM, CIFAR-10 / CIFAR-100), 0.05 / 0.1 (SAM); eta 0.01. ImageNet: ResNet-50,
batch 512, lr 0.2, weight decay 1e-4, 100 epochs for SAM/ASAM and 200 for SGD, rho 1.0 (ASAM) / 0.05
(SAM), m = 128. The update itself is :func:`fairseq_asam.vision.step.train_step` around the core.

The PyramidNet-272 row of Tables 2 and 3 (Section 5.2): ``--preset pyramidnet272`` sets the model (with
ShakeDrop), AutoAugment (CIFAR-10 policy), CutMix (probability 0.5, alpha 1), m = 32, lr 0.05, batch
256, 900 epochs for SAM/ASAM and 1800 for SGD, rho 0.05 (SAM) / 1.0 (ASAM) on CIFAR-10 and CIFAR-100;
a flag given explicitly overrides the preset. ``--accum-steps N`` runs each update's batch as N
micro-batches (the same update in 1/N of the activation memory; see :mod:`fairseq_asam.vision.step`).

    asam-vision-train --dataset cifar10 --data-dir data --model resnet20 --minimizer asam --run-dir runs/r20-asam
    asam-vision-train --dataset cifar100 --data-dir data --preset pyramidnet272 --minimizer asam --accum-steps 4
    torchrun --nproc_per_node 4 -m fairseq_asam.vision --dataset imagenet --data-dir /data/imagenet --minimizer asam

Each epoch writes <run-dir>/checkpoint_last.pt (and checkpoint_best.pt), metrics.csv and metrics.json;
args.json holds the resolved arguments; ``--resume`` continues a stopped run to the same final weights.
``--tensorboard-logdir`` / ``--wandb-project`` also send every per-epoch figure (images/s included) to
TensorBoard / W&B (:mod:`fairseq_asam.vision.tracking`).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .. import schedule as _schedule
from ..batchnorm import recompute_bn_stats
from ..checks import check_eta, check_rho
from ..core import ASAM, SAM
from . import data as vdata
from . import fsdp as vfsdp
from .models import CIFAR_MODELS, IMAGENET_MODELS, MODELS, build_model
from .step import train_step
from .tracking import EpochTrackers

logger = logging.getLogger("fairseq_asam.vision")

__all__ = ["build_parser", "cli_main", "load_model_from_checkpoint", "main", "resolve_args"]

CHECKPOINT_VERSION = 1

# Section 5.2 (CIFAR) and 5.2 "ImageNet" paragraph: values that depend on the data set and the minimizer.
_RHO = {("cifar10", "asam"): 0.5, ("cifar100", "asam"): 1.0, ("imagenet", "asam"): 1.0,
        ("cifar10", "sam"): 0.05, ("cifar100", "sam"): 0.1, ("imagenet", "sam"): 0.05}
_EPOCHS = {("cifar", "sgd"): 400, ("cifar", "sam"): 200, ("cifar", "asam"): 200,
           ("imagenet", "sgd"): 200, ("imagenet", "sam"): 100, ("imagenet", "asam"): 100}

# The PyramidNet-272 row of Tables 2-3 (Section 5.2, last paragraph of "CIFAR-10 and CIFAR-100"). Values
# that depend on the minimizer are keyed by it; CutMix probability 0.5 and alpha 1 are Yun et al.'s
# PyramidNet settings (the ASAM paper names CutMix without its hyper-parameters).
PRESETS = {
    "pyramidnet272": {
        "model": "pyramidnet272", "m": 32, "lr": 0.05, "batch_size": 256,
        "epochs": {"sgd": 1800, "sam": 900, "asam": 900}, "rho": {"sam": 0.05, "asam": 1.0},
        "autoaugment": True, "cutmix": 0.5, "cutmix_alpha": 1.0,
    },
}

# Arguments that must not change when a run is resumed (they change the trajectory or the model).
_RESUME_FIXED = ("dataset", "model", "minimizer", "epochs", "batch_size", "lr", "momentum", "weight_decay",
                 "label_smoothing", "rho", "eta", "p", "normalization", "normalize_bias", "m", "label_noise",
                 "seed", "amp", "accum_steps", "autoaugment", "cutmix", "cutmix_alpha",
                 *_schedule.options())
# The cheaper-update options and their "off" values (checkpoints written before they existed have none).
_SCHEDULE_DEFAULTS = {name: o.off for name, o in _schedule.options().items()}
_SCHEDULE_FLAGS = _schedule.flags("--")
# What a checkpoint written before these arguments existed ran with (so it still resumes).
_RESUME_DEFAULTS = {"accum_steps": 1, "autoaugment": False, "cutmix": 0.0, "cutmix_alpha": 1.0, **_SCHEDULE_DEFAULTS}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="asam-vision-train",
        description="Train a CIFAR/ImageNet classifier with SGD, SAM or ASAM (Kwon et al., ICML 2021). "
        "Unset values take the paper's defaults for the data set and minimizer.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=vdata.DATASETS, default="cifar10")
    g.add_argument("--data-dir", default="data",
                   help="holds cifar-10-batches-py/ or cifar-100-python/, or train/ and val/ for imagenet")
    g.add_argument("--download", action="store_true",
                   help="download CIFAR into --data-dir when the files are missing (MD5-checked by torchvision)")
    g.add_argument("--label-noise", type=float, default=0.0, metavar="RATE",
                   help="symmetric label noise on the training set (Table 6), reproducible from --seed")
    g.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: cores - 1, at most 8)")
    g.add_argument("--autoaugment", action=argparse.BooleanOptionalAction, default=None,
                   help="AutoAugment (Cubuk et al. 2019; torchvision, CIFAR-10 policy, ImageNet policy for imagenet) "
                   "after crop and flip (default off; on with --preset pyramidnet272)")
    g.add_argument("--cutmix", type=float, default=None, metavar="PROB",
                   help="CutMix (Yun et al. 2019; torchvision.transforms.v2.CutMix) on each training batch with "
                   "this probability; the labels become class probabilities (default 0: off; preset 0.5)")
    g.add_argument("--cutmix-alpha", type=float, default=None, metavar="ALPHA",
                   help="CutMix's Beta(alpha, alpha) for the mixing ratio (default 1.0)")

    g = p.add_argument_group("model")
    g.add_argument("--model", choices=sorted(MODELS), default=None,
                   help="default: resnet20 for CIFAR, resnet50 for ImageNet")

    g = p.add_argument_group("optimization")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="pyramidnet272: every setting of the paper's PyramidNet-272 row (model with ShakeDrop, "
                   "AutoAugment, CutMix, m 32, lr 0.05, batch 256, 900/1800 epochs, rho 0.05 SAM / 1.0 ASAM)")
    g.add_argument("--minimizer", choices=("sgd", "sam", "asam"), default="asam")
    g.add_argument("--epochs", type=int, default=None, help="default: 200 SAM/ASAM, 400 SGD (ImageNet 100/200)")
    g.add_argument("--batch-size", type=int, default=None, help="global batch, all workers (default 128, ImageNet 512)")
    g.add_argument("--lr", type=float, default=None, help="initial lr, cosine decay (default 0.1, ImageNet 0.2)")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=None, help="default 5e-4, ImageNet 1e-4")
    g.add_argument("--label-smoothing", type=float, default=0.1)
    g.add_argument("--accum-steps", type=int, default=1, metavar="N",
                   help="gradient accumulation: each worker's batch runs as N micro-batches in both passes (eps "
                   "from the whole batch's gradient); --batch-size stays the update's batch")

    g = p.add_argument_group("sharpness-aware minimization (SAM/ASAM)")
    g.add_argument("--rho", type=float, default=None,
                   help="default: ASAM 0.5 CIFAR-10, 1.0 CIFAR-100/ImageNet; SAM 0.05 CIFAR-10/ImageNet, 0.1 CIFAR-100")
    g.add_argument("--eta", type=float, default=0.01, help="ASAM: T_w = |w| + eta")
    # Long aliases: torchrun's own parser takes "--m"/"--p" for abbreviations of its options
    # (--master-port, --print-completion), so under torchrun write --m-sharpness and --sharpness-p.
    g.add_argument("--p", "--sharpness-p", dest="p", choices=("2", "inf"), default="2")
    g.add_argument("--normalization", choices=("element", "filter"), default="element")
    g.add_argument("--normalize-bias", action=argparse.BooleanOptionalAction, default=False)
    g.add_argument("--m", "--m-sharpness", dest="m", type=int, default=None,
                   help="m-sharpness: a separate perturbation per shard of m examples of each worker's batch "
                   "(default: the whole worker batch; ImageNet 128)")

    g = p.add_argument_group("cheaper updates (SAM/ASAM; at most one; docs/efficiency.md compares them)")
    _schedule.add_arguments(g)  # --every, --reuse-alpha, --start, --adaptive-c, --one-pass: one per option

    g = p.add_argument_group("run")
    g.add_argument("--run-dir", default=None, help="default: runs/vision/<dataset>-<model>-<minimizer>-s<seed>")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none",
                   help="mixed precision; fp16 uses a GradScaler across the two passes")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms (bit-exact --resume on GPU; slower)")
    g.add_argument("--resume", nargs="?", const="last", default=None, metavar="CHECKPOINT",
                   help="continue from <run-dir>/checkpoint_last.pt, or from the given checkpoint")
    g.add_argument("--stop-after", type=int, default=None, metavar="EPOCH",
                   help="stop once this many epochs are done (the schedule still spans --epochs); resume later")
    g.add_argument("--fsdp", action="store_true",
                   help="shard the model with FSDP2 (fully_shard per block), eps from the global batch's gradient, "
                   "sharded checkpoints (<run-dir>/checkpoint_last.dcp); see docs/distributed.md")
    g.add_argument("--test-batch-size", type=int, default=256)
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bar per epoch")
    g.add_argument("--tensorboard-logdir", default=None, metavar="DIR",
                   help="also log the per-epoch metrics (and images/s) to TensorBoard under DIR/<run name>")
    g.add_argument("--wandb-project", default=None, metavar="NAME",
                   help="also log the per-epoch metrics to Weights & Biases (WANDB_MODE=offline works offline)")
    return p


def resolve_args(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Fill the paper's defaults and check every value; errors name the flag."""

    def fail(msg):
        if parser is not None:
            parser.error(msg)
        raise ValueError(msg)

    imagenet = args.dataset == "imagenet"
    if args.preset is not None:
        if imagenet:
            fail(f"--preset {args.preset} is a CIFAR setting (Tables 2-3); use --dataset cifar10 or cifar100")
        _apply_preset(args, PRESETS[args.preset])
    if args.autoaugment is None:
        args.autoaugment = False
    if args.cutmix is None:
        args.cutmix = 0.0
    if args.cutmix_alpha is None:
        args.cutmix_alpha = 1.0
    if args.model is None:
        args.model = "resnet50" if imagenet else "resnet20"
    args.fsdp = bool(getattr(args, "fsdp", False))  # a Namespace built by a caller may predate the flag
    if imagenet and args.model not in IMAGENET_MODELS:
        fail(f"--model {args.model} is a 32x32 CIFAR model; for imagenet use one of {sorted(IMAGENET_MODELS)}")
    if not imagenet and args.model not in CIFAR_MODELS:
        fail(f"--model {args.model} is an ImageNet model; for {args.dataset} use one of {sorted(CIFAR_MODELS)}")
    fam = "imagenet" if imagenet else "cifar"
    if args.epochs is None:
        args.epochs = _EPOCHS[(fam, args.minimizer)]
    if args.batch_size is None:
        args.batch_size = 512 if imagenet else 128
    if args.lr is None:
        args.lr = 0.2 if imagenet else 0.1
    if args.weight_decay is None:
        args.weight_decay = 1e-4 if imagenet else 5e-4
    if args.minimizer == "sgd":
        if args.rho is not None or args.m is not None:
            fail("--rho and --m apply to --minimizer sam/asam, not sgd")
    else:
        if args.rho is None:
            args.rho = _RHO[(args.dataset, args.minimizer)]
        if args.m is None and imagenet:
            args.m = 128
    if args.run_dir is None:
        args.run_dir = os.path.join("runs", "vision", f"{args.dataset}-{args.model}-{args.minimizer}-s{args.seed}")
    if args.workers is None:
        args.workers = vdata.default_num_workers()

    checks = [
        ("--epochs", args.epochs, args.epochs >= 1, ">= 1"),
        ("--batch-size", args.batch_size, args.batch_size >= 1, ">= 1"),
        ("--lr", args.lr, math.isfinite(args.lr) and args.lr > 0, "> 0"),
        ("--momentum", args.momentum, 0 <= args.momentum < 1, "in [0, 1)"),
        ("--weight-decay", args.weight_decay, math.isfinite(args.weight_decay) and args.weight_decay >= 0, ">= 0"),
        ("--label-smoothing", args.label_smoothing, 0 <= args.label_smoothing < 1, "in [0, 1)"),
        ("--label-noise", args.label_noise, 0 <= args.label_noise < 1, "in [0, 1)"),
        ("--workers", args.workers, args.workers >= 0, ">= 0"),
        ("--test-batch-size", args.test_batch_size, args.test_batch_size >= 1, ">= 1"),
        ("--accum-steps", args.accum_steps, args.accum_steps >= 1, ">= 1"),
        ("--cutmix", args.cutmix, 0 <= args.cutmix <= 1, "in [0, 1]"),
        ("--cutmix-alpha", args.cutmix_alpha, math.isfinite(args.cutmix_alpha) and args.cutmix_alpha > 0, "> 0"),
    ]
    if args.m is not None:
        checks.append(("--m", args.m, args.m >= 1, ">= 1"))
    if args.stop_after is not None:
        checks.append(("--stop-after", args.stop_after, 1 <= args.stop_after <= args.epochs, f"in [1, --epochs={args.epochs}]"))
    for flag, value, ok, want in checks:
        if not ok:
            fail(f"{flag} must be {want}, got {value}")
    if args.fsdp and args.m is not None:
        fail("--fsdp computes eps from the global batch's gradient (FSDP reduce-scatters the first pass); "
             "per-worker or per-shard eps (--m/--m-sharpness) needs each worker's whole gradient: use DDP "
             "(no --fsdp) with --m-sharpness")
    if args.fsdp and args.amp == "fp16":
        fail("--fsdp with --amp fp16 is not supported (the GradScaler is not tested on sharded gradients); "
             "use --amp bf16")
    try:  # the sharpness-aware hyper-parameters: the same checker as every other front end
        check_eta(args.eta, "--eta")
        if args.rho is not None:
            check_rho(args.rho, "--rho")
        _check_schedule_args(args)
    except ValueError as e:
        fail(str(e))
    return args


def _apply_preset(args: argparse.Namespace, preset: dict) -> None:
    """Fill every value the command line left unset (None) from the preset; explicit flags win."""
    for key, value in preset.items():
        if isinstance(value, dict):  # keyed by minimizer
            if args.minimizer not in value:
                continue  # e.g. no rho for SGD
            value = value[args.minimizer]
        if key == "m" and args.minimizer == "sgd":
            continue  # m-sharpness is a SAM/ASAM setting
        if getattr(args, key) is None:
            setattr(args, key, value)


def _schedule_of(args, total_updates=None):
    kw = {k: getattr(args, k, d) for k, d in _SCHEDULE_DEFAULTS.items()}
    return _schedule.make_schedule(**kw, total_updates=total_updates, flags=_SCHEDULE_FLAGS)


def _check_schedule_args(args) -> None:
    policy = _schedule_of(args, total_updates=1)
    if policy.key is not None and args.minimizer == "sgd":
        raise ValueError(f"{', '.join(_SCHEDULE_FLAGS.values())} apply to --minimizer sam/asam")
    policy.check_mode(sharded="--fsdp" if getattr(args, "fsdp", False) else None,
                      per_shard_eps="--m" if args.m is not None else None)


# ---- distributed ------------------------------------------------------------------------------------


def _dist_env():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return world, rank, local


def _device(args, local_rank: int) -> torch.device:
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise SystemExit("asam-vision-train: --device cuda but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _broadcast_buffers(model: nn.Module) -> None:
    # BatchNorm statistics drift apart on the workers (each saw its own shards): evaluate rank 0's.
    for b in model.buffers():
        dist.broadcast(b, 0)


def _ranks_agree(model: nn.Module, device) -> bool:
    ok = True
    for t in list(model.parameters()) + list(model.buffers()):
        ref = t.detach().clone()
        dist.broadcast(ref, 0)
        ok = ok and torch.equal(ref, t.detach())
    flag = torch.tensor([int(ok)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


# ---- helpers ----------------------------------------------------------------------------------------


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    # Every epoch starts from an RNG state that depends only on (seed, epoch, rank): a resumed run
    # draws the same crops, flips and shuffles as an uninterrupted one.
    return (seed * 1_000_003 + epoch * 7919 + rank * 104_729) % 2**63


def _atomic_write(path: str, write) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def _save_json(path, obj):
    def w(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    _atomic_write(path, w)


def _write_metrics(run_dir: str, history: list[dict]) -> None:
    _save_json(os.path.join(run_dir, "metrics.json"), history)
    if not history:
        return

    def w(tmp):
        with open(tmp, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(history[0]))
            wr.writeheader()
            wr.writerows(history)

    _atomic_write(os.path.join(run_dir, "metrics.csv"), w)


def _hard_labels(y: torch.Tensor) -> torch.Tensor:
    # CutMix gives class probabilities: the training accuracy counts the dominant class as the label.
    return y.argmax(1) if y.dim() > 1 else y


def _cutmix_batch(cutmix, prob: float, x, y, num_classes: int):
    """CutMix (Yun et al. 2019) on the batch with probability ``prob``; the labels are class probabilities
    either way, so the criterion sees one target type. Draws from the global generator, which each epoch
    seeds: a resumed run mixes the same batches the same way."""
    if float(torch.rand(())) < prob:
        return cutmix(x, y)
    return x, nn.functional.one_hot(y, num_classes).to(x.dtype)


def _topk_correct(logits: torch.Tensor, y: torch.Tensor, ks=(1, 5)) -> list[int]:
    k = min(max(ks), logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hit = top.eq(y.unsqueeze(1))
    return [int(hit[:, : min(kk, k)].any(1).sum()) for kk in ks]


@torch.no_grad()
def evaluate(model, loader, device, autocast) -> dict:
    """Mean cross-entropy (no smoothing), top-1 and top-5 accuracy in %, summed over all ranks."""
    model.eval()
    tot = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top1, top5, count
    ce = nn.CrossEntropyLoss(reduction="sum")
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast():
            logits = model(x)
        logits = logits.float()
        c1, c5 = _topk_correct(logits, y)
        tot += torch.tensor([float(ce(logits, y)), c1, c5, len(y)], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tot)
    loss, c1, c5, n = tot.tolist()
    model.train()
    return {"loss": loss / max(n, 1), "top1": 100.0 * c1 / max(n, 1), "top5": 100.0 * c5 / max(n, 1)}


def _make_optimizer(model: nn.Module, args):
    base = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    p = math.inf if args.p == "inf" else 2
    if args.minimizer == "asam":
        opt = ASAM(model.named_parameters(), base, rho=args.rho, eta=args.eta, p=p,
                   normalization=args.normalization, normalize_bias=args.normalize_bias, schedule=_schedule_of(args))
    elif args.minimizer == "sam":
        opt = SAM(model.named_parameters(), base, rho=args.rho, p=p, schedule=_schedule_of(args))
    else:
        opt = base
    return opt, base


def _autocast_factory(args, device):
    if args.amp == "none":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if args.amp == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


def _setup_logging(run_dir: str | None, rank: int) -> None:
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s | %(levelname)s | %(message)s", "%H:%M:%S")
    sh = logging.StreamHandler(sys.stdout)
    sh.setFormatter(fmt)
    logger.addHandler(sh)
    if run_dir is not None and rank == 0:
        fh = logging.FileHandler(os.path.join(run_dir, "train.log"))
        fh.setFormatter(fmt)
        logger.addHandler(fh)


def _jsonable(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items()}


# ---- checkpoints -------------------------------------------------------------------------------------


def load_model_from_checkpoint(path: str, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """(model in eval mode with the checkpoint's weights, the run's resolved args as a dict).

    The args dict has what :func:`fairseq_asam.vision.data.build_eval_dataset` needs (dataset, data_dir,
    seed, label_noise) and ``num_classes``.
    """
    if os.path.isdir(path):  # a sharded (--fsdp) checkpoint: read without a process group
        args = dict(vfsdp.read_meta(path)["args"])
        model = build_model(args["model"], int(args["num_classes"]))
        vfsdp.load_full_model_state(path, model)
        return model.eval(), args
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "args" not in ckpt:
        raise ValueError(f"{path} is not an asam-vision-train checkpoint (no 'model'/'args')")
    args = dict(ckpt["args"])
    model = build_model(args["model"], int(args["num_classes"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, args


def _save_checkpoint(path, model, opt, lr_scheduler, scaler, epoch, history, best, args_dict):
    state = {
        "version": CHECKPOINT_VERSION,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": lr_scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "history": history,
        "best": best,
        "args": args_dict,
    }
    _atomic_write(path, lambda tmp: torch.save(state, tmp))


# ---- the run -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _torch_globals_restored():
    """Give back torch's process-wide settings that a run changes (deterministic algorithms, cudnn.benchmark,
    CUBLAS_WORKSPACE_CONFIG), also when it fails: code that calls main() in-process, such as a test suite or a
    notebook, keeps its own."""
    det = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark = torch.backends.cudnn.benchmark
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(det, warn_only=warn_only)
        torch.backends.cudnn.benchmark = benchmark
        if cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas


def main(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> dict:
    """Train; returns the summary (best and final test accuracy). ``args`` as from :func:`build_parser`.

    torch's global settings that the run changes are restored when it returns or fails.
    """
    with _torch_globals_restored():
        return _train(args, parser)


def _train(args: argparse.Namespace, parser: argparse.ArgumentParser | None) -> dict:
    run = _setup(args, parser)  # checks, data and model: nothing written yet
    start_epoch, history, best = _resume(run)  # before args.json: a mismatched --resume rewrites nothing
    _open_run_dir(run, start_epoch)
    _build_loaders(run)
    args = run.args
    last_epoch = args.stop_after if args.stop_after is not None else args.epochs
    for epoch in range(start_epoch, last_epoch):
        rec = _train_epoch(run, epoch)
        history.append(rec)
        if rec["test_acc"] > best["top1"]:
            best = {"top1": rec["test_acc"], "top5": rec["test_top5"], "epoch": epoch + 1}
        _save(run, epoch + 1, history, best)
    return _finish(run, history, best)


@dataclasses.dataclass
class _Run:
    """What one run holds: built by :func:`_setup`, the loaders and trackers by :func:`_open_run_dir` and
    :func:`_build_loaders` (after a resume has loaded the weights)."""

    args: argparse.Namespace
    parser: argparse.ArgumentParser | None
    world: int
    rank: int
    local_rank: int
    device: torch.device
    ckpt_path: str | None  # the checkpoint to resume from
    train_ds: torch.utils.data.Dataset
    n_noisy: int  # training labels corrupted by --label-noise
    test_ds: torch.utils.data.Dataset
    num_classes: int
    model: nn.Module
    opt: torch.optim.Optimizer
    base: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    criterion: nn.Module
    autocast: object
    args_dict: dict
    ddp_model: nn.Module | None = None
    trackers: EpochTrackers | None = None
    gen: torch.Generator | None = None
    sampler: torch.utils.data.Sampler | None = None
    train_loader: torch.utils.data.DataLoader | None = None
    test_loader: object = None
    cutmix: object = None

    def fail(self, msg):
        _fail(self.parser, msg)


def _fail(parser, msg):
    if parser is not None:
        parser.error(msg)
    raise ValueError(msg)


def _last_name(args) -> str:
    return vfsdp.CHECKPOINT if args.fsdp else "checkpoint_last.pt"


def _setup(args: argparse.Namespace, parser: argparse.ArgumentParser | None) -> _Run:
    """Resolve and check the arguments, start the process group, build data, model and optimizer."""
    def fail(msg):
        _fail(parser, msg)

    args = resolve_args(args, parser)
    world, rank, local_rank = _dist_env()
    if args.batch_size % world:
        fail(f"--batch-size {args.batch_size} must be divisible by the number of workers ({world})")
    if args.batch_size % (world * args.accum_steps):
        fail(f"--batch-size {args.batch_size} must be divisible by --accum-steps {args.accum_steps} times the "
             f"number of workers ({world}): each worker's batch is cut into equal micro-batches")
    device = _init_process(args, local_rank, world)
    _setup_logging(None, rank)
    ckpt_path = _checkpoint_to_resume(args, fail)

    # Data and model before the run directory exists: bad input leaves nothing behind.
    train_ds, n_noisy, test_ds, num_classes = _build_data(args, world, rank, fail)
    _seed_everything(args.seed)
    model = build_model(args.model, num_classes).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if args.fsdp:
        model = vfsdp.shard(model)  # before the optimizer: the parameters become DTensors
    opt, base = _make_optimizer(model, args)
    lr_scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(base, T_max=args.epochs)
    scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    autocast = _autocast_factory(args, device)

    args_dict = _jsonable(args)
    args_dict.update(num_classes=num_classes, world_size=world, torch_version=str(torch.__version__),
                     labels_corrupted=n_noisy, train_size=len(train_ds), test_size=len(test_ds))
    return _Run(args=args, parser=parser, world=world, rank=rank, local_rank=local_rank, device=device,
                ckpt_path=ckpt_path, train_ds=train_ds, n_noisy=n_noisy, test_ds=test_ds, num_classes=num_classes,
                model=model, opt=opt, base=base, lr_scheduler=lr_scheduler, scaler=scaler, criterion=criterion, autocast=autocast,
                args_dict=args_dict)


def _init_process(args, local_rank: int, world: int) -> torch.device:
    """Determinism settings, the device and the process group."""
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # must precede CUDA's first cuBLAS call
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    device = _device(args, local_rank)
    if device.type == "cuda" and not args.deterministic:
        torch.backends.cudnn.benchmark = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if args.fsdp:
        vfsdp.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def _checkpoint_to_resume(args, fail) -> str | None:
    """The checkpoint --resume names (checked to exist), or None; a fresh run refuses a used --run-dir."""
    if args.resume is None:
        if any(os.path.exists(os.path.join(args.run_dir, n)) for n in ("checkpoint_last.pt", vfsdp.CHECKPOINT)):
            fail(f"--run-dir {args.run_dir} already holds a run (checkpoint_last); pass --resume or another --run-dir")
        return None
    ckpt_path = os.path.join(args.run_dir, _last_name(args)) if args.resume == "last" else args.resume
    if not (os.path.isdir if args.fsdp else os.path.isfile)(ckpt_path):
        other = "checkpoint_last.pt" if args.fsdp else vfsdp.CHECKPOINT
        hint = (f" ({other} is there: the run was {'not ' if args.fsdp else ''}trained with --fsdp)"
                if os.path.exists(os.path.join(args.run_dir, other)) else "")
        fail(f"--resume: no {'sharded (--fsdp) ' if args.fsdp else ''}checkpoint at {ckpt_path}{hint}")
    return ckpt_path


def _build_data(args, world: int, rank: int, fail):
    """(train set, number of corrupted labels, test set, number of classes); unreadable data is a --data-dir
    error."""
    try:
        train_ds, n_noisy = vdata.build_train_dataset(vars(args), download=args.download and rank == 0)
        if world > 1:
            dist.barrier()  # rank 0 downloaded; the others read the files now
            if rank != 0:
                train_ds, n_noisy = vdata.build_train_dataset(vars(args))
        test_ds = vdata.build_eval_dataset(vars(args), "test")
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        fail(f"--data-dir: {e}")
    base_train = train_ds.base if isinstance(train_ds, vdata.NoisyLabels) else train_ds
    num_classes = vdata.num_classes_of(args.dataset, base_train)
    if args.dataset == "imagenet" and list(base_train.classes) != list(test_ds.classes):
        fail(f"--data-dir: train/ and val/ of {args.data_dir} do not have the same class folders")
    return train_ds, n_noisy, test_ds, num_classes


def _resume(run: _Run) -> tuple[int, list[dict], dict]:
    """(epochs done, history, best) from the checkpoint, whose fixed arguments must match; a fresh start
    without one."""
    if run.ckpt_path is None:
        return 0, [], {"top1": -1.0, "top5": -1.0, "epoch": 0}
    args, args_dict = run.args, run.args_dict
    ckpt = (vfsdp.read_meta(run.ckpt_path) if args.fsdp
            else torch.load(run.ckpt_path, map_location=run.device, weights_only=True))
    saved = ckpt["args"]
    diff = [k for k in _RESUME_FIXED if saved.get(k, _RESUME_DEFAULTS.get(k)) != args_dict.get(k)]
    if diff:
        run.fail("--resume: these arguments differ from the checkpoint's: "
                 + ", ".join(f"--{k.replace('_', '-')} {args_dict.get(k)} (checkpoint: "
                             f"{saved.get(k, _RESUME_DEFAULTS.get(k))})" for k in diff))
    if args.fsdp:  # any number of workers: DCP reshards
        vfsdp.load_checkpoint(run.ckpt_path, run.model, run.opt, run.base)
    else:
        run.model.load_state_dict(ckpt["model"])
        run.opt.load_state_dict(ckpt["optimizer"])
    run.lr_scheduler.load_state_dict(ckpt["scheduler"])
    if run.scaler is not None and ckpt.get("scaler"):
        run.scaler.load_state_dict(ckpt["scaler"])
    return ckpt["epoch"], list(ckpt["history"]), dict(ckpt["best"])


def _open_run_dir(run: _Run, start_epoch: int) -> None:
    """The run directory with args.json and train.log, the opening log lines and the trackers."""
    args, rank = run.args, run.rank
    if rank == 0:
        os.makedirs(args.run_dir, exist_ok=True)
        _save_json(os.path.join(args.run_dir, "args.json"), run.args_dict)
    if run.world > 1:
        dist.barrier()
    _setup_logging(args.run_dir, rank)
    logger.info("asam-vision-train %s", " ".join(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()))
    logger.info("%s: %d training / %d test images, %d classes; model %s, %d parameters; %d worker(s) on %s",
                args.dataset, len(run.train_ds), len(run.test_ds), run.num_classes, args.model,
                sum(p.numel() for p in run.model.parameters()), run.world, run.device)
    if args.label_noise:
        logger.info("label noise: %d of %d training labels corrupted (%.4f; requested %.4f)",
                    run.n_noisy, len(run.train_ds), run.n_noisy / len(run.train_ds), args.label_noise)
    if run.ckpt_path is not None:
        logger.info("resumed from %s after epoch %d", run.ckpt_path, start_epoch)
    run.trackers = EpochTrackers()
    if rank == 0:
        try:
            run.trackers = EpochTrackers(tensorboard_logdir=args.tensorboard_logdir, wandb_project=args.wandb_project,
                                         run_name=os.path.basename(os.path.normpath(args.run_dir)),
                                         run_dir=args.run_dir, config=run.args_dict)
        except ValueError as e:
            run.fail(str(e))


def _build_loaders(run: _Run) -> None:
    """The DDP wrapper, the samplers and loaders (the training one driven by ``run.gen``) and CutMix."""
    args, world, rank, device = run.args, run.world, run.rank, run.device
    run.ddp_model = run.model
    if world > 1 and not args.fsdp:
        run.ddp_model = nn.parallel.DistributedDataParallel(
            run.model, device_ids=[run.local_rank] if device.type == "cuda" else None)

    local_bs = args.batch_size // world
    run.gen = torch.Generator()
    if world > 1:
        run.sampler = torch.utils.data.distributed.DistributedSampler(run.train_ds, world, rank, shuffle=True,
                                                                      seed=args.seed)
    else:
        run.sampler = torch.utils.data.RandomSampler(run.train_ds, generator=run.gen)
    loader_kw = dict(num_workers=args.workers, pin_memory=device.type == "cuda",
                     persistent_workers=False, worker_init_fn=vdata.seed_worker)
    run.train_loader = torch.utils.data.DataLoader(run.train_ds, batch_size=local_bs, sampler=run.sampler,
                                                   generator=run.gen, **loader_kw)
    if isinstance(run.opt, ASAM):
        run.opt.schedule.set_total_updates(len(run.train_loader) * args.epochs)  # the late phase's switch point
    # Each rank evaluates every world-th test image; the sums are all-reduced (no padding, exact).
    test_part = torch.utils.data.Subset(run.test_ds, range(rank, len(run.test_ds), world))
    run.test_loader = torch.utils.data.DataLoader(test_part, batch_size=args.test_batch_size, shuffle=False,
                                                  **loader_kw)
    if args.fsdp:
        run.test_loader = vfsdp.EvenBatches(
            run.test_loader, vfsdp.EvenBatches.count(len(run.test_ds), world, args.test_batch_size), run.test_ds[0][0])

    if args.cutmix > 0:
        from torchvision.transforms import v2

        run.cutmix = v2.CutMix(alpha=args.cutmix_alpha, num_classes=run.num_classes)


def _train_epoch(run: _Run, epoch: int) -> dict:
    """One epoch of updates and the evaluation after it; logs and tracks the epoch's record and returns it."""
    args, world, opt = run.args, run.world, run.opt
    _seed_everything(_epoch_seed(args.seed, epoch, run.rank))
    run.gen.manual_seed(_epoch_seed(args.seed, epoch, 0))
    if world > 1:
        run.sampler.set_epoch(epoch)
    run.model.train()
    t0 = time.time()
    lr = run.base.param_groups[0]["lr"]
    sched_at_start = _schedule_counts(opt)
    sums, steps, skipped, seen = _train_batches(run, epoch)
    train_s = time.time() - t0  # images/s counts the training passes only, not the evaluation
    run.lr_scheduler.step()
    if epoch + 1 == args.epochs and isinstance(opt, ASAM) and opt.schedule.trains_at_perturbed_weights:
        _recompute_batchnorm_at_w(run)
    totals = torch.cat([sums, sums.new_tensor([float(seen)])])  # loss*n, correct, eps_norm sum, n
    if world > 1:
        dist.all_reduce(totals)
        _broadcast_buffers(run.model)
    loss_sum, correct_sum, eps_sum, count = totals.tolist()
    test = evaluate(run.model, run.test_loader, run.device, run.autocast)
    rec = {
        "epoch": epoch + 1,
        "lr": lr,
        "train_loss": loss_sum / max(count, 1),
        "train_acc": 100.0 * correct_sum / max(count, 1),
        "test_loss": test["loss"],
        "test_acc": test["top1"],
        "test_top5": test["top5"],
        "eps_norm": eps_sum / max(steps * world, 1) if args.minimizer != "sgd" else 0.0,
        "skipped_steps": skipped,
        "images_per_s": round(count / max(train_s, 1e-9), 1),
        "second_pass_frac": _second_pass_fraction(opt, sched_at_start),
        "time_s": round(time.time() - t0, 3),
    }
    logger.info("epoch %d/%d | lr %.5f | train loss %.4f acc %.2f | test loss %.4f top-1 %.2f top-5 %.2f | "
                "%.1f img/s | %.1fs%s",
                epoch + 1, args.epochs, lr, rec["train_loss"], rec["train_acc"], rec["test_loss"], rec["test_acc"],
                rec["test_top5"], rec["images_per_s"], rec["time_s"],
                f" | {skipped} steps skipped (non-finite grad)" if skipped else "")
    run.trackers.log_epoch(rec)
    return rec


def _recompute_batchnorm_at_w(run: _Run) -> None:
    """After the last epoch of a schedule whose only forward runs at w + eps: BatchNorm's running statistics
    recomputed at w, one forward pass over the training data (``torch.optim.swa_utils.update_bn``), before the
    final evaluation and checkpoint. Under DDP rank 0's statistics are broadcast right after, as every epoch."""
    if not recompute_bn_stats(run.model, run.train_loader, device=run.device):
        return
    logger.info("BatchNorm running statistics recomputed at w over the training data (the schedule trains at "
                "w + eps)")


def _train_batches(run: _Run, epoch: int):
    """The epoch's updates: (device sums of loss*n, correct and eps_norm; updates; skipped updates; images)."""
    from tqdm import tqdm

    args, device = run.args, run.device
    # loss*n, correct, eps_norm sum: on the device, where adding to them needs no host sync. The example
    # count is known on the host and stays there (making a device tensor of it each step synchronised).
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    steps = skipped = seen = 0
    bar = tqdm(run.train_loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not (args.progress and run.rank == 0),
               leave=False, dynamic_ncols=True)
    for x, y in bar:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        if run.cutmix is not None:
            x, y = _cutmix_batch(run.cutmix, args.cutmix, x, y, run.num_classes)
        r = train_step(run.ddp_model, run.opt, run.criterion, x, y, m_sharpness=args.m, scaler=run.scaler,
                       autocast=run.autocast, accum_steps=args.accum_steps)
        n = r.logits.shape[0]
        with torch.no_grad():
            correct = (r.logits.argmax(1) == _hard_labels(y)[:n]).sum()
            eps = r.eps_norm if r.eps_norm is not None else torch.zeros((), device=device)
            sums += torch.stack([r.loss.double() * n, correct.double(), eps.double().to(device)])
        steps += 1
        seen += n
        skipped += int(r.skipped)
        if steps % 20 == 0 and bar.disable is False:
            s = sums.tolist()  # a sync, only when a progress bar shows it
            bar.set_postfix(loss=f"{s[0] / seen:.3f}", acc=f"{100 * s[1] / seen:.1f}")
    bar.close()
    return sums, steps, skipped, seen


def _save(run: _Run, epochs_done: int, history: list[dict], best: dict) -> None:
    """checkpoint_last (and checkpoint_best when this epoch is the best), metrics.csv and metrics.json."""
    args = run.args
    if args.fsdp:  # every rank writes its shards
        meta = {"version": CHECKPOINT_VERSION, "scheduler": run.lr_scheduler.state_dict(), "scaler": None,
                "epoch": epochs_done, "history": history, "best": best, "args": run.args_dict}
        vfsdp.save_checkpoint(os.path.join(args.run_dir, _last_name(args)), run.model, run.opt, run.base, meta)
        if run.rank == 0:
            if best["epoch"] == epochs_done:
                best_dir = os.path.join(args.run_dir, "checkpoint_best.dcp")
                shutil.rmtree(best_dir, ignore_errors=True)
                shutil.copytree(os.path.join(args.run_dir, _last_name(args)), best_dir)
            _write_metrics(args.run_dir, history)
    elif run.rank == 0:
        path = os.path.join(args.run_dir, "checkpoint_last.pt")
        _save_checkpoint(path, run.model, run.opt, run.lr_scheduler, run.scaler, epochs_done, history, best, run.args_dict)
        if best["epoch"] == epochs_done:
            _atomic_write(os.path.join(args.run_dir, "checkpoint_best.pt"),
                          lambda tmp, src=path: _copy(src, tmp))
        _write_metrics(args.run_dir, history)


def _finish(run: _Run, history: list[dict], best: dict) -> dict:
    """Close the trackers, check that the DDP workers agree, write summary.json and log the result."""
    args = run.args
    run.trackers.close()
    if run.world > 1 and not args.fsdp:  # (sharded weights differ by design)
        if not _ranks_agree(run.model, run.device):
            raise RuntimeError("the workers' weights differ after training: the DDP update is broken")
        logger.info("weights identical on all %d ranks", run.world)
    done = len(history)
    summary = {
        "dataset": args.dataset, "model": args.model, "minimizer": args.minimizer, "seed": args.seed,
        "label_noise": args.label_noise, "epochs_done": done, "epochs": args.epochs,
        "best_test_acc": best["top1"], "best_test_top5": best["top5"], "best_epoch": best["epoch"],
        "final_test_acc": history[-1]["test_acc"] if history else None,
        "final_test_top5": history[-1]["test_top5"] if history else None,
    }
    if run.rank == 0:
        _save_json(os.path.join(args.run_dir, "summary.json"), summary)
    if done < args.epochs:
        logger.info("stopped after epoch %d of %d; continue with --resume --run-dir %s", done, args.epochs, args.run_dir)
    top5 = args.dataset == "imagenet"
    logger.info("best test top-1 %.2f%%%s (epoch %d) | final test top-1 %.2f%%%s",
                best["top1"], f" top-5 {best['top5']:.2f}%" if top5 else "", best["epoch"],
                summary["final_test_acc"] or 0.0, f" top-5 {summary['final_test_top5']:.2f}%" if top5 else "")
    return summary


def _schedule_counts(opt):
    return (opt.schedule.updates, opt.schedule.second_passes) if isinstance(opt, ASAM) else (0, 0)


def _second_pass_fraction(opt, start) -> float:
    """The fraction of this epoch's updates that ran the second pass (0 for SGD)."""
    if not isinstance(opt, ASAM):
        return 0.0
    u, s = _schedule_counts(opt)
    return (s - start[1]) / max(u - start[0], 1)


def _copy(src, dst):
    import shutil

    shutil.copyfile(src, dst)


def cli_main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    ok = False
    try:
        main(args, parser)
        ok = True
    finally:
        if dist.is_available() and dist.is_initialized():
            if ok:
                # Every rank past its last collective before any tears gloo down: without it a rank that
                # exits early can abort the other in gloo's teardown ("terminate called without an
                # active exception"), seen in CI once.
                dist.barrier()
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
