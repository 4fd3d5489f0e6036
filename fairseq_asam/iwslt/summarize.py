"""Table 5 of the paper from finished runs: BLEU of Adam / Adam+SAM / Adam+ASAM, mean +- std over seeds.

Reads every ``run.json`` + ``eval.json`` (from train-iwslt14.sh and evaluate-iwslt14.sh) under the
given folders and writes, into ``--out``:

- ``table5.md``: the paper's layout (rows Validation / Test, columns Adam, Adam+SAM, Adam+ASAM) for
  tokenized BLEU (the paper's metric) and for detokenized sacreBLEU; the std is the sample standard
  deviation over seeds (n-1), "n/a" with a single seed;
- ``table5.csv``: one row per split, metric and method with n, mean, std and the per-seed values;
- ``curves.png``: validation loss and validation BLEU per update for each run (from fairseq's JSON
  log, ``train.log``), coloured by method.

``--grid`` instead ranks the rho values of a grid search (grid-search-rho.sh) by validation BLEU and
writes ``grid.md``/``grid.json`` with the best rho per method (paper Section 5.3)::

    python scripts/summarize.py runs/iwslt14 --out runs/iwslt14
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from pathlib import Path

__all__ = ["collect_runs", "grid_table", "mean_std", "read_valid_log", "table5", "write_summary"]

METHOD_ORDER = ("adam", "sam", "asam")
METHOD_LABEL = {"adam": "Adam", "sam": "Adam+SAM", "asam": "Adam+ASAM"}
SPLITS = (("valid", "Validation"), ("test", "Test"))
METRICS = (("bleu_tokenized", "tokenized BLEU (fairseq-generate BLEU4, as in the paper)"),
           ("bleu_detok", "detokenized sacreBLEU"))


def collect_runs(roots) -> list[dict]:
    """Every evaluated run under ``roots``: run.json merged with eval.json, plus the run's folder."""
    runs = []
    for root in roots:
        root = Path(root)
        for ev in sorted(root.rglob("eval.json")):
            d = ev.parent
            meta_file = d / "run.json"
            meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
            res = json.loads(ev.read_text())
            method = meta.get("method") or res.get("method")
            if method not in METHOD_ORDER:
                continue
            runs.append({"dir": d, "method": method, "seed": meta.get("seed", res.get("seed")),
                         "rho": meta.get("rho", res.get("rho")), "eval": res})
    return runs


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    m = sum(values) / n
    if n == 1:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    m, s = mean_std(values)
    return f"{m:.2f} ± {s:.2f}" if s is not None else f"{m:.2f} ± n/a"


def table5(runs: list[dict]) -> tuple[str, list[dict]]:
    """The markdown tables and the CSV rows."""
    methods = [m for m in METHOD_ORDER if any(r["method"] == m for r in runs)]
    md, rows = [], []
    for metric, title in METRICS:
        n_seeds = {m: len([r for r in runs if r["method"] == m]) for m in methods}
        md.append(f"{title}, mean ± std over seeds (" + ", ".join(f"{METHOD_LABEL[m]} n={n_seeds[m]}" for m in methods) + ")")
        md.append("")
        md.append("| BLEU score | " + " | ".join(METHOD_LABEL[m] for m in methods) + " |")
        md.append("|---|" + "---|" * len(methods))
        for split, label in SPLITS:
            cells = []
            for m in methods:
                vals = [r["eval"][split][metric] for r in runs if r["method"] == m and split in r["eval"]]
                seeds = [r["seed"] for r in runs if r["method"] == m and split in r["eval"]]
                cells.append(_cell(vals))
                if vals:
                    mean, std = mean_std(vals)
                    rows.append({"metric": metric, "split": split, "method": m, "n": len(vals),
                                 "mean": round(mean, 4), "std": "" if std is None else round(std, 4),
                                 "values": " ".join(f"{v:.2f}" for v in vals),
                                 "seeds": " ".join(str(s) for s in seeds)})
            md.append(f"| {label} | " + " | ".join(cells) + " |")
        md.append("")
    return "\n".join(md), rows


def read_valid_log(log: Path) -> list[dict]:
    """(num_updates, valid_loss, valid_bleu) of each validation in fairseq's JSON log; a resumed run's
    repeated validations keep the last entry per update."""
    points: dict[int, dict] = {}
    if not Path(log).exists():
        return []
    for line in Path(log).read_text(encoding="utf-8", errors="replace").splitlines():
        # --log-file holds bare JSON records; fairseq's stdout prefixes them with "... | valid | ".
        if "valid_num_updates" not in line:
            continue
        try:
            rec = json.loads(line.split("| valid |", 1)[-1].strip())
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict) or "valid_num_updates" not in rec:
            continue
        u = int(float(rec["valid_num_updates"]))
        points[u] = {"update": u, "loss": float(rec["valid_loss"]),
                     "bleu": float(rec["valid_bleu"]) if "valid_bleu" in rec else None}
    return [points[u] for u in sorted(points)]


def plot_curves(runs: list[dict], out: Path) -> None:
    import logging

    import matplotlib

    # fairseq's logging setup leaves the root logger at a level where matplotlib's font search floods the output.
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"adam": "tab:blue", "sam": "tab:orange", "asam": "tab:green"}
    fig, (ax_loss, ax_bleu) = plt.subplots(1, 2, figsize=(11, 4))
    labelled = set()
    for r in sorted(runs, key=lambda r: (METHOD_ORDER.index(r["method"]), str(r["seed"]))):
        pts = read_valid_log(r["dir"] / "train.log")
        if not pts:
            continue
        label = None if r["method"] in labelled else METHOD_LABEL[r["method"]]
        labelled.add(r["method"])
        u = [p["update"] for p in pts]
        ax_loss.plot(u, [p["loss"] for p in pts], marker="o", ms=3, color=colors[r["method"]], label=label)
        b = [(p["update"], p["bleu"]) for p in pts if p["bleu"] is not None]
        if b:
            ax_bleu.plot([x for x, _ in b], [y for _, y in b], marker="o", ms=3, color=colors[r["method"]], label=label)
    ax_loss.set(xlabel="update", ylabel="validation loss (label-smoothed, base 2)", title="Validation loss")
    ax_bleu.set(xlabel="update", ylabel="validation BLEU (--eval-bleu, detok.)", title="Validation BLEU")
    for ax in (ax_loss, ax_bleu):
        ax.grid(alpha=0.3)
        if labelled:
            ax.legend()
    fig.tight_layout()
    tmp = out.with_name(f"{out.stem}.tmp-{os.getpid()}{out.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_summary(roots, out: Path, *, plot: bool = True) -> dict:
    runs = collect_runs(roots)
    if not runs:
        raise ValueError(f"no evaluated runs (run.json + eval.json) under {', '.join(map(str, roots))}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md, rows = table5(runs)
    _atomic_write(out / "table5.md", "Table 5 layout (Kwon et al., 2021): BLEU on IWSLT'14 DE-EN style data\n\n" + md)
    fields = ["metric", "split", "method", "n", "mean", "std", "values", "seeds"]
    tmp = out / f"table5.csv.tmp-{os.getpid()}"
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, out / "table5.csv")
    if plot:
        plot_curves(runs, out / "curves.png")
    return {"markdown": md, "rows": rows, "runs": runs}


def grid_table(runs: list[dict]) -> tuple[str, dict]:
    """Validation BLEU per (method, rho), mean over seeds; the best rho per method (ties: the smaller rho)."""
    by: dict = {}
    for r in runs:
        if r["method"] == "adam" or r["rho"] is None or "valid" not in r["eval"]:
            continue
        by.setdefault(r["method"], {}).setdefault(float(r["rho"]), []).append(r["eval"]["valid"]["bleu_tokenized"])
    if not by:
        raise ValueError("no evaluated sam/asam runs with a rho in the grid folder")
    best, lines = {}, ["| method | rho | validation BLEU (mean) | seeds |", "|---|---|---|---|"]
    for m in [m for m in METHOD_ORDER if m in by]:
        means = {rho: sum(v) / len(v) for rho, v in by[m].items()}
        top = max(sorted(means), key=lambda rho: means[rho])
        best[m] = {"rho": top, "valid_bleu": round(means[top], 4)}
        for rho in sorted(means):
            mark = " **best**" if rho == top else ""
            lines.append(f"| {METHOD_LABEL[m]} | {rho:g} | {means[rho]:.2f}{mark} | {len(by[m][rho])} |")
    return "\n".join(lines) + "\n", best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="asam-iwslt-summarize",
                                 description="Table 5 (markdown + CSV) and validation curves from IWSLT'14 runs.")
    ap.add_argument("roots", nargs="+", type=Path, help="folders holding run directories (searched recursively)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: the first root)")
    ap.add_argument("--no-plot", action="store_true", help="skip curves.png")
    ap.add_argument("--grid", action="store_true", help="rank a rho grid search by validation BLEU instead")
    args = ap.parse_args(argv)
    missing = [str(r) for r in args.roots if not r.is_dir()]
    if missing:
        ap.error(f"no such folder: {', '.join(missing)}")
    out = args.out or args.roots[0]
    try:
        if args.grid:
            md, best = grid_table(collect_runs(args.roots))
            out.mkdir(parents=True, exist_ok=True)
            _atomic_write(out / "grid.md", md)
            _atomic_write(out / "grid.json", json.dumps(best, indent=1) + "\n")
            print(md)
            print("best rho: " + ", ".join(f"{METHOD_LABEL[m]} {b['rho']:g}" for m, b in best.items()))
        else:
            res = write_summary(args.roots, out, plot=not args.no_plot)
            print(res["markdown"])
            print(f"wrote {out / 'table5.md'}, {out / 'table5.csv'}" + ("" if args.no_plot else f", {out / 'curves.png'}"))
    except ValueError as e:
        print(f"asam-iwslt-summarize: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
