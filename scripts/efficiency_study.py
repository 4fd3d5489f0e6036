#!/usr/bin/env python
"""The efficiency study of docs/efficiency.md: SGD, full ASAM and every cheaper schedule on two small
real-data CPU tasks (scikit-learn's digits: an MLP, and in the CIFAR format through the vision entry
point's update with a small conv net), each clean and with 40% label noise, 5 paired seeds.
The code is studies/efficiency.py; this is its command line.

    python scripts/efficiency_study.py --out study-out --plot docs/img/efficiency.png   # ~15-25 min on 1 core
    python scripts/efficiency_study.py --quick --out /tmp/q                           # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from studies import efficiency as E  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="study-out", help="folder for results.json and table.md")
    ap.add_argument("--plot", default=None, help="where the plot goes (default: <out>/efficiency.png)")
    ap.add_argument("--seeds", type=int, default=5, help="paired seeds 0..N-1 (default 5)")
    ap.add_argument("--quick", action="store_true", help="2 seeds, 6 methods, 1 epoch, noisy only: checks the machinery")
    ap.add_argument("--no-heldout", action="store_true", help="skip the held-out check of the recommended setting")
    ap.add_argument("--tasks", default=",".join(E.TASKS), help=f"comma-separated subset of {list(E.TASKS)}")
    ap.add_argument("--runs-from", nargs="+", default=None, metavar="RESULTS_JSON",
                    help="summarize the runs of earlier invocations (e.g. one per task, run side by side) "
                    "instead of training them again")
    a = ap.parse_args(argv)
    if a.seeds < 2:
        ap.error(f"--seeds must be >= 2 (a paired std needs two), got {a.seeds}")
    tasks = [t for t in a.tasks.split(",") if t]
    if not tasks or any(t not in E.TASKS for t in tasks):
        ap.error(f"--tasks must be a comma-separated subset of {list(E.TASKS)}, got {a.tasks!r}")
    os.makedirs(a.out, exist_ok=True)
    t0 = time.time()
    methods = [m for m in E.METHODS if m.name in E.QUICK_METHODS] if a.quick else E.METHODS
    if a.runs_from:
        runs = []
        for path in a.runs_from:
            with open(path) as f:
                runs += json.load(f)["runs"]
        tasks = sorted({r["task"] for r in runs})
    elif a.quick:
        runs = E.run_study(tasks=tasks, noises=(0.4,), seeds=range(2), methods=methods, epochs=1)
    else:
        runs = E.run_study(tasks=tasks, seeds=range(a.seeds), methods=methods)
    summary = E.summarize(runs)
    rec = E.recommend(summary)
    result = {"runs": runs, "summary": summary, "recommendation": rec,
              "methods": [{"name": m.name, "options": m.options, "rho_scale": m.rho_scale} for m in methods],
              "tasks": {k: vars(v) for k, v in E.TASKS.items()}}
    table = E.markdown(summary, rec)
    if rec and not a.no_heldout:
        # A variant the study did not see: 20% noise and seeds 100.. (quick: 1 epoch, 2 seeds).
        chosen = [m for m in methods if m.name in ("sgd", "asam", rec["method"])]
        held = E.run_study(tasks=tasks, noises=(0.2,), seeds=range(100, 102 if a.quick else 100 + a.seeds), methods=chosen,
                           epochs=1 if a.quick else None)
        hsum = E.summarize(held)
        result["heldout"] = {"runs": held, "summary": hsum}
        table += "\n### Held-out check (20% noise, seeds 100+, not in the study)\n\n" + E.markdown(hsum)
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write(table)
    E.write_json(result, os.path.join(a.out, "results.json"))
    E.plot(summary, a.plot or os.path.join(a.out, "efficiency.png"))
    print(table)
    print(f"[study] done in {(time.time() - t0) / 60:.1f} min; wrote {a.out}/table.md, results.json and the plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
