"""``asam-sharpness``: sharpness (paper Eq. 2) or adaptive sharpness (Eq. 4) of a trained checkpoint.

Kwon et al. (ICML 2021), Section 3. Two kinds of checkpoint:

- ``fairseq``: a ``fairseq-train`` checkpoint, loaded by fairseq's own code
  (``checkpoint_utils.load_model_ensemble_and_task``) after the ``--user-dir`` import of
  fairseq_asam (so runs trained with its optimizers and tasks load); the data split comes from the
  task's own ``load_dataset`` and batching, and the loss is the checkpoint's criterion per target
  token (for ``label_smoothed_cross_entropy``, the label-smoothed loss the run trained on);
- ``vision``: an ``asam-vision-train`` checkpoint (``fairseq_asam.vision.train.load_model_from_checkpoint``)
  on the run's data set (``fairseq_asam.vision.data.build_eval_dataset``, test-time transform),
  with the mean cross-entropy (no label smoothing) as the loss.

The measurement is :func:`fairseq_asam.sharpness.measure_sharpness` on the first ``--max-batches``
batches of the split, in eval mode (no dropout). It prints one line and the JSON, and writes the
JSON to ``--out`` (atomically: a failed run leaves no file). Example::

    asam-sharpness fairseq checkpoints/checkpoint_best.pt --data data-bin/iwslt14.tokenized.de-en \\
        --split valid --rho 0.5 --p 2 --max-tokens 4096 --max-batches 20 --out sharpness.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from argparse import Namespace
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from . import _compat
from .checks import argparse_type, check_eta, check_int, check_rho
from .sharpness import measure_sharpness

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class StreamedBatches:
    """A re-iterable data source: every pass loads the batches again and moves each to the device
    just before it is used.

    measure_sharpness iterates the data once per evaluation (1 + (restarts + 1) x (steps + 1) times);
    holding the split on the device instead would cost its whole size (about 30 GB for ImageNet's
    validation set). ``make_batches()`` starts a fresh pass over the host-side batches, ``to_device``
    moves one batch, ``count(batch)`` returns what the report sums (sentences, tokens, examples) and
    is recorded on the first pass only. ``progress`` (a tqdm bar, or None) advances by one per batch.
    """

    def __init__(self, make_batches: Callable[[], Iterable], length: int, to_device: Callable,
                 count: Callable[[Any], dict[str, int]], max_batches: int | None = None):
        self.make_batches, self.to_device, self.count = make_batches, to_device, count
        self.length = length if max_batches is None else min(length, max_batches)
        self.totals: dict[str, int] = {}
        self.progress = None
        self._counted = False

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator:
        n = 0
        totals: dict[str, int] = {}
        for batch in self.make_batches():
            if n >= self.length:
                break
            n += 1
            if not self._counted:
                for k, v in self.count(batch).items():
                    totals[k] = totals.get(k, 0) + int(v)
            yield self.to_device(batch)
            if self.progress is not None:
                self.progress.update(1)
        if not self._counted and n == self.length:
            self.totals, self._counted = totals, True


def _int_at_least(flag, minimum):
    return argparse_type(lambda v, f: check_int(v, f, minimum), flag, convert=int)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("measure (paper Eq. 2 / Eq. 4)")
    g.add_argument("--rho", type=argparse_type(check_rho, "--rho"), required=True, help="radius of the region")
    g.add_argument("--p", choices=("2", "inf"), default="2", help="the norm of the region (default 2)")
    g.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=True,
                   help="adaptive sharpness, Eq. 4 (default); --no-adaptive: sharpness, Eq. 2")
    g.add_argument("--eta", type=argparse_type(check_eta, "--eta"), default=0.01, help="T_w = |w| + eta (default 0.01)")
    g.add_argument("--normalization", choices=("element", "filter"), default="element",
                   help="T_w element-wise or filter-wise (Eq. 5); default element")
    g.add_argument("--normalize-bias", action=argparse.BooleanOptionalAction, default=False,
                   help="T = |b| + eta on biases too (default: T = 1 on biases)")
    g.add_argument("--steps", type=_int_at_least("--steps", 0), default=20, help="ascent steps per start (default 20)")
    g.add_argument("--restarts", type=_int_at_least("--restarts", 0), default=0, help="extra random starts (default 0)")
    g.add_argument("--seed", type=_int_at_least("--seed", 0), default=0, help="seeds the random starts")
    g = common.add_argument_group("run")
    g.add_argument("--max-batches", type=_int_at_least("--max-batches", 1), default=None,
                   help="measure on the first N batches of the split (default: all)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument("--out", default=None, help="write the JSON here as well")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="a progress bar on stderr, one tick per batch evaluated (default: on)")

    ap = argparse.ArgumentParser(
        prog="asam-sharpness",
        description="Sharpness / adaptive sharpness (Kwon et al. 2021, Eq. 2 / Eq. 4) of a fairseq or vision checkpoint.",
    )
    sub = ap.add_subparsers(dest="kind", required=True, metavar="{fairseq,vision}")
    fs = sub.add_parser("fairseq", parents=[common], help="a fairseq-train checkpoint on a data split")
    fs.add_argument("checkpoint", help="checkpoint .pt written by fairseq-train")
    fs.add_argument("--data", default=None, help="data-bin directory (default: the one the checkpoint was trained on)")
    fs.add_argument("--split", default="valid", help="data split: train, valid, test, ... (default valid)")
    fs.add_argument("--user-dir", default=PACKAGE_DIR,
                    help="fairseq --user-dir to import before loading (default: the fairseq_asam package)")
    fs.add_argument("--max-tokens", type=_int_at_least("--max-tokens", 1), default=4096, help="tokens per batch")
    fs.add_argument("--batch-size", type=_int_at_least("--batch-size", 1), default=None, help="sentences per batch")
    fs.add_argument("--batch-seed", type=_int_at_least("--batch-seed", 0), default=None,
                    help="take the batches in a random order drawn with this seed, so that --max-batches is a sample "
                    "of the whole split (default: fairseq's order, which sorts by length: the first batches hold the "
                    "shortest sentences)")
    vi = sub.add_parser("vision", parents=[common], help="an asam-vision-train checkpoint on its data set")
    vi.add_argument("checkpoint", help="checkpoint .pt written by asam-vision-train (or its --fsdp checkpoint_*.dcp folder)")
    vi.add_argument("--split", choices=("train", "test"), default="test", help="default test")
    vi.add_argument("--data-dir", default=None, help="data folder (default: the one the run used)")
    vi.add_argument("--batch-size", type=_int_at_least("--batch-size", 1), default=256)
    return ap


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return torch.device(name)


def load_fairseq(args: argparse.Namespace, device: torch.device):
    """(model, loss_fn, batches, info) for a fairseq checkpoint, through fairseq's own loading code.

    ``batches`` is a :class:`StreamedBatches`: the split is read again on every pass, never held whole.
    """
    from fairseq import checkpoint_utils
    from fairseq import utils as fs_utils

    from .fairseq_ext.checkpoint import allow_fairseq_checkpoints

    fs_utils.import_user_module(Namespace(user_dir=args.user_dir))
    # The allow-list is added when fairseq_ext is first imported; a torch.serialization.safe_globals
    # block run since then (the Hugging Face Trainer wraps its RNG-state load in one that names
    # numpy.ndarray) removes its entries on exit, so add them again right before fairseq's torch.load.
    allow_fairseq_checkpoints()
    overrides = {"data": os.path.abspath(args.data)} if args.data else None
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([args.checkpoint], arg_overrides=overrides)
    model = models[0].to(device)
    criterion = task.build_criterion(cfg.criterion).to(device)
    try:
        task.load_dataset(args.split, combine=False, epoch=1, task_cfg=cfg.task)
        dataset = task.dataset(args.split)
    except (KeyError, FileNotFoundError) as e:
        raise ValueError(f"--split {args.split}: no such split in {cfg.task.data} ({e})") from None
    epoch_itr = task.get_batch_iterator(
        dataset=dataset,
        max_tokens=args.max_tokens,
        max_sentences=args.batch_size,
        max_positions=fs_utils.resolve_max_positions(task.max_positions(), model.max_positions()),
        ignore_invalid_inputs=True,
        seed=1,
        num_workers=0,
    )
    # What fairseq's unshuffled, single-shard epoch iterator does with num_workers=0 (a DataLoader over
    # the frozen batch sampler with the dataset's collater), once per pass instead of once: the same
    # batches in the same order, and only one of them in memory at a time.
    index_batches = epoch_itr.frozen_batches
    if getattr(args, "batch_seed", None) is not None:
        order = torch.randperm(len(index_batches), generator=torch.Generator().manual_seed(args.batch_seed))
        index_batches = [index_batches[i] for i in order.tolist()]

    def make_batches():
        for idx in index_batches:
            yield epoch_itr.collate_fn([dataset[i] for i in idx])

    def to_device(sample):
        return fs_utils.move_to_cuda(sample, device=device) if device.type == "cuda" else sample

    batches = StreamedBatches(make_batches, len(index_batches), to_device,
                              lambda s: {"num_sentences": s["nsentences"], "num_tokens": s["ntokens"]},
                              args.max_batches)

    def loss_fn(m, sample):
        # fairseq criteria return the loss summed over the batch and the count it is normalized by
        # (target tokens, or sentences with --sentence-avg): per-token mean, weighted by tokens.
        loss, sample_size, _ = criterion(m, sample)
        return loss / sample_size, float(sample_size)

    info = dict(
        arch=_compat.config_name(cfg.model),
        task=_compat.config_name(cfg.task),
        criterion=_compat.config_name(cfg.criterion),
        data=cfg.task.data,
        split=args.split,
        num_batches=len(batches),
        batch_seed=getattr(args, "batch_seed", None),
        loss_unit="criterion loss per target token",
    )
    return model, loss_fn, batches, info


def load_vision(args: argparse.Namespace, device: torch.device):
    """(model, loss_fn, batches, info) for an asam-vision-train checkpoint; ``batches`` streams as above."""
    import torch.nn.functional as F

    from .vision.data import build_eval_dataset
    from .vision.train import load_model_from_checkpoint

    # Checkpoints record torch.__version__, a TorchVersion (a str subclass), which torch.load(weights_only=True)
    # refuses by default; allow that one harmless class for this load only.
    with torch.serialization.safe_globals([torch.torch_version.TorchVersion]):
        model, run_args = load_model_from_checkpoint(args.checkpoint, map_location="cpu")
    model = model.to(device)
    dataset = build_eval_dataset(run_args, args.split, data_dir=args.data_dir)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=0)
    # Re-read every pass (test-time transforms are deterministic), one batch on the device at a time.
    batches = StreamedBatches(lambda: iter(loader), len(loader), lambda b: (b[0].to(device), b[1].to(device)),
                              lambda b: {"num_examples": len(b[1])}, args.max_batches)

    def loss_fn(m, batch):
        x, y = batch
        return F.cross_entropy(m(x), y), float(len(y))

    info = dict(
        model=run_args.get("model"),
        dataset=run_args.get("dataset"),
        data=args.data_dir or run_args.get("data_dir"),
        split=args.split,
        num_batches=len(batches),
        loss_unit="cross-entropy per example",
    )
    return model, loss_fn, batches, info


def run(args: argparse.Namespace) -> dict:
    """Load, measure, return the JSON-ready report (raises ValueError on bad input)."""
    sharded = args.kind == "vision" and os.path.isdir(args.checkpoint)  # asam-vision-train --fsdp (DCP folder)
    if not (os.path.isfile(args.checkpoint) or sharded):
        raise ValueError(f"checkpoint: no file at {args.checkpoint}")
    if args.out is not None and os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a folder; give a file name")
    if args.kind == "fairseq" and args.data is not None and not os.path.isdir(args.data):
        raise ValueError(f"--data {args.data}: no such folder")
    device = _device(args.device)
    loader = load_fairseq if args.kind == "fairseq" else load_vision
    model, loss_fn, batches, info = loader(args, device)
    if not len(batches):
        raise ValueError(f"--split {args.split} has no batches to measure on")
    start = time.time()
    from tqdm import tqdm

    # One forward (and backward) pass over the batches per evaluation: the unperturbed loss, then
    # steps + 1 points per start (fewer if an ascent stops at a flat point).
    evaluations = 1 + (args.restarts + 1) * (args.steps + 1)
    with tqdm(total=evaluations * len(batches), unit="batch", desc="asam-sharpness", disable=not args.progress,
              file=sys.stderr, dynamic_ncols=True) as bar:
        batches.progress = bar
        result = measure_sharpness(
            model, loss_fn, batches,
            rho=args.rho, p=math.inf if args.p == "inf" else 2, adaptive=args.adaptive, eta=args.eta,
            steps=args.steps, restarts=args.restarts, seed=args.seed,
            normalization=args.normalization, normalize_bias=args.normalize_bias,
        )  # fmt: skip
        batches.progress = None
    report = dict(
        kind=args.kind,
        checkpoint=os.path.abspath(args.checkpoint),
        measure="adaptive sharpness (Eq. 4)" if args.adaptive else "sharpness (Eq. 2)",
        **info,
        **batches.totals,
        seconds=round(time.time() - start, 3),
        device=str(device),
        **result.to_dict(),
    )
    return report


def _write_json_atomic(path: str, obj) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".sharpness-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def cli_main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        report = run(args)
    except (ValueError, FileNotFoundError) as e:
        ap.exit(2, f"asam-sharpness: error: {e}\n")
    p = "inf" if args.p == "inf" else "2"
    print(
        f"{report['measure']}, p={p}, rho={args.rho:g}: {report['value']:.6g} "
        f"(loss {report['loss']:.6g} -> {report['max_loss']:.6g}, {report['split']} split, "
        f"{report['num_batches']} batches)"
    )
    text = json.dumps(report, indent=1)
    print(text)
    if args.out is not None:
        _write_json_atomic(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
