"""Does (adaptive) sharpness track the generalization gap? Table 1 and Figure 2 of Kwon et al. (2021), Section 3.

A laptop-sized version of the paper's rank-correlation study, on real data that ships inside
scikit-learn (``sklearn.datasets.load_digits``: 1797 8x8 handwritten digits, no download). A grid of
small ReLU MLPs is trained with SGD over the paper's four hyper-parameters (mini-batch size, learning
rate, weight decay, dropout rate). Each network trains until its training cross-entropy reaches
``--target-loss`` (Jiang et al., 2019 compare networks at the same training loss; networks that do
not reach it within ``--max-epochs`` are left out and counted). For each network we record

- the generalization gap: test cross-entropy minus training cross-entropy (Section 2's L_D - L_S,
  with the held-out digits standing in for D), and the error gap;
- sharpness (Eq. 2) and adaptive sharpness (Eq. 4, element-wise, eta = ``--eta``, biases not
  normalized) for p = 2 and p = inf, from :func:`fairseq_asam.sharpness.measure_sharpness` on the
  training set.

Reported, like Table 1: Kendall's tau between each measure and the gap over all networks, the
granulated coefficient psi_i of each hyper-parameter (Jiang et al., 2019: the mean of Kendall's tau
over the groups of networks that differ only in hyper-parameter i) and their average Psi; and like
Figure 2, the four scatter plots (measure vs. gap) in one PNG. Outputs in ``--out-dir``:
``results.json`` (every network's numbers), ``table.md``, ``scatter.png``.

Default grid 3 x 3 x 3 x 3 = 81 networks, 2.5 to 4 minutes on 2 shared CPU cores (README.md, "Measuring sharpness"
records a run); ``--quick`` is a 2 x 2 x 2 x 2 grid of smaller nets for tests (about 15 s)::

    python scripts/correlation_study.py --out-dir runs/correlation
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from fairseq_asam.sharpness import measure_sharpness

HPARAMS = ("batch_size", "lr", "weight_decay", "dropout")
HPARAM_LABELS = {
    "batch_size": "mini-batch size",
    "lr": "learning rate",
    "weight_decay": "weight decay",
    "dropout": "dropout rate",
}
# (column key, p, adaptive) in the order of Table 1.
MEASURES = (("sharp_p2", 2, False), ("asharp_p2", 2, True), ("sharp_pinf", math.inf, False), ("asharp_pinf", math.inf, True))
MEASURE_LABELS = {
    "sharp_p2": "sharpness (p = 2)",
    "asharp_p2": "adaptive sharpness (p = 2)",
    "sharp_pinf": "sharpness (p = inf)",
    "asharp_pinf": "adaptive sharpness (p = inf)",
}


@dataclass
class Config:
    grid: dict
    hidden: int = 128
    depth: int = 2
    n_train: int = 600
    target_loss: float = 0.01
    max_epochs: int = 300
    momentum: float = 0.9
    rho_p2: float = 0.1  # sharpness, p = 2: an l2 ball of radius rho in weight space
    rho_pinf: float = 0.005  # sharpness, p = inf: every weight moves by at most rho
    arho_p2: float = 0.5  # adaptive, p = 2: ||eps / (|w| + eta)||_2 <= rho
    arho_pinf: float = 0.02  # adaptive, p = inf: every weight moves by at most rho (|w| + eta)
    eta: float = 0.01
    sharpness_steps: int = 20
    seed: int = 0


FULL_GRID = {
    "batch_size": [16, 64, 256],
    "lr": [0.01, 0.03, 0.1],
    "weight_decay": [0.0, 1e-4, 1e-3],
    "dropout": [0.0, 0.2, 0.4],
}
QUICK_GRID = {
    "batch_size": [32, 128],
    "lr": [0.03, 0.1],
    "weight_decay": [0.0, 1e-3],
    "dropout": [0.0, 0.3],
}


def full_config() -> Config:
    return Config(grid=FULL_GRID)


def quick_config() -> Config:
    return Config(grid=QUICK_GRID, hidden=32, n_train=300, target_loss=0.05, max_epochs=60, sharpness_steps=4)


def load_data(n_train: int, seed: int):
    """scikit-learn's digits, features in [0, 1], a fixed shuffled split: n_train to train, the rest to test."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    if not 10 <= n_train <= len(x) - 100:
        raise ValueError(f"n_train must be between 10 and {len(x) - 100}, got {n_train}")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    tr, te = perm[:n_train], perm[n_train:]
    return (x[tr], y[tr]), (x[te], y[te])


def make_mlp(hidden: int, depth: int, dropout: float) -> torch.nn.Sequential:
    layers, width = [], 64
    for _ in range(depth):
        layers += [torch.nn.Linear(width, hidden), torch.nn.ReLU(), torch.nn.Dropout(dropout)]
        width = hidden
    layers.append(torch.nn.Linear(width, 10))
    return torch.nn.Sequential(*layers)


@torch.no_grad()
def evaluate(model, data) -> tuple[float, float]:
    model.eval()
    logits = model(data[0])
    return float(F.cross_entropy(logits, data[1])), float((logits.argmax(1) != data[1]).float().mean())


def _ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def train_one(hp: dict, cfg: Config, train, test, seed: int) -> dict:
    """Train one network to the target training loss; return its gap and four sharpness numbers."""
    torch.manual_seed(seed)
    model = make_mlp(cfg.hidden, cfg.depth, hp["dropout"])
    opt = torch.optim.SGD(model.parameters(), lr=hp["lr"], momentum=cfg.momentum, weight_decay=hp["weight_decay"])
    gen = torch.Generator().manual_seed(seed)
    n = len(train[0])
    epochs, converged = 0, False
    train_loss = evaluate(model, train)[0]
    while epochs < cfg.max_epochs:
        model.train()
        for idx in torch.randperm(n, generator=gen).split(hp["batch_size"]):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(train[0][idx]), train[1][idx]).backward()
            opt.step()
        epochs += 1
        train_loss = evaluate(model, train)[0]
        if not math.isfinite(train_loss):
            break
        if train_loss <= cfg.target_loss:
            converged = True
            break
    train_loss, train_err = evaluate(model, train)
    test_loss, test_err = evaluate(model, test)
    rec = dict(hp, epochs=epochs, converged=converged, train_loss=train_loss, test_loss=test_loss,
               train_err=train_err, test_err=test_err, gap=test_loss - train_loss, err_gap=test_err - train_err)
    if not converged:
        return rec
    # The whole training set in one batch: the objective is L_S itself, deterministic in eval mode.
    batches = [train]
    rhos = {"sharp_p2": cfg.rho_p2, "asharp_p2": cfg.arho_p2, "sharp_pinf": cfg.rho_pinf, "asharp_pinf": cfg.arho_pinf}
    for key, p, adaptive in MEASURES:
        r = measure_sharpness(model, _ce, batches, rho=rhos[key], p=p, adaptive=adaptive, eta=cfg.eta,
                              steps=cfg.sharpness_steps, seed=seed)
        rec[key] = r.value
    return rec


# ---- statistics ---------------------------------------------------------------------------------


def kendall_tau(x, y) -> float:
    """Kendall's tau-b (ties handled as scipy does); NaN if either side is constant."""
    from scipy.stats import kendalltau

    if len(x) < 2:
        return float("nan")
    tau = kendalltau(x, y).statistic
    return float(tau)


def granulated(records: list[dict], measure: str, hparam: str, gap: str = "gap") -> float:
    """Jiang et al. (2019), Eq. 4: mean Kendall tau over groups where only ``hparam`` varies."""
    others = [h for h in HPARAMS if h != hparam]
    groups: dict = {}
    for r in records:
        groups.setdefault(tuple(r[h] for h in others), []).append(r)
    taus = []
    for g in groups.values():
        if len({r[hparam] for r in g}) < 2:
            continue
        t = kendall_tau([r[measure] for r in g], [r[gap] for r in g])
        if math.isfinite(t):
            taus.append(t)
    return sum(taus) / len(taus) if taus else float("nan")


def rank_statistics(records: list[dict], gap: str = "gap") -> dict:
    """{measure: {"tau": ..., <hparam>: psi_i, ..., "Psi": mean of psi_i}} over the converged records."""
    stats = {}
    for key, _, _ in MEASURES:
        s = {"tau": kendall_tau([r[key] for r in records], [r[gap] for r in records])}
        psis = []
        for h in HPARAMS:
            s[h] = granulated(records, key, h, gap)
            if math.isfinite(s[h]):
                psis.append(s[h])
        s["Psi"] = sum(psis) / len(psis) if psis else float("nan")
        stats[key] = s
    return stats


def table_markdown(stats: dict, n_models: int, n_total: int) -> str:
    def fmt(v):
        return "n/a" if not math.isfinite(v) else f"{v:.3f}"

    cols = [k for k, _, _ in MEASURES]
    lines = [
        "| | p = 2 sharpness | p = 2 adaptive sharpness | p = inf sharpness | p = inf adaptive sharpness |",
        "|---|---|---|---|---|",
        "| tau (rank corr.) | " + " | ".join(fmt(stats[c]["tau"]) for c in cols) + " |",
    ]
    for h in HPARAMS:
        lines.append(f"| {HPARAM_LABELS[h]} | " + " | ".join(fmt(stats[c][h]) for c in cols) + " |")
    lines.append("| Psi (avg.) | " + " | ".join(fmt(stats[c]["Psi"]) for c in cols) + " |")
    lines.append("")
    lines.append(f"{n_models} of {n_total} networks reached the target training loss and are ranked.")
    return "\n".join(lines) + "\n"


def scatter_png(records: list[dict], stats: dict, path: str) -> None:
    import logging

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq's import leaves the root logger verbose
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(2, 2, figsize=(9, 7.5))
    for ax, (key, _, _), tag in zip(axes.flat, MEASURES, "abcd"):
        xs = [r[key] for r in records]
        ys = [r["gap"] for r in records]
        ax.scatter(xs, ys, s=14, c=[math.log10(r["batch_size"]) for r in records], cmap="viridis")
        if xs and min(xs) > 0:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor-tick labels of a short log axis overlap
        ax.set_title(f"({tag}) {MEASURE_LABELS[key]}, tau = {stats[key]['tau']:.3f}", fontsize=10)
        ax.set_xlabel(MEASURE_LABELS[key])
        ax.set_ylabel("generalization gap (test CE - train CE)")
    fig.suptitle("Sharpness vs. generalization gap, digits MLPs (paper Fig. 2; colour: log batch size)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- driver -------------------------------------------------------------------------------------


def run_study(cfg: Config, out_dir: str, *, progress: bool = True) -> dict:
    """Train the grid, measure, write results.json / table.md / scatter.png into out_dir; return the stats.

    Everything is written to a temporary folder first and moved into place at the end, so a failed or
    interrupted run leaves no half-written outputs.
    """
    from tqdm import tqdm

    for h in HPARAMS:
        if len(cfg.grid.get(h, [])) < 2:
            raise ValueError(f"the grid needs at least two values of {h} for a granulated coefficient, got {cfg.grid.get(h)}")
    train, test = load_data(cfg.n_train, cfg.seed)
    combos = list(itertools.product(*(cfg.grid[h] for h in HPARAMS)))
    records = []
    start = time.time()
    for i, values in enumerate(tqdm(combos, desc="networks", disable=not progress, file=sys.stderr)):
        records.append(train_one(dict(zip(HPARAMS, values)), cfg, train, test, seed=cfg.seed * 100003 + i))
    elapsed = time.time() - start
    ranked = [r for r in records if r["converged"]]
    if len(ranked) < 2:
        raise RuntimeError(
            f"only {len(ranked)} of {len(records)} networks reached --target-loss {cfg.target_loss} within "
            f"--max-epochs {cfg.max_epochs}; raise --max-epochs or --target-loss"
        )
    stats = rank_statistics(ranked)
    table = table_markdown(stats, len(ranked), len(records))
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".correlation-", dir=parent)
    try:
        with open(os.path.join(tmp, "results.json"), "w") as f:
            json.dump({"config": asdict(cfg), "seconds": elapsed, "stats": stats, "networks": records}, f, indent=1)
        with open(os.path.join(tmp, "table.md"), "w") as f:
            f.write(table)
        scatter_png(ranked, stats, os.path.join(tmp, "scatter.png"))
        if os.path.isdir(out_dir):
            for name in ("results.json", "table.md", "scatter.png"):
                os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(table, end="")
    print(f"{len(records)} networks in {elapsed:.0f} s; wrote {out_dir}/results.json, table.md, scatter.png")
    return stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Rank correlation of (adaptive) sharpness with the generalization gap "
                                 "(paper Table 1 / Figure 2) on scikit-learn's digits.")
    ap.add_argument("--out-dir", default="runs/correlation", help="folder for results.json, table.md, scatter.png")
    ap.add_argument("--quick", action="store_true", help="a 16-network grid of small nets (tests, smoke runs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-epochs", type=int, default=None, help="per network (default 300; quick 60)")
    ap.add_argument("--target-loss", type=float, default=None, help="train until this training CE (default 0.01; quick 0.05)")
    ap.add_argument("--sharpness-steps", type=int, default=None, help="ascent steps per measure (default 20; quick 4)")
    ap.add_argument("--eta", type=float, default=None, help="eta of T_w = |w| + eta (default 0.01)")
    ap.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    args = ap.parse_args(argv)
    cfg = quick_config() if args.quick else full_config()
    if args.seed < 0:
        ap.error(f"--seed must be >= 0, got {args.seed}")
    if args.max_epochs is not None:
        if args.max_epochs < 1:
            ap.error(f"--max-epochs must be >= 1, got {args.max_epochs}")
        cfg.max_epochs = args.max_epochs
    if args.target_loss is not None:
        if not (math.isfinite(args.target_loss) and args.target_loss > 0):
            ap.error(f"--target-loss must be a finite number > 0, got {args.target_loss}")
        cfg.target_loss = args.target_loss
    if args.sharpness_steps is not None:
        if args.sharpness_steps < 0:
            ap.error(f"--sharpness-steps must be >= 0, got {args.sharpness_steps}")
        cfg.sharpness_steps = args.sharpness_steps
    if args.eta is not None:
        if not (math.isfinite(args.eta) and args.eta >= 0):
            ap.error(f"--eta must be a finite number >= 0, got {args.eta}")
        cfg.eta = args.eta
    cfg.seed = args.seed
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        ap.error(f"--out-dir {args.out_dir} exists and is not a folder")
    torch.set_num_threads(1)  # small nets: one thread is faster than contending for the shared cores
    try:
        run_study(cfg, args.out_dir, progress=args.progress)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
