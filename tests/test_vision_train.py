"""asam-vision-train end to end on tiny CIFAR-format data: learning for each minimizer, resume ==
uninterrupted, 2-process DDP (gloo), bad input, checkpoints the sharpness tool loads, plots and tables."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fairseq_asam.vision import train as vtrain
from fairseq_asam.vision.data import build_eval_dataset
from fairseq_asam.vision.toydata import write_cifar

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "resnet8", "--batch-size", "32", "--workers", "0", "--no-progress", "--test-batch-size", "100"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar(str(root), "cifar10", n_train=128, n_test=100, seed=0)
    return str(root)


@pytest.fixture(scope="module")
def runs(cifar_dir, tmp_path_factory):
    """One short real run per minimizer: SGD through `python -m fairseq_asam.vision`, SAM/ASAM in-process."""
    out = tmp_path_factory.mktemp("runs")
    common = ["--dataset", "cifar10", "--data-dir", cifar_dir, "--epochs", "2", "--lr", "0.05", *TINY]
    dirs = {}
    for mn in ("sgd", "sam", "asam"):
        d = str(out / mn)
        argv = [*common, "--minimizer", mn, "--run-dir", d]
        if mn == "sgd":
            p = subprocess.run([sys.executable, "-m", "fairseq_asam.vision", *argv], env=_env(),
                               capture_output=True, text=True, timeout=300)
            assert p.returncode == 0, p.stdout + p.stderr
            assert "best test top-1" in p.stdout and "final test top-1" in p.stdout
        else:
            assert vtrain.cli_main(argv) == 0
        dirs[mn] = d
    return dirs


@pytest.mark.parametrize("mn", ["sgd", "sam", "asam"])
def test_short_run_learns_above_chance(runs, mn):
    d = runs[mn]
    summary = json.load(open(os.path.join(d, "summary.json")))
    hist = json.load(open(os.path.join(d, "metrics.json")))
    args = json.load(open(os.path.join(d, "args.json")))
    assert summary["best_test_acc"] > 25.0  # chance is 10% (10 classes)
    assert summary["best_test_acc"] == max(h["test_acc"] for h in hist)
    assert summary["final_test_acc"] == hist[-1]["test_acc"]
    assert [h["epoch"] for h in hist] == [1, 2]
    assert hist[1]["lr"] == pytest.approx(0.025)  # cosine over 2 epochs
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    # Resolved arguments, with the paper's defaults filled in.
    assert args["minimizer"] == mn and args["weight_decay"] == 5e-4 and args["label_smoothing"] == 0.1
    assert args["rho"] == {"sgd": None, "sam": 0.05, "asam": 0.5}[mn]
    assert (hist[0]["eps_norm"] > 0) == (mn != "sgd")
    header = open(os.path.join(d, "metrics.csv")).readline().strip().split(",")
    assert {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "test_top5"} <= set(header)


def test_checkpoint_loads_and_reproduces_the_logged_accuracy(runs):
    model, args = vtrain.load_model_from_checkpoint(os.path.join(runs["asam"], "checkpoint_last.pt"))
    assert not model.training and args["model"] == "resnet8" and args["num_classes"] == 10
    ds = build_eval_dataset(args, "test")
    loader = torch.utils.data.DataLoader(ds, batch_size=100)
    acc = vtrain.evaluate(model, loader, torch.device("cpu"), vtrain.contextlib.nullcontext)["top1"]
    final = json.load(open(os.path.join(runs["asam"], "summary.json")))["final_test_acc"]
    assert acc == pytest.approx(final, abs=1e-9)


def test_report_table_and_plot(runs, tmp_path):
    p = subprocess.run([sys.executable, "-m", "fairseq_asam.vision.report", *runs.values(), "--markdown",
                        str(tmp_path / "t.md")], env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    best = {mn: json.load(open(os.path.join(d, "summary.json")))["best_test_acc"] for mn, d in runs.items()}
    row = [r for r in open(tmp_path / "t.md").read().splitlines() if "resnet8" in r][0]
    assert row == f"| cifar10 | resnet8 | {best['sgd']:.2f} (n=1) | {best['sam']:.2f} (n=1) | {best['asam']:.2f} (n=1) |"
    png = tmp_path / "curves.png"
    p = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "plot_vision.py"), *runs.values(), "--out",
                        str(png)], env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def _weights(run_dir):
    return torch.load(os.path.join(run_dir, "checkpoint_last.pt"), weights_only=True)


def test_resume_equals_uninterrupted(cifar_dir, tmp_path):
    # m-sharpness (sharded path), one loader worker, label noise: all of it must replay exactly.
    common = ["--dataset", "cifar10", "--data-dir", cifar_dir, "--epochs", "2", "--minimizer", "asam",
              "--m", "16", "--label-noise", "0.2", "--deterministic", *TINY[:-5], "--workers", "1",
              "--no-progress", "--test-batch-size", "100"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    vtrain.cli_main([*common, "--run-dir", a])
    vtrain.cli_main([*common, "--run-dir", b, "--stop-after", "1"])
    assert json.load(open(os.path.join(b, "summary.json")))["epochs_done"] == 1
    vtrain.cli_main([*common, "--run-dir", b, "--resume"])
    log = open(os.path.join(a, "train.log")).read()
    assert "label noise: 26 of 128 training labels corrupted (0.2031; requested 0.2000)" in log
    assert json.load(open(os.path.join(a, "args.json")))["labels_corrupted"] == 26
    ca, cb = _weights(a), _weights(b)
    assert ca["epoch"] == cb["epoch"] == 2
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    ha, hb = ca["history"], cb["history"]
    for ra, rb in zip(ha, hb):
        for timing in ("time_s", "images_per_s"):  # wall-clock figures, not part of the trajectory
            ra.pop(timing), rb.pop(timing)
    assert ha == hb
    for sa, sb in zip(ca["optimizer"]["base"]["state"].values(), cb["optimizer"]["base"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    # Resuming with a different trajectory-defining flag is refused.
    with pytest.raises(SystemExit):
        vtrain.cli_main([*common, "--run-dir", b, "--resume", "--seed", "3"])


# Under torchrun the long spellings --m-sharpness/--sharpness-p (torchrun would take --m/--p for its own).
@pytest.mark.parametrize("extra", [["--minimizer", "asam"], ["--minimizer", "sam", "--m-sharpness", "8", "--sharpness-p", "2"]],
                         ids=["asam", "sam-m8"])
def test_ddp_two_processes_gloo(cifar_dir, tmp_path, extra):
    d = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fairseq_asam.vision", "--dataset", "cifar10", "--data-dir", cifar_dir, "--epochs", "1",
           "--device", "cpu", "--run-dir", d, *TINY, *extra]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert "weights identical on all 2 ranks" in p.stdout
    args = json.load(open(os.path.join(d, "args.json")))
    assert args["world_size"] == 2
    hist = json.load(open(os.path.join(d, "metrics.json")))
    assert len(hist) == 1 and hist[0]["eps_norm"] > 0 and 0 <= hist[0]["test_acc"] <= 100


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--rho", "-1"], "--rho must be > 0, got -1.0"),
        (["--label-noise", "1.5"], "--label-noise must be in [0, 1)"),
        (["--model", "resnet50"], "--model resnet50 is an ImageNet model"),
        (["--minimizer", "sgd", "--rho", "0.1"], "--rho and --m apply to --minimizer sam/asam"),
        (["--m", "0"], "--m must be >= 1"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--stop-after", "5", "--epochs", "2"], "--stop-after must be in [1, --epochs=2]"),
        (["--data-dir", "/nonexistent/cifar"], "--data-dir: cifar10: /nonexistent/cifar/cifar-10-batches-py"),
        (["--resume"], "--resume: no checkpoint at"),
        (["--normalize-bias", "yes"], "unrecognized arguments: yes"),
    ],
)
def test_bad_input_is_a_clear_error_and_writes_nothing(cifar_dir, tmp_path, capsys, argv, message):
    run_dir = tmp_path / "run"
    full = ["--data-dir", cifar_dir, "--run-dir", str(run_dir), *TINY]
    full = [*full, *argv]  # a later --data-dir wins
    with pytest.raises(SystemExit) as e:
        vtrain.cli_main(full)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not run_dir.exists()


def test_existing_run_needs_resume(runs):
    with pytest.raises(SystemExit):
        vtrain.cli_main(["--data-dir", "x", "--run-dir", runs["sam"], *TINY])


def test_paper_defaults():
    p = vtrain.build_parser()
    r = vtrain.resolve_args(p.parse_args(["--dataset", "cifar100", "--minimizer", "asam"]))
    assert (r.epochs, r.batch_size, r.lr, r.rho, r.eta, r.m, r.model) == (200, 128, 0.1, 1.0, 0.01, None, "resnet20")
    r = vtrain.resolve_args(p.parse_args(["--dataset", "cifar10", "--minimizer", "sgd"]))
    assert (r.epochs, r.rho, r.weight_decay, r.momentum, r.label_smoothing) == (400, None, 5e-4, 0.9, 0.1)
    r = vtrain.resolve_args(p.parse_args(["--dataset", "cifar100", "--minimizer", "sam"]))
    assert r.rho == 0.1
    r = vtrain.resolve_args(p.parse_args(["--dataset", "imagenet", "--minimizer", "asam"]))
    assert (r.model, r.epochs, r.batch_size, r.lr, r.weight_decay, r.rho, r.m) == ("resnet50", 100, 512, 0.2, 1e-4, 1.0, 128)
    r = vtrain.resolve_args(p.parse_args(["--dataset", "imagenet", "--minimizer", "sam"]))
    assert (r.rho, r.m) == (0.05, 128)
    r = vtrain.resolve_args(p.parse_args(["--dataset", "imagenet", "--minimizer", "sgd"]))
    assert r.epochs == 200



def test_reproduce_cifar_script(cifar_dir, tmp_path):
    out = tmp_path / "out"
    env = dict(_env(), MODELS="resnet8", METHODS="sgd asam", SEEDS="0", DATASETS="cifar10", EPOCHS="1",
               DATA_DIR=cifar_dir, OUT=str(out), PYTHON=sys.executable, EXTRA_ARGS="--workers 0 --batch-size 64")
    script = os.path.join(REPO, "scripts", "reproduce-cifar.sh")
    p = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    best = [json.load(open(out / f"cifar10-resnet8-{m}-noise0-s0" / "summary.json"))["best_test_acc"]
            for m in ("sgd", "asam")]
    table = (out / "summary.md").read_text().splitlines()
    assert table[0] == "| dataset | model | sgd | asam |"
    assert table[2] == f"| cifar10 | resnet8 | {best[0]:.2f} (n=1) | {best[1]:.2f} (n=1) |"
    # Run again: finished runs are skipped, not retrained.
    p = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.count("done, skipping") == 2, p.stdout + p.stderr


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_run_on_cpu(cifar_dir, tmp_path, amp):
    # CPU autocast runs both precisions; fp16 carries a GradScaler whose state goes into the checkpoint.
    d = str(tmp_path / amp)
    vtrain.cli_main(["--dataset", "cifar10", "--data-dir", cifar_dir, "--epochs", "1", "--minimizer", "asam",
                     "--amp", amp, "--device", "cpu", "--run-dir", d, *TINY])
    ck = _weights(d)
    hist = ck["history"]
    assert hist[0]["skipped_steps"] == 0 and 0 < hist[0]["eps_norm"] < 10 and hist[0]["train_loss"] < 10
    assert (ck["scaler"] is not None) == (amp == "fp16")
    if amp == "fp16":
        assert ck["scaler"]["scale"] == 65536.0  # no overflow, no growth within 4 steps
