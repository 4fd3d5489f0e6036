"""scripts/figure4.py in quick mode (tiny rho grid, 2 epochs of one step, 32 real digit images): one result row per
factor x rho x seed, finished runs reused, an interrupted run resumed, the plot written."""

import csv
import importlib.util
import json
import os
import shlex
import subprocess
import sys

import pytest

from fairseq_asam.vision import train as vtrain
from fairseq_asam.vision.toydata import write_cifar_digits

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "figure4.py")


def _script_module():
    spec = importlib.util.spec_from_file_location("figure4", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(argv):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, SCRIPT, *argv], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


@pytest.mark.slow
def test_figure4_quick(tmp_path):
    f4 = _script_module()
    data = str(tmp_path / "data")
    write_cifar_digits(data, n_train=32, n_test=20, seed=0)
    out = str(tmp_path / "out")
    argv = ["--out", out, "--data-dir", data, "--model", "resnet8", "--rhos", "0.01 1", "--seeds", "0", "1",
            "--epochs", "2", "--extra-args", "--batch-size 32 --workers 0 --test-batch-size 100"]

    # An interrupted run (1 of 2 epochs done): the script must resume it, not start it again.
    cfg = f4.resolve(f4.build_parser().parse_args(argv))
    partial = os.path.join(out, f4.run_dir_name("filter-p2", 1.0, 1))
    assert vtrain.cli_main([*f4.train_argv(cfg, "filter-p2", 1.0, 1, partial, resume=False), "--stop-after", "1"]) == 0
    assert f4.run_status(partial) == "partial"

    stdout = _run(argv)
    assert stdout.count(": training: asam-vision-train") == 15 and stdout.count(": resuming: ") == 1
    assert f"{partial}: resuming" in stdout
    assert "resumed from" in open(os.path.join(partial, "train.log")).read()

    with open(os.path.join(out, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    keys = sorted((r["factor"], float(r["rho"]), int(r["seed"])) for r in rows)
    assert keys == sorted((fa, rho, s) for fa in f4.FACTORS for rho in (0.01, 1.0) for s in (0, 1))
    assert rows == [{k: str(v) for k, v in r.items()} for r in json.load(open(os.path.join(out, "results.json")))]
    by = {(r["factor"], float(r["rho"]), int(r["seed"])): r for r in rows}
    for (factor, rho, seed), r in by.items():
        d = os.path.join(out, f4.run_dir_name(factor, rho, seed))
        a = json.load(open(os.path.join(d, "args.json")))
        s = json.load(open(os.path.join(d, "summary.json")))
        # Each row is its run: the factor's flags, the rho, and the run's own best accuracy.
        assert (a["normalization"], a["p"], a["normalize_bias"]) == {
            "elem-pinf": ("element", "inf", False), "elem-p2": ("element", "2", False),
            "elem-p2-bn": ("element", "2", True), "filter-p2": ("filter", "2", False)}[factor]
        assert a["rho"] == rho and a["seed"] == seed and a["minimizer"] == "asam" and a["model"] == "resnet8"
        assert float(r["best_test_acc"]) == s["best_test_acc"] and s["epochs_done"] == 2
    # The table's cell is the mean over the seeds.
    agg = f4.aggregate(json.load(open(os.path.join(out, "results.json"))), "best_test_acc")
    rho, mean, std, n = agg["elem-p2"][0]
    vals = [float(by[("elem-p2", 0.01, s)]["best_test_acc"]) for s in (0, 1)]
    assert (rho, n) == (0.01, 2) and abs(mean - sum(vals) / 2) < 1e-12
    md = open(os.path.join(out, "figure4.md")).read().splitlines()
    assert md[2] == "| factor | rho=0.01 | rho=1 |" and len(md) == 8
    png = os.path.join(out, "figure4.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(png) > 10_000

    # Run again: every run is reused, none retrained (their files are untouched).
    mtimes = {d: os.path.getmtime(os.path.join(out, d, "checkpoint_last.pt")) for d in os.listdir(out)
              if os.path.isdir(os.path.join(out, d))}
    js = str(tmp_path / "figure4-results.json")
    stdout = _run([*argv, "--json", js])
    assert stdout.count("done, reusing") == 16 and "training:" not in stdout and "resuming:" not in stdout
    assert mtimes == {d: os.path.getmtime(os.path.join(out, d, "checkpoint_last.pt")) for d in mtimes}
    with open(os.path.join(out, "results.csv")) as f:
        assert list(csv.DictReader(f)) == rows

    # --json: the same rows with where they come from; each run keeps the time it took when it trained.
    doc = json.load(open(js))
    assert doc["command"] == "OMP_NUM_THREADS=1 python scripts/figure4.py " + shlex.join([*argv, "--json", js])
    assert len(doc["commit"].split("+")[0]) == 40 and doc["machine"]["torch_threads"] == 1
    assert [{k: str(v) for k, v in r.items()} for r in doc["runs"]] == rows
    assert all(r["cpu_s"] > 0 and r["wall_s"] > 0 for r in doc["runs"])
    assert doc["cpu_seconds"] == pytest.approx(sum(r["cpu_s"] for r in doc["runs"]), abs=0.1)
    assert f4.accuracy_markdown(doc).splitlines()[2:] == md[2:]
    # --from-json: the plot again, from the JSON alone.
    png2 = str(tmp_path / "again.png")
    assert f"== plot {png2}" in _run(["--from-json", js, "--plot", png2])
    assert open(png2, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_figure4_presets_and_bad_rhos():
    f4 = _script_module()
    p = f4.build_parser()
    paper = f4.resolve(p.parse_args([]))
    assert (paper["model"], paper["dataset"], paper["epochs"]) == ("wrn16_8", "cifar10", None)
    assert paper["rhos"][0] == 5e-5 and paper["rhos"][-1] == 2.0 and len(paper["rhos"]) == 15
    assert list(paper["factors"]) == ["elem-pinf", "elem-p2", "elem-p2-bn", "filter-p2"]
    laptop = f4.resolve(p.parse_args(["--preset", "laptop", "--out", "x"]))
    assert (laptop["model"], laptop["data_dir"], laptop["epochs"]) == ("resnet8", os.path.join("x", "data"), 6)
    import pytest

    with pytest.raises(SystemExit):
        p.parse_args(["--rhos", "0.1 -1"])
