#!/usr/bin/env python
"""The paper's Figure 4 (Section 5.1): ASAM's test accuracy against rho for four factors.

The factors (paper, Section 5.1 and Figure 4):

    elem-pinf     element-wise T_w, p = inf
    elem-p2       element-wise T_w, p = 2, biases not normalized (the paper's choice for all other runs)
    elem-p2-bn    element-wise T_w, p = 2, with bias normalization ("BN" in the figure's legend)
    filter-p2     filter-wise T_w, p = 2

Each (factor, rho, seed) is one ``asam-vision-train`` run in ``<out>/<factor>-rho<rho>-s<seed>``.
A run that finished is reused (not retrained), an interrupted one resumes from its last checkpoint
(``--resume``), so the script can simply be run again. Then it writes ``<out>/results.csv`` and
``results.json`` (one row per factor x rho x seed), ``<out>/figure4.md`` (mean ± std over seeds) and
the plot (test accuracy against rho on a log axis, one curve per factor, mean ± std over seeds).

    python scripts/figure4.py --data-dir data                 # the paper's setting: WRN-16-8, CIFAR-10,
                                                              # rho grid 5e-5 ... 2.0, 200 epochs (GPU days)
    python scripts/figure4.py --preset laptop --out runs/figure4-laptop    # minutes on a CPU

The laptop preset writes scikit-learn's real handwritten digits as CIFAR-10 files
(:func:`fairseq_asam.vision.toydata.write_cifar_digits`) into ``<out>/data`` and trains ResNet-8 on them
for 6 epochs over 5 values of rho with 2 seeds (40 short runs, about 10 CPU-minutes); the measured
result is in docs/vision-figure4.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time

# The rows of the figure's legend: asam-vision-train flags for each factor.
FACTORS = {
    "elem-pinf": ["--normalization", "element", "--p", "inf", "--no-normalize-bias"],
    "elem-p2": ["--normalization", "element", "--p", "2", "--no-normalize-bias"],
    "elem-p2-bn": ["--normalization", "element", "--p", "2", "--normalize-bias"],
    "filter-p2": ["--normalization", "filter", "--p", "2", "--no-normalize-bias"],
}
LABELS = {
    "elem-pinf": "element-wise, p=inf",
    "elem-p2": "element-wise, p=2",
    "elem-p2-bn": "element-wise, p=2, w/ BN (bias norm.)",
    "filter-p2": "filter-wise, p=2",
}
# Section 5.2: "a grid search over {0.00005, 0.0001, 0.0002, ..., 0.5, 1.0, 2.0}" (1-2-5 steps).
PAPER_RHOS = (5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)

PRESETS = {
    # WRN-16-8 on CIFAR-10 with the paper's Section 5.2 training settings (asam-vision-train's defaults).
    "paper": dict(dataset="cifar10", model="wrn16_8", rhos=PAPER_RHOS, seeds=(0, 1, 2), epochs=None,
                  extra=""),
    # ~10 CPU-minutes on one core: real 32x32 images (sklearn digits, 1437 train / 360 test), ResNet-8.
    "laptop": dict(dataset="cifar10", model="resnet8", rhos=(1e-4, 1e-3, 1e-2, 0.1, 1.0), seeds=(0, 1), epochs=6,
                   extra="--batch-size 32 --lr 0.1 --workers 0"),
}


def run_dir_name(factor: str, rho: float, seed: int) -> str:
    return f"{factor}-rho{rho:g}-s{seed}"


def _summary(run_dir: str):
    path = os.path.join(run_dir, "summary.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def run_status(run_dir: str) -> str:
    """'done' (summary says every epoch ran), 'partial' (a checkpoint to resume from) or 'new'."""
    s = _summary(run_dir)
    if s is not None and s["epochs_done"] == s["epochs"]:
        return "done"
    return "partial" if os.path.isfile(os.path.join(run_dir, "checkpoint_last.pt")) else "new"


def train_argv(cfg: dict, factor: str, rho: float, seed: int, run_dir: str, resume: bool) -> list[str]:
    argv = ["--dataset", cfg["dataset"], "--data-dir", cfg["data_dir"], "--model", cfg["model"],
            "--minimizer", "asam", "--rho", repr(rho), "--seed", str(seed), "--run-dir", run_dir, "--no-progress",
            *FACTORS[factor]]
    if cfg["epochs"] is not None:
        argv += ["--epochs", str(cfg["epochs"])]
    if resume:
        argv.append("--resume")
    return argv + shlex.split(cfg["extra"])


def _cpu_seconds(subprocess_mode: bool) -> float:
    if subprocess_mode:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime
    return time.process_time()


def _train(argv: list[str], subprocess_mode: bool, run_dir: str) -> None:
    """One run; its CPU and wall seconds go to ``<run_dir>/time.json`` (a reused run keeps its own; a
    resumed one counts the part after resuming)."""
    cpu0, wall0 = _cpu_seconds(subprocess_mode), time.time()
    if subprocess_mode:
        subprocess.run([sys.executable, "-m", "fairseq_asam.vision", *argv], check=True)
    else:
        from fairseq_asam.vision.train import cli_main

        cli_main(argv)  # in-process: no interpreter + torch start-up per run
    spent = {"cpu_s": round(_cpu_seconds(subprocess_mode) - cpu0, 2), "wall_s": round(time.time() - wall0, 2)}
    with open(os.path.join(run_dir, "time.json"), "w") as f:
        json.dump(spent, f)


def _time(run_dir: str) -> dict:
    path = os.path.join(run_dir, "time.json")
    if not os.path.isfile(path):  # trained by a version of this script that did not time its runs
        return {"cpu_s": None, "wall_s": None}
    with open(path) as f:
        return json.load(f)


def run_all(cfg: dict, log=print) -> list[dict]:
    """Train (or reuse, or resume) every factor x rho x seed run; one result row per run."""
    rows = []
    for factor in cfg["factors"]:
        for rho in cfg["rhos"]:
            for seed in cfg["seeds"]:
                d = os.path.join(cfg["out"], run_dir_name(factor, rho, seed))
                status = run_status(d)
                if status == "done":
                    log(f"== {d}: done, reusing")
                else:
                    argv = train_argv(cfg, factor, rho, seed, d, resume=status == "partial")
                    log(f"== {d}: {'resuming' if status == 'partial' else 'training'}: asam-vision-train "
                        + " ".join(shlex.quote(a) for a in argv))
                    _train(argv, cfg["subprocess"], d)
                s = _summary(d)
                if s is None or s["epochs_done"] != s["epochs"]:
                    raise RuntimeError(f"{d} did not finish (see {d}/train.log)")
                with open(os.path.join(d, "args.json")) as f:
                    a = json.load(f)
                rows.append({"factor": factor, "normalization": a["normalization"], "p": a["p"],
                             "normalize_bias": a["normalize_bias"], "rho": rho, "seed": seed,
                             "best_test_acc": s["best_test_acc"], "final_test_acc": s["final_test_acc"],
                             "epochs": s["epochs"], "model": a["model"], "dataset": a["dataset"], "run_dir": d,
                             **_time(d)})
    return rows


def aggregate(rows: list[dict], metric: str) -> dict:
    """{factor: [(rho, mean, std, n), ...]} over seeds, rho ascending (std 0 for one seed)."""
    cells: dict = {}
    for r in rows:
        cells.setdefault(r["factor"], {}).setdefault(r["rho"], []).append(float(r[metric]))
    out = {}
    for factor, by_rho in cells.items():
        out[factor] = [(rho, statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))
                       for rho, v in sorted(by_rho.items())]
    return out


def write_results(rows: list[dict], out: str) -> None:
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(rows, f, indent=2)
        f.write("\n")
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def markdown_table(agg: dict, rhos, metric: str) -> str:
    head = "| factor | " + " | ".join(f"rho={r:g}" for r in rhos) + " |"
    lines = [f"{metric} (%), mean ± std over seeds", "", head, "|" + "---|" * (len(rhos) + 1)]
    for factor, pts in agg.items():
        by = {rho: (m, s, n) for rho, m, s, n in pts}
        cells = ["-" if r not in by else f"{by[r][0]:.2f} (n=1)" if by[r][2] == 1 else f"{by[r][0]:.2f} ± {by[r][1]:.2f}"
                 for r in rhos]
        lines.append(f"| {LABELS.get(factor, factor)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(agg: dict, path: str, title: str, metric: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for factor, pts in agg.items():
        rho = [p[0] for p in pts]
        mean = [p[1] for p in pts]
        std = [p[2] for p in pts]
        ax.errorbar(rho, mean, yerr=std, marker="o", ms=4, capsize=3, label=LABELS.get(factor, factor))
    ax.set_xscale("log")
    ax.set_xlabel(r"$\rho$")
    ax.set_ylabel("test accuracy (%)" + (" (max over epochs)" if metric == "best_test_acc" else " (final)"))
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def results_document(cfg: dict, rows: list[dict], metric: str, data: str, provenance: dict) -> dict:
    """The committed form of a study (``--json``): provenance, the settings, every run and its time."""
    cpu = [r["cpu_s"] for r in rows]
    wall = [r["wall_s"] for r in rows]
    return {**provenance,
            "config": {k: cfg[k] for k in ("preset", "dataset", "model", "rhos", "seeds", "factors", "epochs", "extra")}
            | {"data": data, "metric": metric},
            # Summed over the runs; None when a reused run was trained before runs were timed.
            "cpu_seconds": None if None in cpu else round(sum(cpu), 1),
            "wall_seconds": None if None in wall else round(sum(wall), 1),
            "runs": rows}


def title(config: dict) -> str:
    epochs = f"{config['epochs']} epochs" if config["epochs"] is not None else "paper's epochs"
    return f"ASAM, {config['model']} on {config['data']}: {len(config['seeds'])} seeds, {epochs}"


def accuracy_markdown(doc: dict) -> str:
    """The table of a ``--json`` document, with its caption (docs/vision-figure4.md)."""
    c = doc["config"]
    what = "Maximum test accuracy (%) over the" if c["metric"] == "best_test_acc" else "Test accuracy (%) after the"
    table = markdown_table(aggregate(doc["runs"], c["metric"]), c["rhos"], c["metric"]).split("\n", 2)[2]
    return f"{what} {c['epochs']} epochs, mean ± std over {len(c['seeds'])} seeds:\n\n{table.rstrip()}"


def time_sentence(doc: dict) -> str:
    """How long the committed study took, and on what (docs/vision-figure4.md)."""
    m, n = doc["machine"], len(doc["runs"])
    threads = "one thread" if m["torch_threads"] == 1 else f"{m['torch_threads']} threads"
    return (f"Measured ({doc['date']}, {m['cpu']}, {threads}, torch {m['torch']}, commit {str(doc['commit'])[:10]}): "
            f"{doc['cpu_seconds']:.0f} s of CPU time for the {n} runs (about {doc['cpu_seconds'] / n:.0f} s per run) "
            f"and {doc['wall_seconds'] / 60:.0f} minutes of wall time; the runs got "
            f"{doc['cpu_seconds'] / doc['wall_seconds']:.0%} of a core, which other jobs shared.")


def _rho_list(text: str):
    vals = [float(v) for v in text.replace(",", " ").split()]
    bad = [v for v in vals if not (math.isfinite(v) and v > 0)]
    if not vals or bad:
        raise argparse.ArgumentTypeError(f"--rhos must be positive numbers, got {text!r}")
    return tuple(vals)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper",
                   help="paper: WRN-16-8 on CIFAR-10, the paper's rho grid, 3 seeds, 200 epochs; laptop: see the "
                   "module docstring. Any flag below overrides the preset's value")
    p.add_argument("--out", default=None, help="default: runs/figure4-<preset>")
    p.add_argument("--data-dir", default=None,
                   help="CIFAR data (default: data; laptop: <out>/data, written from sklearn's digits if missing)")
    p.add_argument("--dataset", choices=("cifar10", "cifar100"), default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--rhos", type=_rho_list, default=None, help="e.g. '0.01 0.1 1'")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--factors", nargs="+", choices=list(FACTORS), default=list(FACTORS))
    p.add_argument("--epochs", type=int, default=None, help="default: the paper's 200 (laptop: 6)")
    p.add_argument("--extra-args", default=None, help="more asam-vision-train flags, one string (e.g. '--amp bf16')")
    p.add_argument("--metric", choices=("best_test_acc", "final_test_acc"), default="best_test_acc",
                   help="best: maximum over epochs, as in the paper's tables")
    p.add_argument("--plot", default=None, help="the PNG (default <out>/figure4.png)")
    p.add_argument("--title", default=None, help="the plot's title (default: model, data, seeds, epochs)")
    p.add_argument("--json", default=None,
                   help="also write the runs with the commit, command, machine and date here (the laptop "
                   "preset's is docs/figure4-results.json)")
    p.add_argument("--from-json", default=None,
                   help="train nothing: print the table and draw --plot from a JSON that --json wrote")
    p.add_argument("--subprocess", action="store_true",
                   help="one `python -m fairseq_asam.vision` process per run (default: in this process)")
    return p


def resolve(a: argparse.Namespace) -> dict:
    pre = PRESETS[a.preset]
    out = a.out or os.path.join("runs", f"figure4-{a.preset}")
    cfg = {
        "preset": a.preset,
        "out": out,
        "dataset": a.dataset or pre["dataset"],
        "model": a.model or pre["model"],
        "rhos": a.rhos or pre["rhos"],
        "seeds": tuple(a.seeds) if a.seeds else pre["seeds"],
        "factors": a.factors,
        "epochs": a.epochs if a.epochs is not None else pre["epochs"],
        "extra": a.extra_args if a.extra_args is not None else pre["extra"],
        "data_dir": a.data_dir or (os.path.join(out, "data") if a.preset == "laptop" else "data"),
        "subprocess": a.subprocess,
    }
    if cfg["epochs"] is not None and cfg["epochs"] < 1:
        raise ValueError(f"--epochs must be >= 1, got {cfg['epochs']}")
    return cfg


def main(argv=None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.from_json is not None:
        if a.plot is None:
            parser.error("--from-json needs --plot, the PNG to draw")
        with open(a.from_json) as f:
            doc = json.load(f)
        c = doc["config"]
        print(markdown_table(aggregate(doc["runs"], c["metric"]), c["rhos"], c["metric"]))
        print(f"== plot {plot(aggregate(doc['runs'], c['metric']), a.plot, a.title or title(c), c['metric'])}")
        return 0
    try:
        cfg = resolve(a)
    except ValueError as e:
        parser.error(str(e))
    os.makedirs(cfg["out"], exist_ok=True)
    if cfg["preset"] == "laptop" and a.data_dir is None and \
            not os.path.isdir(os.path.join(cfg["data_dir"], "cifar-10-batches-py")):
        from fairseq_asam.vision.toydata import write_cifar_digits

        print(f"== writing sklearn's handwritten digits as CIFAR-10 into {write_cifar_digits(cfg['data_dir'])}")
    origin = None
    if a.json is not None:  # the commit the runs start from (the checkout may change while they train)
        from provenance import stamp, write_json  # scripts/, beside this file

        threads = os.environ.get("OMP_NUM_THREADS")
        origin = stamp(("" if threads is None else f"OMP_NUM_THREADS={threads} ") + "python scripts/figure4.py " +
                       shlex.join(argv if argv is not None else sys.argv[1:]))
    t0 = time.time()
    rows = run_all(cfg)
    write_results(rows, cfg["out"])
    agg = aggregate(rows, a.metric)
    table = markdown_table(agg, cfg["rhos"], a.metric)
    with open(os.path.join(cfg["out"], "figure4.md"), "w") as f:
        f.write(table)
    data = "sklearn digits as CIFAR-10" if cfg["preset"] == "laptop" and a.data_dir is None else cfg["dataset"]
    if a.json is not None:
        write_json(results_document(cfg, rows, a.metric, data, origin), a.json)
    png = plot(agg, a.plot or os.path.join(cfg["out"], "figure4.png"),
               a.title or title({"model": cfg["model"], "data": data, "seeds": cfg["seeds"], "epochs": cfg["epochs"]}),
               a.metric)
    print(table)
    print(f"== {len(rows)} runs; results in {cfg['out']}/results.csv{'' if a.json is None else ' and ' + a.json}; "
          f"plot {png}; {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
