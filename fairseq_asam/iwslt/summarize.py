"""Table 5 of the paper from finished runs: BLEU of Adam / Adam+SAM / Adam+ASAM, mean +- std over seeds.

Reads every ``run.json`` + ``eval.json`` (from train-iwslt14.sh and evaluate-iwslt14.sh) under the
given folders and writes, into ``--out``:

- ``table5.md``: the paper's layout (rows Validation / Test, columns Adam, Adam+SAM, Adam+ASAM, and
  Adam+ASAM one-pass where such runs exist) for tokenized BLEU (the paper's metric) and for
  detokenized sacreBLEU; the std is the sample standard deviation over seeds (n-1), "n/a" with a
  single seed. Between the two, what each method's update costs and, where a run holds a
  ``sharpness.json`` (``asam-sharpness``'s report, as ``make demo`` writes it), the adaptive sharpness
  (Eq. 4) of its checkpoint: see :func:`read_update_cost`;
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
import statistics
import sys
from pathlib import Path

__all__ = ["collect_runs", "grid_table", "mean_std", "read_update_cost", "read_valid_log", "table5", "write_summary"]

METHOD_ORDER = ("adam", "sam", "asam", "asam-onepass")
METHOD_LABEL = {"adam": "Adam", "sam": "Adam+SAM", "asam": "Adam+ASAM", "asam-onepass": "Adam+ASAM one-pass"}
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
            sharp = d / "sharpness.json"
            runs.append({"dir": d, "method": method, "seed": meta.get("seed", res.get("seed")),
                         "rho": meta.get("rho", res.get("rho")), "eval": res,
                         "cost": read_update_cost(d / "train.log"),
                         "sharpness": json.loads(sharp.read_text()) if sharp.exists() else None})
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


def _cell(values: list[float], digits: int = 2) -> str:
    if not values:
        return "-"
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if s is not None else f"{m:.{digits}f} ± n/a"


def _csv_row(metric: str, split: str, method: str, vals: list[float], seeds: list, digits: int = 2) -> dict:
    mean, std = mean_std(vals)
    return {"metric": metric, "split": split, "method": method, "n": len(vals),
            "mean": round(mean, digits + 2), "std": "" if std is None else round(std, digits + 2),
            "values": " ".join(f"{v:.{digits}f}" for v in vals), "seeds": " ".join(str(s) for s in seeds)}


def _cost_table(runs: list[dict], methods: list[str]) -> tuple[list[str], list[dict]]:
    """What each method's update costs (passes, ms per update, ratio to Adam) and the adaptive sharpness of
    its evaluated checkpoint, as markdown lines and CSV rows; empty where no run has the numbers."""
    def values(m, get):
        got = [(get(r), r["seed"]) for r in runs if r["method"] == m]
        return [v for v, _ in got if v is not None], [s for v, s in got if v is not None]

    lines, rows, body = [], [], []
    passes = {m: values(m, lambda r: r["cost"] and r["cost"]["passes_per_update"]) for m in methods}
    ms = {m: values(m, lambda r: r["cost"] and r["cost"]["seconds_per_update"] * 1000) for m in methods}
    sharp = {m: values(m, lambda r: r["sharpness"] and r["sharpness"]["value"]) for m in methods}
    if any(v for v, _ in ms.values()):
        body.append("| Passes per update | " + " | ".join(f"{mean_std(passes[m][0])[0]:g}" if passes[m][0] else "-"
                                                         for m in methods) + " |")
        body.append("| ms per update | " + " | ".join(_cell(ms[m][0], 1) for m in methods) + " |")
        base = mean_std(ms["adam"][0])[0] if ms.get("adam", ([], []))[0] else None
        if base:
            body.append("| Cost / Adam's | " + " | ".join(f"{mean_std(ms[m][0])[0] / base:.2f}x" if ms[m][0] else "-"
                                                         for m in methods) + " |")
        for m in methods:
            if ms[m][0]:
                rows.append(_csv_row("passes_per_update", "train", m, *passes[m], digits=3))
                rows.append(_csv_row("ms_per_update", "train", m, *ms[m], digits=2))
    if any(v for v, _ in sharp.values()):
        body.append("| Adaptive sharpness (Eq. 4) | " + " | ".join(_cell(sharp[m][0], 4) for m in methods) + " |")
        for m in methods:
            if sharp[m][0]:
                rows.append(_csv_row("adaptive_sharpness", "train", m, *sharp[m], digits=6))
    if not body:
        return [], []
    lines.append("Update cost and adaptive sharpness, mean ± std over seeds")
    lines.append("")
    lines.append("| | " + " | ".join(METHOD_LABEL[m] for m in methods) + " |")
    lines.append("|---|" + "---|" * len(methods))
    lines += body
    lines.append("")
    lines.append("Passes: forward/backward passes per update (1 + the fraction of updates that ran the second pass, "
                 "from the log). ms per update: fairseq's update alone (median over the logged intervals without "
                 "a validation or checkpoint), on whatever else the machine was running.")
    reports = [r["sharpness"] for r in runs if r["sharpness"]]
    if reports:
        s0 = reports[0]
        same = all((x["rho"], x["steps"], x["num_batches"], x["split"]) == (s0["rho"], s0["steps"], s0["num_batches"],
                                                                          s0["split"]) for x in reports)
        lines.append(f"Adaptive sharpness: max L(w + eps) - L(w) over ||T_w^-1 eps||_{s0['p']} <= {s0['rho']:g} "
                     f"(eta {s0['eta']:g}; {s0['steps']} ascent steps; L: {s0.get('criterion')}, "
                     f"{s0.get('loss_unit')}) on {s0['num_batches']} {s0['split']} batches, measured by "
                     f"asam-sharpness on {Path(s0['checkpoint']).name}"
                     + ("" if same else " (settings differ between runs: see each run's sharpness.json)") + ".")
    lines.append("")
    return lines, rows


def table5(runs: list[dict]) -> tuple[str, list[dict]]:
    """The markdown tables and the CSV rows."""
    methods = [m for m in METHOD_ORDER if any(r["method"] == m for r in runs)]
    md, rows = [], []
    for i, (metric, title) in enumerate(METRICS):
        if i == 1:  # the cost and sharpness next to the paper's metric, before the detokenized BLEU
            lines, cost_rows = _cost_table(runs, methods)
            md += lines
            rows += cost_rows
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
                    rows.append(_csv_row(metric, split, m, vals, seeds))
            md.append(f"| {label} | " + " | ".join(cells) + " |")
        md.append("")
    return "\n".join(md), rows


def read_valid_log(log: Path) -> list[dict]:
    """(num_updates, epoch, valid_loss, valid_bleu) of each validation in fairseq's JSON log; a resumed run's
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
        points[u] = {"update": u, "epoch": int(rec["epoch"]) if "epoch" in rec else None,
                     "loss": float(rec["valid_loss"]), "bleu": float(rec["valid_bleu"]) if "valid_bleu" in rec else None}
    return [points[u] for u in sorted(points)]


def _json_records(log: Path):
    for line in Path(log).read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            yield rec


def read_update_cost(log: Path) -> dict | None:
    """Seconds and forward/backward passes per update of one run, from fairseq's JSON log (``train.log``).

    fairseq rounds its ``train_wall`` to whole seconds, too coarse for one update; its ``ups`` (updates
    per second, two decimals) of each ``train_inner`` interval (``--log-interval`` updates) is precise
    but also holds whatever ran between the updates. So: the median over the intervals of 1 / ups,
    leaving out the first (start-up) and every interval in which a validation (and the checkpoint saved
    with it) ran; fairseq runs those after logging the update they follow, so they fall in the next
    interval. Passes: 1 + ``second_pass_frac`` (logged by asam_adam / sam_adam; 0 for one-pass policies)
    of the last interval; 1 for a run without it (plain Adam). None if the log has no interval to use.
    """
    log = Path(log)
    if not log.exists():
        return None
    inner: dict[int, dict] = {}
    valid_at: set[int] = set()
    for rec in _json_records(log):
        if "valid_num_updates" in rec:
            valid_at.add(int(float(rec["valid_num_updates"])))
        elif "num_updates" in rec and "ups" in rec:
            inner[int(float(rec["num_updates"]))] = rec  # a resumed run's repeated records: the last one
    seconds, prev = [], None
    for u in sorted(inner):
        clean = prev is not None and not any(prev <= v < u for v in valid_at)
        ups = float(inner[u]["ups"])
        if clean and ups > 0:
            seconds.append(1.0 / ups)
        prev = u
    if not seconds:
        return None
    last = inner[max(inner)]
    return {"seconds_per_update": statistics.median(seconds), "intervals": len(seconds),
            "passes_per_update": round(1.0 + float(last.get("second_pass_frac", 0.0)), 3)}


def plot_curves(runs: list[dict], out: Path) -> None:
    import logging

    import matplotlib

    # fairseq's logging setup leaves the root logger at a level where matplotlib's font search floods the output.
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"adam": "tab:blue", "sam": "tab:orange", "asam": "tab:green", "asam-onepass": "tab:purple"}
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
