"""Benchmark section "lightning": one PyTorch Lightning update, plain Adam vs ASAM vs one-pass ASAM.

The model is torchvision's ResNet-18 (11.2M parameters, 10 classes) on random 32x32 images, randomly
initialised, with its BatchNorm layers (so the second pass runs with their statistics frozen). Each
method is a real ``pl.Trainer`` fit in one process: a LightningModule whose ``configure_optimizers`` returns
Adam, and the same module with :class:`~fairseq_asam.integrations.lightning.SharpnessAwareMixin` returning
``ASAM(..., Adam)`` (full, and ``schedule=OnePass("momentum")``). A callback times each whole update
(``on_train_batch_start`` to ``on_train_batch_end``: both passes for ASAM, the ascent, the restore, the
optimizer step); the methods run alternately, round after round, so that a slow spell of a shared machine
hits all of them, and CPU time of the one-thread process is the work done even when other jobs share the
cores. Peak memory: one process per method, its own peak RSS, over Adam's, in parameter bytes.

    python scripts/benchmark.py --sections lightning
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from .trainer_runs import rotated, run_driver, update_times

METHODS = ("adam", "asam", "asam_one_pass")

_DRIVER = r"""
import json, resource, sys, time
import torch
import torchvision
import pytorch_lightning as pl
from torch import nn

from fairseq_asam import ASAM
from fairseq_asam.integrations.lightning import SharpnessAwareMixin
from fairseq_asam.schedule import OnePass

out_path, spec = sys.argv[1], json.loads(sys.argv[2])
torch.set_num_threads(spec["threads"])
torch.manual_seed(0)
net = torchvision.models.resnet18(num_classes=10)
initial = {k: v.clone() for k, v in net.state_dict().items()}
g = torch.Generator().manual_seed(1)
n = spec["batch"] * spec["updates"]
data = torch.utils.data.TensorDataset(torch.randn(n, 3, spec["size"], spec["size"], generator=g),
                                      torch.randint(0, 10, (n,), generator=g))

class Plain(pl.LightningModule):
    def __init__(self, method):
        super().__init__()
        self.net, self.method = net, method
    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)
    def configure_optimizers(self):
        base = torch.optim.Adam(self.parameters(), lr=1e-3)
        if self.method == "adam":
            return base
        schedule = OnePass("momentum") if self.method == "asam_one_pass" else None
        return ASAM(self.net.named_parameters(), base, rho=0.5, schedule=schedule)

class Sharp(SharpnessAwareMixin, Plain):
    pass

class Timer(pl.Callback):
    def __init__(self):
        self.seconds, self.cpu_seconds = [], []
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.t0, self.c0 = time.perf_counter(), time.process_time()
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.seconds.append(time.perf_counter() - self.t0)
        self.cpu_seconds.append(time.process_time() - self.c0)

runs = []
for method in spec["order"]:
    net.load_state_dict(initial)
    timer = Timer()
    module = Plain(method) if method == "adam" else Sharp(method)
    trainer = pl.Trainer(max_steps=spec["updates"], accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[timer])
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=spec["batch"], num_workers=0))
    if trainer.global_step != spec["updates"]:
        raise SystemExit(f"{method}: {trainer.global_step} updates, expected {spec['updates']}")
    runs.append({"method": method, "update_seconds": timer.seconds, "update_cpu_seconds": timer.cpu_seconds})
with open("/proc/self/status") as f:  # VmHWM: this process's own peak
    hwm = [line for line in f if line.startswith("VmHWM:")]
rec = {"runs": runs, "n_params": sum(p.numel() for p in net.parameters()),
       "param_bytes": sum(p.numel() * p.element_size() for p in net.parameters()),
       "peak_rss_bytes": int(hwm[0].split()[1]) * 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
with open(out_path, "w") as f:
    json.dump(rec, f)
"""


def run_process(order: list[str], *, batch: int, size: int, updates: int, tmp: Path, threads: int = 1) -> dict:
    spec = {"batch": batch, "size": size, "updates": updates, "order": order, "threads": threads}
    return run_driver(_DRIVER, spec, tmp, what=f"Lightning runs {order}", env={"PL_DISABLE_FORK": "1"})


def bench_lightning(*, rounds: int = 3, updates: int = 6, warmup: int = 2, quick: bool = False,
                    memory: bool = True, threads: int = 1, batch: int = 64, size: int = 32) -> dict:
    """Seconds per update of each method and ratios to plain Adam, CPU and wall time: one process runs the
    methods in turn, ``rounds`` times (rotating the order), ``updates`` each, the first ``warmup`` of each run
    not timed; the median over the timed updates of all rounds. ``memory``: one process per method, its
    peak RSS over Adam's in parameter bytes."""
    shape = dict(batch=4, size=16) if quick else dict(batch=batch, size=size)
    methods = list(METHODS)
    with tempfile.TemporaryDirectory(prefix="asam-lightning-bench-") as d:
        tmp = Path(d)
        rec = run_process(rotated(methods, rounds), updates=updates, tmp=tmp, threads=threads, **shape)
        times = update_times(rec["runs"], methods, base="adam", warmup=warmup, updates=updates)
        peak = {m: run_process([m], updates=warmup + 1, tmp=tmp, threads=threads, **shape)["peak_rss_bytes"]
                for m in methods} if memory else {}
    out = {
        "model": "torchvision resnet18, 10 classes",
        "n_params": rec["n_params"],
        "param_bytes": rec["param_bytes"],
        **shape,
        "rounds": rounds,
        "threads": threads,
        **times,
    }
    if memory:
        out["peak_rss_bytes"] = peak
        out["extra_memory_over_adam_in_param_bytes"] = {m: (peak[m] - peak["adam"]) / rec["param_bytes"]
                                                        for m in METHODS}
    return out
