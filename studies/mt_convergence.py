"""Issue 19, items 6 and 4 (translation): Adam, full ASAM and one-pass ASAM trained to convergence (fairseq's
early stopping on validation loss) on a small, noisy training set, each read at its best checkpoint and with
fairseq-style checkpoint averaging.

Data: the demo grammar (``studies/demo_corpus.py``, synthetic German-English, not natural text) through the
project's IWSLT'14 preparation (``fairseq_asam.iwslt.prepare``: tokenize, clean, BPE, binarize). A fraction
of the English training targets is replaced by other training sentences' English (a cyclic shift among the
chosen pairs: a misaligned crawled corpus); the cleaning step's length-ratio filter drops some of the
swapped pairs, and the JSON records how many noisy pairs remain. Validation and test are clean: the
recipe's dev sets (dev2010 + tedx.dev2012) are the validation set and its test sets (tst2010-2012) the
test set, re-binarized with the prepared dictionaries (:func:`build_data`); the recipe's own valid split
(every 23rd training pair, as noisy as training) is not used.

Model and optimizer: the demo's Transformer (``studies.demo_corpus.DEMO_TRAIN_ARGS``: 64-dim, 2+2 layers) with
``fairseq_asam.iwslt.train.fairseq_train_args`` (Adam betas 0.9/0.98, inverse_sqrt, wd 1e-4, label
smoothing 0.1). Convergence as a fairseq user gets it (:func:`train_args`): a validation every
--validate-interval epochs on the validation loss (fairseq's default --best-checkpoint-metric), early
stopping after --patience validations without a lower loss (fairseq's --patience), --max-epoch as a cap only;
the JSON keeps each run's validation curve, its best and its stop epoch, and whether it stopped early.
Every method is read at ``checkpoint_best.pt`` (lowest validation loss); the "+avg" rows average the
:data:`AVG_N` epoch checkpoints up to and including the best epoch (:func:`average_checkpoints`, the
arithmetic of fairseq's ``scripts/average_checkpoints.py --num-epoch-checkpoints N --checkpoint-upper-bound
<best epoch>``: parameters summed in fp32 and divided by N, everything else from the first file).

Methods (:data:`METHODS`): ``adam``; ``asam`` (``--optimizer asam_adam``, the two-pass update);
``onepass`` (``asam_adam --asam-one-pass momentum``: one pass per update, perturbed along Adam's first
moment). rho for the two ASAM methods comes from :data:`RHO_GRID`, chosen by mean validation BLEU (beam 5,
tokenized, best checkpoint) over the grid seeds, never the test set (:func:`choose_rho`); the other seeds
run at the chosen rho only, and the "+avg" rows average the checkpoints of the same runs. Power check:
full ASAM's gain over Adam per seed (paired), SE = paired std / sqrt(seeds), and gain / SE
(:func:`paired`); under 3 SE the task is reported as not powered.

Command (docs/efficiency.md, "Translation", gives the numbers and timings)::

    PYTHONPATH=. OMP_NUM_THREADS=1 nice -n 19 python -m studies.mt_convergence --out mt-out --jobs 2 \\
        --json docs/efficiency-mt.json
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from fairseq_asam.iwslt import evaluate, prepare, train
from fairseq_asam.iwslt.summarize import read_valid_log
from studies import demo_corpus
from studies.demo_corpus import DEMO_BPE_TOKENS, DEMO_TRAIN_ARGS, pack_archive

# method -> (train.py's method, extra fairseq-train flags, passes per update)
METHODS = {
    "adam": ("adam", [], 1.0),
    "asam": ("asam", [], 2.0),
    "onepass": ("asam", ["--asam-one-pass", "momentum"], 1.0),
}
# The paper's 0.2 for IWSLT'14 and smaller ones, then 0.5: on the first grid seed 0.2 was the grid's top
RHO_GRID = (0.05, 0.1, 0.2, 0.5)
AVG_N = 5  # epoch checkpoints averaged (--avg), 5 as in fairseq's translation examples
# Sized from a pilot (seed 1, a validation every epoch, no stop for 120 epochs): Adam's validation loss falls
# until about epoch 400 and then moves within 2% of its minimum (epoch 517 of 637); full ASAM (rho 0.2) is
# on the same plateau by epoch 450. 50 epochs without a lower loss would have stopped Adam at epoch 480
# (best 430, 0.7% above the pilot's minimum); the cap, twice the plateau's start, only guards.
PATIENCE = 50
MAX_EPOCH = 1000
PLATEAU_WINDOW = PATIENCE  # epochs either side of the first best that the plateau check compares
N_DEV_SETS = 2  # the first two of prepare.TEST_SETS (dev2010, tedx.dev2012) validate; the rest test


def write_noisy_corpus(out: Path, *, n_train: int, n_test_per_set: int, noise: float, seed: int = 1234) -> tuple[Path, int]:
    """demo_corpus.write_corpus, then round(noise * n_train) English training targets swapped among themselves.

    Returns (the folder holding de-en/, the number of swapped pairs)."""
    if not 0 <= noise < 1:
        raise ValueError(f"--noise must be in [0, 1), got {noise}")
    d = demo_corpus.write_corpus(out, n_train=n_train, n_test_per_set=n_test_per_set, seed=seed)
    pairs = demo_corpus.generate_pairs(n_train, seed)
    idx = random.Random(seed + 1).sample(range(n_train), round(noise * n_train))
    en = [p[1] for p in pairs]
    for i, j in zip(idx, idx[1:] + idx[:1]):  # a cyclic shift: every chosen target goes to another chosen source
        en[i] = pairs[j][1]
    noisy = [(p[0], e) for p, e in zip(pairs, en)]
    demo_corpus._write(d / "train.tags.de-en.en", demo_corpus.train_tags_lines(noisy, "en", 100))
    return d.parent, sum(a != b for a, b in zip(en, (p[1] for p in pairs)))


def build_data(out: Path, *, n_train: int, n_test_per_set: int, noise: float, log=print) -> dict:
    """The noisy corpus through prepare.prepare, then valid = dev sets, test = test sets; returns the counts."""
    out = Path(out)
    dest = out / "data-bin"
    if (dest / "study-data.json").exists():
        return json.loads((dest / "study-data.json").read_text())
    corpus, swapped = write_noisy_corpus(out / "corpus", n_train=n_train, n_test_per_set=n_test_per_set, noise=noise)
    tgz = pack_archive(corpus, out / "de-en.tgz")
    counts = prepare.prepare(tgz, dest=out / "prep-bin", work=out / "prep", bpe_tokens=DEMO_BPE_TOKENS, workers=1,
                             log=lambda m: log(f"  {m}"))
    tok, split = out / "prep" / "tokenized", out / "split"
    split.mkdir(parents=True, exist_ok=True)
    n_dev = N_DEV_SETS * n_test_per_set
    for lang in ("de", "en"):
        lines = (tok / f"test.{lang}").read_text(encoding="utf-8").splitlines(keepends=True)
        (split / f"valid.{lang}").write_text("".join(lines[:n_dev]), encoding="utf-8")
        (split / f"test.{lang}").write_text("".join(lines[n_dev:]), encoding="utf-8")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "fairseq_cli.preprocess", "--source-lang", "de", "--target-lang", "en",
           "--trainpref", str(tok / "train"), "--validpref", str(split / "valid"), "--testpref", str(split / "test"),
           "--srcdict", str(out / "prep-bin" / "dict.de.txt"), "--tgtdict", str(out / "prep-bin" / "dict.en.txt"),
           "--destdir", str(tmp), "--workers", "1"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"fairseq-preprocess failed:\n{p.stderr[-3000:]}")
    shutil.copy(out / "prep-bin" / "prep-info.json", tmp / "prep-info.json")
    # The cleaning step never drops a clean pair of this grammar; every dropped pair is a swapped one.
    dropped = counts["clean"]["read"] - counts["clean"]["kept"]
    info = {"n_train_generated": n_train, "noise": noise, "swapped": swapped, "swapped_dropped_by_cleaning": dropped,
            "train_pairs": counts["splits"]["train"], "recipe_valid_pairs_unused": counts["splits"]["valid"],
            "noisy_fraction_after_cleaning": round((swapped - dropped) / counts["clean"]["kept"], 4),
            "valid_pairs": n_dev, "test_pairs": (len(prepare.TEST_SETS) - N_DEV_SETS) * n_test_per_set,
            "valid_sets": list(prepare.TEST_SETS[:N_DEV_SETS]), "test_sets": list(prepare.TEST_SETS[N_DEV_SETS:])}
    (tmp / "study-data.json").write_text(json.dumps(info, indent=1) + "\n")
    os.replace(tmp, dest)
    return info


def train_args(method: str, seed: int, *, data: Path, run_dir: Path, rho: float | None, max_epoch: int,
               patience: int, validate_interval: int, dropout: float, avg_n: int = AVG_N,
               extra: list[str] = ()) -> list[str]:
    """fairseq-train's arguments: train.py's settings and the demo's model; a validation (loss only, no
    --eval-bleu: the best checkpoint and early stopping follow the validation loss) and an epoch checkpoint
    every ``validate_interval`` epochs, early stopping after ``patience`` validations without a lower loss,
    ``max_epoch`` as a cap."""
    base, flags, _ = METHODS[method]
    # The run stops `patience` checkpoints after its best one: keeping patience + avg_n of them keeps the
    # avg_n up to the best (what "+avg" averages).
    sched = ["--max-epoch", str(max_epoch), "--patience", str(patience), "--validate-interval", str(validate_interval),
             "--save-interval", str(validate_interval), "--keep-last-epochs", str(patience + avg_n),
             "--dropout", str(dropout), "--log-interval", "50"]
    args = train.fairseq_train_args(base, seed, data=data, run_dir=run_dir, rho=rho, max_update=10**9, eval_bleu=False,
                                    extra=[*DEMO_TRAIN_ARGS, *sched, *flags, *extra], cuda=False)
    # train.py's runs keep no epoch checkpoints; averaging needs them (fairseq's --num-epoch-checkpoints).
    return [a for a in args if a != "--no-epoch-checkpoints"]


def average_checkpoints(paths: list[Path]) -> dict:
    """fairseq's scripts/average_checkpoints.py arithmetic: the mean of the 'model' tensors (fp16 summed in
    fp32, divided by len(paths)), all other entries from the first checkpoint."""
    if not paths:
        raise ValueError("no checkpoints to average")
    # fairseq checkpoints hold argparse/omegaconf objects: the extension's weights-only allow-list
    from fairseq_asam.fairseq_ext.checkpoint import allow_fairseq_checkpoints

    allow_fairseq_checkpoints()
    total: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
    first = None
    for p in paths:
        state = torch.load(p, map_location="cpu")
        first = first if first is not None else state
        model = state["model"]
        if total and list(model) != list(total):
            raise KeyError(f"{p}: parameters {list(model)} differ from {list(total)}")
        for k, v in model.items():
            v = v.float() if v.dtype == torch.half else v
            # clone: a tied (shared) tensor appears under two names and must not be summed twice in place
            total[k] = v.clone() if k not in total else total[k].add_(v)
    n = len(paths)
    # integer buffers (none in fairseq's transformers) get floor division, as the script's later versions do
    first["model"] = collections.OrderedDict((k, v.div_(n) if v.is_floating_point() else v.floor_divide_(n))
                                             for k, v in total.items())
    return first


def epoch_checkpoints(ckpt_dir: Path, n: int, upper: int | None = None) -> list[Path]:
    """The last n checkpoint<epoch>.pt files with epoch <= upper, newest first (average_checkpoints.py's
    --num-epoch-checkpoints n --checkpoint-upper-bound upper)."""
    found = []
    for f in Path(ckpt_dir).glob("checkpoint*.pt"):
        num = f.stem.removeprefix("checkpoint")
        if num.isdigit() and (upper is None or int(num) <= upper):
            found.append((int(num), f))
    if len(found) < n:
        raise ValueError(f"{ckpt_dir}: {len(found)} epoch checkpoints, need {n}")
    return [f for _, f in sorted(found, reverse=True)[:n]]


def _generate_all(data: Path, jobs: list[tuple[Path, str]]) -> dict:
    """fairseq-generate (beam 5, BPE removed, as evaluate.py) for each (checkpoint, subset), one process:
    fairseq is imported once instead of once per call. Returns {"<ckpt>|<subset>": scores}."""
    texts = evaluate.generate(data, jobs, extra=["--num-workers", "0"], progress=False)
    return {f"{c}|{s}": evaluate.scores(t, data, s) for (c, s), t in zip(jobs, texts)}


def _pythonpath() -> str:
    root = str(Path(__file__).resolve().parent.parent)
    return root + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")


def best_checkpoint_epoch(ckpt_dir: Path, curve: list[dict]) -> dict:
    """The validation that checkpoint_best.pt holds: its update count (the checkpoint's optimizer history)
    looked up in the validation curve."""
    from fairseq_asam.fairseq_ext.checkpoint import allow_fairseq_checkpoints

    allow_fairseq_checkpoints()
    state = torch.load(Path(ckpt_dir) / "checkpoint_best.pt", map_location="cpu")
    update = state["optimizer_history"][-1]["num_updates"]
    match = [p for p in curve if p["update"] == update]
    if not match:
        raise ValueError(f"{ckpt_dir}/checkpoint_best.pt: update {update} is not a validation of the run")
    return match[0]


def train_one(out: Path, method: str, rho: float | None, seed: int, *, max_epoch: int, patience: int,
              validate_interval: int, dropout: float, avg_n: int = AVG_N, extra: list[str] = (), log=print) -> dict:
    """Train one run until early stopping (reused when finished) and average the avg_n epoch checkpoints up to
    its best; returns its record, without BLEU when it is not evaluated yet (:func:`score_runs`)."""
    data = Path(out) / "data-bin"
    name = f"{method}-seed{seed}" + (f"-rho{rho:g}" if rho is not None else "")
    run_dir = Path(out) / "runs" / name
    if (run_dir / "record.json").exists():
        rec = json.loads((run_dir / "record.json").read_text())
        return {**rec, "train_wall_s": _train_seconds(_stdout(run_dir))}
    args = train_args(method, seed, data=data, run_dir=run_dir, rho=rho, max_epoch=max_epoch, patience=patience,
                      validate_interval=validate_interval, dropout=dropout, avg_n=avg_n, extra=extra)
    if not (run_dir / "trained").exists():
        shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted run starts again: early stopping keeps no state
        run_dir.mkdir(parents=True)
        (run_dir / "run.json").write_text(json.dumps({"method": method, "seed": seed, "rho": rho, "data": str(data),
                                                      "fairseq_train_args": args}, indent=1) + "\n")
        log(f"[mt] train {name}")
        with open(run_dir / "stdout.log", "w", encoding="utf-8") as f:
            rc = subprocess.call([sys.executable, "-m", "fairseq_cli.train", *args], stdout=f, stderr=subprocess.STDOUT,
                                 env=dict(os.environ, PYTHONPATH=_pythonpath()))
        if rc != 0:
            raise RuntimeError(f"fairseq-train {name} failed (exit {rc}); see {run_dir / 'stdout.log'}")
        (run_dir / "trained").write_text("")
    ckpts = run_dir / "checkpoints"
    curve = read_valid_log(run_dir / "train.log")
    best = best_checkpoint_epoch(ckpts, curve)
    # A run whose best epoch is under avg_n validations (only at toy sizes) averages what it has.
    inputs = epoch_checkpoints(ckpts, min(avg_n, sum(p["epoch"] <= best["epoch"] for p in curve)), upper=best["epoch"])
    torch.save(average_checkpoints(inputs), ckpts / "checkpoint_avg.pt")
    stdout = _stdout(run_dir)
    return {"method": method, "rho": rho, "seed": seed, "max_epoch": max_epoch, "patience": patience,
            "validate_interval": validate_interval, "stop_epoch": curve[-1]["epoch"], "best_epoch": best["epoch"],
            "best_update": best["update"], "best_valid_loss": best["loss"],
            "early_stopped": "early stop since valid performance hasn't improved" in stdout,
            "updates": curve[-1]["update"], "passes": METHODS[method][2],
            "second_pass_frac": _second_pass_frac(run_dir / "train.log"),
            "train_wall_s": _train_seconds(stdout), "averaged": [p.name for p in inputs],
            "valid_curve": curve, "dir": str(run_dir)}


CKPTS = {"best": "checkpoint_best.pt", "avg": "checkpoint_avg.pt"}


def score_runs(out: Path, recs: list[dict], n_proc: int, log=print) -> None:
    """BLEU of every unscored record's best and averaged checkpoints on valid and test, in n_proc processes;
    writes each run's record.json."""
    todo = [r for r in recs if "best" not in r]
    if not todo:
        return
    chunks = [todo[i::n_proc] for i in range(n_proc) if todo[i::n_proc]]

    def one(chunk):
        return _generate_all(Path(out) / "data-bin", [(Path(r["dir"]) / "checkpoints" / c, s) for r in chunk
                                                      for c in CKPTS.values() for s in ("valid", "test")])

    with ThreadPoolExecutor(n_proc) as ex:
        for chunk, scores in zip(chunks, ex.map(one, chunks)):
            for r in chunk:
                ck = Path(r["dir"]) / "checkpoints"
                r.update({k: {s: scores[f"{ck / c}|{s}"] for s in ("valid", "test")} for k, c in CKPTS.items()})
                (Path(r["dir"]) / "record.json").write_text(json.dumps(r, indent=1) + "\n")
                log(f"[mt] {Path(r['dir']).name}: best epoch {r['best_epoch']} of {r['stop_epoch']}, test BLEU "
                    f"best {r['best']['test']['bleu_tokenized']:.2f}, averaged {r['avg']['test']['bleu_tokenized']:.2f}")


def _train_seconds(stdout: str) -> float | None:
    """fairseq-train's own "done training in X seconds" in its output (None if the run did not finish)."""
    m = re.search(r"done training in ([0-9.]+) seconds", stdout)
    return float(m.group(1)) if m else None


def _stdout(run_dir: Path) -> str:
    return (run_dir / "stdout.log").read_text(encoding="utf-8", errors="replace")


def first_best_epoch(rec: dict) -> int:
    """The first validation at the run's lowest validation loss. fairseq compares the loss as logged (rounded
    to 3 decimals): --patience counts from this validation (a strictly lower loss resets it), while
    checkpoint_best.pt is saved again at every later tie (``best_epoch``)."""
    curve = rec["valid_curve"]
    low = min(p["loss"] for p in curve)
    return next(p["epoch"] for p in curve if p["loss"] == low)


def plateau(rec: dict, window: int) -> float | None:
    """How flat the curve is at the stop: the mean validation loss of the ``window`` epochs after the first
    best validation b, in percent above (+) or below (-) the mean of the ``window`` epochs before b. Near 0 or
    above, the loss has stopped falling; clearly below 0, the stop came on a curve that still falls."""
    curve, b = rec["valid_curve"], first_best_epoch(rec)
    before = [p["loss"] for p in curve if b - window <= p["epoch"] < b]
    after = [p["loss"] for p in curve if b < p["epoch"] <= b + window]
    if not before or not after:
        return None
    return round(100 * (sum(after) / len(after) / (sum(before) / len(before)) - 1), 2)


def _second_pass_frac(log: Path) -> float | None:
    """The last second_pass_frac fairseq logged (None for plain Adam, which logs none)."""
    val = None
    if log.exists():
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            if "second_pass_frac" in line:
                with contextlib.suppress(ValueError, KeyError):
                    rec = json.loads(line[line.index("{"):])
                    val = float(rec.get("second_pass_frac", rec.get("train_second_pass_frac")))
    return val


def _mean_sd(xs: list[float]) -> tuple[float, float | None]:
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None)


def paired(a: dict[int, float], b: dict[int, float]) -> dict:
    """b - a paired over their common seeds: mean, std, SE = std / sqrt(n), mean / SE."""
    seeds = sorted(set(a) & set(b))
    d = [b[s] - a[s] for s in seeds]
    m, sd = _mean_sd(d)
    se = sd / math.sqrt(len(d)) if sd is not None else None
    return {"seeds": seeds, "diffs": d, "gain": m, "paired_std": sd, "se": se,
            "ratio": (m / se if se else None), "powered": bool(se and m / se >= 3)}


def bleu(rec: dict, ckpt: str, subset: str) -> float:
    return rec[ckpt][subset]["bleu_tokenized"]


def choose_rho(runs: list[dict], method: str, ckpt: str, seeds: list[int]) -> tuple[float, dict]:
    """The rho with the highest mean validation BLEU over ``seeds`` (among those run on all of them); returns
    it and every mean."""
    means = {}
    for r in sorted({x["rho"] for x in runs if x["method"] == method}):
        v = [bleu(x, ckpt, "valid") for x in runs if x["method"] == method and x["rho"] == r and x["seed"] in seeds]
        if len(v) == len(seeds):
            means[r] = sum(v) / len(v)
    if not means:
        raise ValueError(f"no {method} runs over all of seeds {seeds}")
    return max(means, key=means.get), means


def summarize(runs: list[dict], grid_seeds: list[int]) -> dict:
    """Rows (method x checkpoint at the rho chosen on validation), paired gains over Adam, the power check."""
    ckpts = ("best", "avg")
    chosen, grid, edge = {}, {}, {}
    for m in METHODS:
        if m != "adam":
            chosen[m], grid[m] = choose_rho(runs, m, "best", grid_seeds)
            # a choice at an end of a grid of several values says the grid should go further that way
            edge[m] = (None if len(grid[m]) < 2 else "lowest" if chosen[m] == min(grid[m])
                       else "highest" if chosen[m] == max(grid[m]) else None)
    rows = {}
    for m in METHODS:
        for c in ckpts:
            rho = chosen.get(m)  # the +avg rows average the checkpoints of the same runs
            sel = [r for r in runs if r["method"] == m and r["rho"] == rho]
            label = m + ("" if c == "best" else "+avg")
            row = {"method": m, "checkpoint": c, "rho": rho, "passes": METHODS[m][2], "n_seeds": len(sel),
                   "seeds": sorted(r["seed"] for r in sel)}
            for s in ("valid", "test"):
                for key in ("bleu_tokenized", "bleu_detok"):
                    row[f"{s}_{key}"] = {r["seed"]: r[c][s][key] for r in sel}
            for key in ("best_epoch", "stop_epoch"):
                row[key] = {r["seed"]: r[key] for r in sel}
            row["first_best_epoch"] = {r["seed"]: first_best_epoch(r) for r in sel}
            rows[label] = row
    base = rows["adam"]
    for row in rows.values():
        for key in ("test_bleu_tokenized", "test_bleu_detok"):
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_sd(list(row[key].values()))
            row[f"{key}_vs_adam"] = paired(base[key], row[key])
        row["valid_bleu_tokenized_mean"] = _mean_sd(list(row["valid_bleu_tokenized"].values()))[0]
    power = rows["asam"]["test_bleu_tokenized_vs_adam"]
    def span(f):
        return [min(f(r) for r in runs), max(f(r) for r in runs)]

    conv = {"runs": len(runs), "early_stopped": sum(r["early_stopped"] for r in runs),
            "best_epoch": span(lambda r: r["best_epoch"]), "first_best_epoch": span(first_best_epoch),
            "stop_epoch": span(lambda r: r["stop_epoch"]),
            "epochs_after_first_best": span(lambda r: r["stop_epoch"] - first_best_epoch(r)),
            "train_min_total": round(sum(r.get("train_wall_s") or 0 for r in runs) / 60, 1)}
    flat = [v for v in (plateau(r, PLATEAU_WINDOW) for r in runs) if v is not None]
    conv["loss_after_vs_before_best_pct"] = [min(flat), max(flat)] if flat else None
    return {"chosen_rho": chosen, "rho_at_grid_edge": edge, "rho_grid_valid_bleu": grid, "rows": rows,
            "power": power, "convergence": conv}


def _span(v, sign=False) -> str:
    return "-" if v is None else f"{_f(v[0], 1, sign)} to {_f(v[1], 1, sign)}"


def _f(x, nd=2, sign=False):
    return "-" if x is None else (f"{x:+.{nd}f}" if sign else f"{x:.{nd}f}")


def markdown(summary: dict) -> str:
    p = summary["power"]
    c = summary["convergence"]
    lines = [f"Convergence: {c['early_stopped']} of {c['runs']} runs stopped early (no lower validation loss for "
             f"--patience validations); first epoch at the lowest loss {c['first_best_epoch'][0]}-"
             f"{c['first_best_epoch'][1]}, checkpoint_best.pt epochs {c['best_epoch'][0]}-{c['best_epoch'][1]}, "
             f"stop epochs {c['stop_epoch'][0]}-{c['stop_epoch'][1]}; training {c['train_min_total']} min in all",
             f"Plateau: mean validation loss of the {PLATEAU_WINDOW} epochs after the first best vs the {PLATEAU_WINDOW} "
             f"before it: {_span(c['loss_after_vs_before_best_pct'], sign=True)}%", "",
             f"Power check: full ASAM - Adam (test, tokenized BLEU, paired over seeds {p['seeds']}): "
             f"{_f(p['gain'], sign=True)} ± {_f(p['se'])} SE (paired std {_f(p['paired_std'])}), "
             f"{_f(p['ratio'], 1)} SE: " + ("powered (>= 3 SE)" if p["powered"] else "NOT powered (< 3 SE)"), "",
             "| method | rho | passes | test BLEU (tok) | vs Adam (paired) | gain / SE | test sacreBLEU (detok) "
             "| vs Adam | valid BLEU | best / stop epochs |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in summary["rows"].items():
        g, gd = r["test_bleu_tokenized_vs_adam"], r["test_bleu_detok_vs_adam"]
        lines.append(f"| {label} | {_f(r['rho'], 2) if r['rho'] else '-'} | {r['passes']:.1f} | "
                     f"{_f(r['test_bleu_tokenized_mean'])} ± {_f(r['test_bleu_tokenized_std'])} | "
                     f"{_f(g['gain'], sign=True)} ± {_f(g['se'])} | {_f(g['ratio'], 1)} | "
                     f"{_f(r['test_bleu_detok_mean'])} ± {_f(r['test_bleu_detok_std'])} | "
                     f"{_f(gd['gain'], sign=True)} ± {_f(gd['se'])} | {_f(r['valid_bleu_tokenized_mean'])} | "
                     + ", ".join(f"{e}/{r['stop_epoch'][k]}" for k, e in r["best_epoch"].items()) + " |")
    lines += ["", "rho grid, mean validation BLEU (tokenized, best checkpoint) over the grid seeds:", ""]
    for k, means in summary["rho_grid_valid_bleu"].items():
        e = summary["rho_at_grid_edge"][k]
        lines.append(f"- {k}: " + ", ".join(f"{float(r):g}: {v:.2f}" for r, v in means.items())
                     + f" -> {summary['chosen_rho'][k]:g}" + (f" (the {e} value of the grid)" if e else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--out", type=Path, default=Path("mt-out"), help="work folder (runs are reused)")
    ap.add_argument("--json", type=Path, default=None, help="also write the result here (default: <out>/mt.json)")
    ap.add_argument("--train-pairs", type=int, default=500, help="generated training pairs (default %(default)s)")
    ap.add_argument("--test-pairs", type=int, default=100, help="pairs per dev/test file (default %(default)s)")
    ap.add_argument("--noise", type=float, default=0.4, help="fraction of swapped targets (default %(default)s)")
    ap.add_argument("--seeds", default="1,2,3,4,5", help="paired seeds (default %(default)s)")
    ap.add_argument("--grid-seeds", default="1,2", help="seeds that run the whole rho grid (default %(default)s)")
    ap.add_argument("--rho-grid", default=",".join(f"{r:g}" for r in RHO_GRID), help="(default %(default)s)")
    ap.add_argument("--max-epoch", type=int, default=MAX_EPOCH, help="cap on epochs per run (default %(default)s)")
    ap.add_argument("--patience", type=int, default=PATIENCE,
                    help="validations without a lower validation loss before a run stops (default %(default)s)")
    ap.add_argument("--validate-interval", type=int, default=1,
                    help="epochs between validations and checkpoints (default %(default)s)")
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--avg", type=int, default=AVG_N, help="epoch checkpoints averaged, up to the best one (default %(default)s)")
    ap.add_argument("--jobs", type=int, default=1, help="runs side by side (default %(default)s)")
    a = ap.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    grid_seeds = [int(s) for s in a.grid_seeds.split(",")]
    grid = [float(r) for r in a.rho_grid.split(",")]
    if not set(grid_seeds) <= set(seeds) or len(seeds) < 2:
        raise SystemExit("--grid-seeds must be a subset of --seeds, and --seeds needs >= 2 seeds")
    for flag, v in (("--max-epoch", a.max_epoch), ("--patience", a.patience), ("--validate-interval", a.validate_interval),
                    ("--avg", a.avg)):
        if v < 1:
            raise SystemExit(f"{flag} must be >= 1, got {v}")
    t0 = time.time()
    print(f"[mt] 1/3 data: {a.train_pairs} generated pairs, {a.noise:.0%} swapped targets", flush=True)
    info = build_data(a.out, n_train=a.train_pairs, n_test_per_set=a.test_pairs, noise=a.noise)
    kw = {"max_epoch": a.max_epoch, "patience": a.patience, "validate_interval": a.validate_interval,
          "dropout": a.dropout, "avg_n": a.avg}

    def run_all(jobs):
        def log(m):
            print(m, flush=True)

        with ThreadPoolExecutor(a.jobs) as ex:
            recs = list(ex.map(lambda j: train_one(a.out, *j, **kw, log=log), jobs))
        score_runs(a.out, recs, a.jobs, log=log)
        return recs

    print(f"[mt] 2/3 rho grid {grid} on seeds {grid_seeds} (with adam on every seed)", flush=True)
    # the two-pass runs first: with 2 jobs the phase ends sooner
    jobs = [(m, r, s) for m in ("asam", "onepass") for s in grid_seeds for r in grid] + [("adam", None, s) for s in seeds]
    runs = run_all(jobs)
    pre = summarize(runs, grid_seeds)
    rest = sorted(pre["chosen_rho"].items())
    print(f"[mt] 3/3 chosen rho {pre['chosen_rho']}; seeds {seeds} at those", flush=True)
    # full ASAM's seeds first: the power check needs them, and a study cut short keeps them
    runs += run_all([(m, r, s) for m, r in rest for s in seeds if s not in grid_seeds])
    summary = summarize(runs, grid_seeds)
    md = markdown(summary)
    res = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
           "data": info, "checkpoint": f"checkpoint_best.pt (lowest validation loss); +avg: the mean of the {a.avg} "
                                      f"epoch checkpoints up to the best (saved every {a.validate_interval} epoch(s))",
           "summary": summary, "markdown": md, "runs": runs, "wall_min": round((time.time() - t0) / 60, 1)}
    for path in {a.out / "mt.json", a.json or a.out / "mt.json"}:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=1) + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
