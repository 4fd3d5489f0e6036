"""asam-vision-train end to end on tiny CIFAR-format data: learning for each minimizer, resume ==
uninterrupted, 2-process DDP (gloo), bad input, checkpoints the sharpness tool loads, plots and tables."""

import json
import os
import subprocess
import sys

import pytest
import torch
from workers import run_ranks, torchrun  # tests/ is on sys.path under pytest

from fairseq_asam.vision import train as vtrain
from fairseq_asam.vision.data import build_eval_dataset
from fairseq_asam.vision.toydata import write_cifar

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# On the CPU on every machine: the tests compare runs with each other and with CPU evaluations, exactly or at
# rel 1e-5, which CUDA (TF32 convolutions, other kernels) would not meet. GPU runs pass --device cuda after TINY.
TINY = ["--device", "cpu", "--model", "resnet8", "--batch-size", "32", "--workers", "0", "--no-progress",
        "--test-batch-size", "100"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar(str(root), "cifar10", n_train=128, n_test=100, seed=0)
    return str(root)


@pytest.fixture(scope="module")
def runs(cifar_dir, tmp_path_factory, warm_launches):  # `python -m fairseq_asam.vision` starts warm (tests/warm_python.py)
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_checkpoint_loads_and_reproduces_the_logged_accuracy(runs):
    model, args = vtrain.load_model_from_checkpoint(os.path.join(runs["asam"], "checkpoint_last.pt"))
    assert not model.training and args["model"] == "resnet8" and args["num_classes"] == 10
    ds = build_eval_dataset(args, "test")
    loader = torch.utils.data.DataLoader(ds, batch_size=100)
    acc = vtrain.evaluate(model, loader, torch.device("cpu"), vtrain.contextlib.nullcontext)["top1"]
    final = json.load(open(os.path.join(runs["asam"], "summary.json")))["final_test_acc"]
    assert acc == pytest.approx(final, abs=1e-9)


@pytest.mark.slow
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


@pytest.mark.slow
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
@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--minimizer", "asam"], ["--minimizer", "sam", "--m-sharpness", "8", "--sharpness-p", "2"],
                                   ["--minimizer", "asam", "--accum-steps", "2"]],
                         ids=["asam", "sam-m8", "asam-accum2"])
def test_ddp_two_processes_gloo(cifar_dir, tmp_path, extra):
    d = str(tmp_path / "ddp")
    argv = ["-m", "fairseq_asam.vision", "--dataset", "cifar10", "--data-dir", cifar_dir, "--epochs", "1",
            "--device", "cpu", "--run-dir", d, *TINY, *extra]
    if "--m-sharpness" in extra:  # the real torchrun, which parses its own options first
        p = torchrun(2, argv, env=_env(), timeout=300, cwd=str(tmp_path))
    else:  # the same two ranks, forked warm (tests/workers.py)
        p = run_ranks(2, argv, env=_env(), timeout=300, cwd=str(tmp_path))
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert "weights identical on all 2 ranks" in p.stdout
    args = json.load(open(os.path.join(d, "args.json")))
    assert args["world_size"] == 2
    hist = json.load(open(os.path.join(d, "metrics.json")))
    assert len(hist) == 1 and hist[0]["eps_norm"] > 0 and 0 <= hist[0]["test_acc"] <= 100


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--rho", "-1"], "--rho must be > 0, got -1"),
        (["--label-noise", "1.5"], "--label-noise must be in [0, 1)"),
        (["--model", "resnet50"], "--model resnet50 is an ImageNet model"),
        (["--minimizer", "sgd", "--rho", "0.1"], "--rho and --m apply to --minimizer sam/asam"),
        (["--m", "0"], "--m must be >= 1"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--stop-after", "5", "--epochs", "2"], "--stop-after must be in [1, --epochs=2]"),
        (["--data-dir", "/nonexistent/cifar"], "--data-dir: cifar10: /nonexistent/cifar/cifar-10-batches-py"),
        (["--resume"], "--resume: no checkpoint at"),
        (["--normalize-bias", "yes"], "unrecognized arguments: yes"),
        (["--accum-steps", "0"], "--accum-steps must be >= 1, got 0"),
        (["--accum-steps", "3"], "--batch-size 32 must be divisible by --accum-steps 3 times the number of workers (1)"),
        (["--cutmix", "1.5"], "--cutmix must be in [0, 1], got 1.5"),
        (["--cutmix", "0.5", "--cutmix-alpha", "0"], "--cutmix-alpha must be > 0, got 0.0"),
        (["--preset", "pyramidnet272", "--dataset", "imagenet"], "--preset pyramidnet272 is a CIFAR setting"),
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


@pytest.mark.slow
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



@pytest.mark.slow
def test_reproduce_cifar_script(cifar_dir, tmp_path, warm_launches):
    out = tmp_path / "out"
    env = dict(_env(), MODELS="resnet8", METHODS="sgd asam", SEEDS="0", DATASETS="cifar10", EPOCHS="1",
               DATA_DIR=cifar_dir, OUT=str(out), PYTHON=sys.executable, EXTRA_ARGS="--workers 0 --batch-size 64 --device cpu")
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


@pytest.mark.slow
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


@pytest.mark.parametrize("fails", [False, True], ids=["run", "error"])
def test_main_restores_global_torch_settings(cifar_dir, tmp_path, fails):
    # --deterministic switches torch's deterministic algorithms on and cudnn.benchmark off for the run; a caller
    # (here: the tests that follow in this process) must get its own settings back, also when main() fails.
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    torch.backends.cudnn.benchmark = True
    argv = ["--dataset", "cifar10", "--data-dir", cifar_dir, "--epochs", "1", "--minimizer", "sgd", "--deterministic",
            "--device", "cpu", "--run-dir", str(tmp_path / "r"), *TINY]
    try:
        if fails:
            with pytest.raises(SystemExit):  # fails after the settings were changed: no checkpoint to resume
                vtrain.cli_main([*argv, "--resume"])
        else:
            assert vtrain.cli_main(argv) == 0
        assert torch.are_deterministic_algorithms_enabled() is False
        assert torch.backends.cudnn.benchmark is True
        assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == saved[2]
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.backends.cudnn.benchmark = saved[1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: counts host syncs of the CUDA training loop")
def test_training_loop_syncs_once_per_asam_step(tmp_path):
    # Two runs that differ only in the number of training steps (2 and 4, full batches of 32): the difference in
    # synchronising CUDA calls per extra step must be exactly the ascent's one (the norm's finiteness), i.e. the
    # loop's own bookkeeping adds none. Before issue 15 it made a host tensor per step (torch.tensor(float(n),
    # device=cuda)): 2 per step.
    import warnings

    counts = {}
    for n_train in (64, 128):
        data = tmp_path / f"data{n_train}"
        write_cifar(str(data), "cifar10", n_train=n_train, n_test=100, seed=0)
        argv = ["--dataset", "cifar10", "--data-dir", str(data), "--epochs", "1", "--minimizer", "asam",
                "--run-dir", str(tmp_path / f"run{n_train}"), *TINY, "--device", "cuda"]
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                vtrain.cli_main(argv)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts[n_train] = sum("synchronizing CUDA operation" in str(w.message) for w in caught)
    assert (counts[128] - counts[64]) / 2 == 1, counts


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_pyramidnet272_preset_is_the_papers_row(dataset):
    # Section 5.2: m = 32, lr 0.05, batch 256, 900 epochs SAM/ASAM and 1800 SGD, rho 0.05 SAM / 1.0 ASAM on
    # both data sets, AutoAugment + CutMix + ShakeDrop (the pyramidnet272 model).
    p = vtrain.build_parser()
    want = {"sgd": (1800, None, None), "sam": (900, 0.05, 32), "asam": (900, 1.0, 32)}
    for mn, (epochs, rho, m) in want.items():
        r = vtrain.resolve_args(p.parse_args(["--dataset", dataset, "--preset", "pyramidnet272", "--minimizer", mn]))
        assert (r.model, r.lr, r.batch_size, r.epochs, r.rho, r.m) == ("pyramidnet272", 0.05, 256, epochs, rho, m)
        assert (r.autoaugment, r.cutmix, r.cutmix_alpha, r.weight_decay, r.label_smoothing) == (True, 0.5, 1.0, 5e-4, 0.1)
    # Explicit flags override the preset.
    r = vtrain.resolve_args(p.parse_args(["--preset", "pyramidnet272", "--lr", "0.1", "--no-autoaugment",
                                          "--cutmix", "0", "--m", "64", "--epochs", "3"]))
    assert (r.lr, r.autoaugment, r.cutmix, r.m, r.epochs, r.model) == (0.1, False, 0.0, 64, 3, "pyramidnet272")
    # Without the preset nothing changes: no AutoAugment, no CutMix, one micro-batch.
    r = vtrain.resolve_args(p.parse_args(["--dataset", dataset]))
    assert (r.autoaugment, r.cutmix, r.accum_steps, r.model) == (False, 0.0, 1, "resnet20")


def test_autoaugment_flag_adds_torchvisions_cifar10_policy(cifar_dir):
    from torchvision import transforms as T

    from fairseq_asam.vision.data import build_train_dataset

    plain, _ = build_train_dataset({"dataset": "cifar10", "data_dir": cifar_dir})
    aa, _ = build_train_dataset({"dataset": "cifar10", "data_dir": cifar_dir, "autoaugment": True})
    assert not any(isinstance(t, T.AutoAugment) for t in plain.transform.transforms)
    names = [type(t).__name__ for t in aa.transform.transforms]
    assert names == ["RandomCrop", "RandomHorizontalFlip", "AutoAugment", "ToTensor", "Normalize"]
    assert aa.transform.transforms[2].policy == T.AutoAugmentPolicy.CIFAR10


def test_cutmix_batch_and_soft_label_loss():
    from torchvision.transforms import v2

    torch.manual_seed(0)
    x = torch.rand(6, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    cm = v2.CutMix(alpha=1.0, num_classes=5)
    xm, ym = vtrain._cutmix_batch(cm, 1.0, x, y, 5)
    # Every pixel comes from the image itself or from its neighbour in the batch (torchvision rolls by one),
    # and the label weight of each is the pixel share it got.
    own = (xm == x).all(1)
    other = (xm == x.roll(1, 0)).all(1)
    assert bool((own | other).all()) and 0 < int(other[0].sum()) < 64
    share = other[0].float().mean()
    onehot = torch.nn.functional.one_hot(y, 5).float()
    torch.testing.assert_close(ym, (1 - share) * onehot + share * onehot.roll(1, 0))
    assert torch.equal(vtrain._hard_labels(ym), torch.where(share > 0.5, y.roll(1, 0), y))
    # Probability 0: images untouched, labels one-hot, and the loss on them is the loss on the indices.
    x0, y0 = vtrain._cutmix_batch(cm, 0.0, x, y, 5)
    assert torch.equal(x0, x) and torch.equal(y0, onehot)
    logits = torch.randn(6, 5, dtype=torch.float64)
    ce = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    torch.testing.assert_close(ce(logits, y0.double()), ce(logits, y), rtol=0, atol=1e-14)


@pytest.mark.slow
def test_resume_equals_uninterrupted_with_accumulation_cutmix_autoaugment(cifar_dir, tmp_path, capsys):
    # Every new source of randomness (AutoAugment in the loader, CutMix in the loop) and the micro-batches
    # must replay across a resume.
    common = ["--dataset", "cifar10", "--data-dir", cifar_dir, "--epochs", "2", "--minimizer", "asam",
              "--m", "8", "--accum-steps", "2", "--autoaugment", "--cutmix", "0.5", "--deterministic", *TINY]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    vtrain.cli_main([*common, "--run-dir", a])
    vtrain.cli_main([*common, "--run-dir", b, "--stop-after", "1"])
    vtrain.cli_main([*common, "--run-dir", b, "--resume"])
    ca, cb = _weights(a), _weights(b)
    assert ca["epoch"] == cb["epoch"] == 2 and ca["args"]["accum_steps"] == 2
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    timing = ("time_s", "images_per_s")  # wall-clock figures, not part of the trajectory
    hist = [{k: v for k, v in h.items() if k not in timing} for h in ca["history"]]
    assert hist == [{k: v for k, v in h.items() if k not in timing} for h in cb["history"]]
    assert hist[-1]["eps_norm"] > 0
    # --accum-steps is part of the run: resuming with another value is refused, naming it.
    capsys.readouterr()
    with pytest.raises(SystemExit):
        vtrain.cli_main([*common, "--run-dir", b, "--resume", "--accum-steps", "1"])
    assert "--accum-steps 1 (checkpoint: 2)" in capsys.readouterr().err
    # A checkpoint from before these flags existed resumes with their defaults (accum 1, no CutMix...).
    ck = torch.load(os.path.join(b, "checkpoint_last.pt"), weights_only=True)
    for k in ("accum_steps", "autoaugment", "cutmix", "cutmix_alpha", "preset"):
        ck["args"].pop(k)
    ck["epoch"] = 1
    torch.save(ck, os.path.join(b, "old.pt"))
    old = ["--dataset", "cifar10", "--data-dir", cifar_dir, "--epochs", "2", "--minimizer", "asam", "--m", "8",
           "--deterministic", *TINY, "--run-dir", b, "--resume", os.path.join(b, "old.pt")]
    assert vtrain.cli_main(old) == 0
