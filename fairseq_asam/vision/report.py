"""Tables and curves for asam-vision-train runs: the paper's Tables 2/3/6 layout and test-accuracy plots.

A run directory holds summary.json, metrics.json and args.json (written by asam-vision-train). The
table has one row per (dataset, model[, label noise]) and one column per minimizer, each cell the
mean +- standard deviation over seeds of the maximum test accuracy, as in the paper's tables.

    python -m fairseq_asam.vision.report runs/cifar/*/ --markdown summary.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

__all__ = ["collect", "format_table", "plot_runs", "table"]

_ORDER = ("sgd", "sam", "asam")


def _load(run_dir: str, name: str):
    path = os.path.join(run_dir, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir} has no {name}: is it an asam-vision-train run directory?")
    with open(path) as f:
        return json.load(f)


def collect(run_dirs) -> list[dict]:
    """The summary.json of each run (best accuracy = max over epochs, as in the paper's tables)."""
    out = []
    for d in run_dirs:
        s = _load(d, "summary.json")
        s["run_dir"] = d
        out.append(s)
    return out


def table(summaries: list[dict], key: str = "best_test_acc") -> tuple[list[str], list[list[str]]]:
    """(header, rows): rows per (dataset, model, label noise), columns sgd/sam/asam: 'mean +- std (n)'."""
    cells: dict = {}
    for s in summaries:
        row = (s["dataset"], s["model"], float(s.get("label_noise") or 0.0))
        cells.setdefault(row, {}).setdefault(s["minimizer"], []).append(float(s[key]))
    mins = [m for m in _ORDER if any(m in c for c in cells.values())]
    noise = any(r[2] for r in cells)
    header = ["dataset", "model"] + (["noise"] if noise else []) + mins
    rows = []
    for r in sorted(cells):
        line = [r[0], r[1]] + ([f"{100 * r[2]:.0f}%"] if noise else [])
        for m in mins:
            v = cells[r].get(m)
            if not v:
                line.append("-")
            elif len(v) == 1:
                line.append(f"{v[0]:.2f} (n=1)")
            else:
                line.append(f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f} (n={len(v)})")
        rows.append(line)
    return header, rows


def format_table(header, rows, markdown: bool = True) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*r) for r in [header] + rows)


def plot_runs(run_dirs, out_png: str, metric: str = "test_acc", labels=None, title: str | None = None) -> str:
    """Draw ``metric`` (a metrics.json column, e.g. test_acc, train_loss) per epoch for several runs."""
    import logging

    # Importing fairseq (via fairseq_asam) can leave the root logger at DEBUG: keep matplotlib's font search quiet.
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} runs")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, d in enumerate(run_dirs):
        hist = _load(d, "metrics.json")
        if not hist or metric not in hist[0]:
            raise ValueError(f"{d}/metrics.json has no column {metric!r}")
        if labels is not None:
            lab = labels[i]
        else:
            a = _load(d, "args.json")
            lab = f"{a['model']} {a['minimizer'].upper()} s{a['seed']}"
        ys = [h[metric] for h in hist]
        ax.plot([h["epoch"] for h in hist], ys, label=lab)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric.replace("_", " ") + (" (%)" if "acc" in metric or "top5" in metric else ""))
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    tmp = out_png + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, out_png)
    return out_png


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Summary table (mean ± std of max test accuracy over seeds)")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--key", default="best_test_acc", choices=("best_test_acc", "final_test_acc", "best_test_top5"))
    p.add_argument("--markdown", metavar="FILE", default=None, help="also write the table to FILE (markdown)")
    a = p.parse_args(argv)
    try:
        header, rows = table(collect(a.run_dirs), a.key)
    except (FileNotFoundError, KeyError, ValueError) as e:
        p.error(str(e))
    print(format_table(header, rows, markdown=False))
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(format_table(header, rows) + "\n")


if __name__ == "__main__":
    main()
