"""asam-vision-train with the cheaper-update flags (--every, --reuse-alpha, --start, --adaptive-c,
--one-pass) on tiny CIFAR-format data: resume == uninterrupted bit for bit (the schedule's state is in
the checkpoint), the fraction of updates with a second pass per epoch, fp16 AMP on CPU, 2-process DDP
(gloo) with identical weights on every rank, and bad flags as clear errors."""

import json
import os

import pytest
import torch
from workers import run_ranks  # tests/ is on sys.path under pytest

from fairseq_asam.vision import train as vtrain
from fairseq_asam.vision.toydata import write_cifar

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "resnet8", "--batch-size", "32", "--workers", "0", "--no-progress", "--test-batch-size", "100"]


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar(str(root), "cifar10", n_train=128, n_test=100, seed=0)
    return str(root)


def _ckpt(d):
    return torch.load(os.path.join(d, "checkpoint_last.pt"), map_location="cpu", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("flags,fractions", [
    (["--every", "2", "--reuse-alpha", "0.7"], [0.5, 0.5]),   # 4 updates per epoch: refresh on 0, 2, 4, 6
    (["--one-pass", "previous"], [0.0, 0.0]),
    (["--start", "0.75"], [0.0, 0.5]),                       # 8 updates: the switch is at update 6
], ids=["look", "one-pass-previous", "late"])
def test_resume_equals_uninterrupted(cifar_dir, tmp_path, flags, fractions):
    common = ["--dataset", "cifar10", "--data-dir", cifar_dir, "--epochs", "2", "--minimizer", "asam",
              "--label-noise", "0.2", "--deterministic", *TINY, *flags]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    vtrain.cli_main([*common, "--run-dir", a])
    vtrain.cli_main([*common, "--run-dir", b, "--stop-after", "1"])
    vtrain.cli_main([*common, "--run-dir", b, "--resume"])
    ca, cb = _ckpt(a), _ckpt(b)
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    sa, sb = ca["optimizer"]["schedule"], cb["optimizer"]["schedule"]
    assert sa["updates"] == sb["updates"] == 8 and sa["second_passes"] == sb["second_passes"]
    for key in ("direction", "previous"):
        if sa.get(key) is not None:
            assert all(torch.equal(x, y) for x, y in zip(sa[key], sb[key]) if x is not None)
    for ra, rb in zip(ca["history"], cb["history"]):
        ra.pop("time_s"), rb.pop("time_s"), ra.pop("images_per_s", None), rb.pop("images_per_s", None)
    assert ca["history"] == cb["history"]
    assert [h["second_pass_frac"] for h in ca["history"]] == fractions
    # Resuming with another schedule is refused, naming the flag.
    with pytest.raises(SystemExit):
        vtrain.cli_main([*common, "--run-dir", b, "--resume", "--every", "3"])


@pytest.mark.slow
def test_fp16_amp_on_cpu(cifar_dir, tmp_path):
    d = str(tmp_path / "amp")
    vtrain.cli_main(["--dataset", "cifar10", "--data-dir", cifar_dir, "--epochs", "1", "--minimizer", "asam",
                     "--amp", "fp16", "--device", "cpu", "--run-dir", d, "--every", "2", "--reuse-alpha", "0.7", *TINY])
    ck = _ckpt(d)
    h = ck["history"][0]
    assert h["skipped_steps"] == 0 and h["train_loss"] < 10 and h["second_pass_frac"] == 0.5
    d = ck["optimizer"]["schedule"]["direction"]  # computed from the GradScaler-scaled grads: still unit
    assert sum(float(t.double().square().sum()) for t in d if t is not None) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--every", "2", "--reuse-alpha", "0.7"], ["--adaptive-c", "0"]],
                         ids=["look", "adaptive"])
def test_ddp_two_processes_gloo(cifar_dir, tmp_path, flags):
    # The first pass runs per worker (no_sync): the schedule's decision, statistics and stored direction
    # must still agree on every rank, or the weights drift apart (checked by the entry point itself).
    d = str(tmp_path / "ddp")
    # Two ranks as torchrun starts them, forked warm (tests/workers.py).
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    argv = ["-m", "fairseq_asam.vision", "--dataset", "cifar10", "--data-dir", cifar_dir, "--epochs", "2",
            "--device", "cpu", "--run-dir", d, "--minimizer", "asam", *TINY, *flags]
    p = run_ranks(2, argv, env=env, timeout=300, cwd=str(tmp_path))
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert "weights identical on all 2 ranks" in p.stdout
    hist = json.load(open(os.path.join(d, "metrics.json")))
    assert 0 < hist[-1]["second_pass_frac"] <= 1


@pytest.mark.parametrize("argv,message", [
    (["--every", "0"], "--every must be >= 1, got 0"),
    (["--reuse-alpha", "-1", "--every", "2"], "--reuse-alpha must be >= 0, got -1"),
    (["--start", "1.5"], "--start must be in [0, 1], got 1.5"),
    (["--adaptive-c", "nan"], "--adaptive-c must be a finite number, got nan"),
    (["--reuse-alpha", "0.7"], "--reuse-alpha (Look-ASAM) needs --every k >= 2, got 1"),
    (["--every", "2", "--start", "0.5"], "choose one cheaper-update policy, got --every and --start"),
    (["--minimizer", "sgd", "--every", "2"], "apply to --minimizer sam/asam"),
    (["--m", "8", "--every", "2"], "--m (m-sharpness) with EveryK(k=2): m-sharpness takes each shard's eps"),
    (["--fsdp", "--adaptive-c", "1"], "--fsdp with AdaptiveTrigger(c=1.0, beta=0.9): the policy reads the norm of g"),
    (["--fsdp", "--every", "2", "--reuse-alpha", "0.7"], "--fsdp with LookASAM(k=2, alpha=0.7)"),
])
def test_bad_flags_are_clear_errors(cifar_dir, tmp_path, capsys, argv, message):
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        vtrain.cli_main(["--data-dir", cifar_dir, "--run-dir", str(run_dir), *TINY, *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not run_dir.exists()


@pytest.mark.slow
@pytest.mark.parametrize("flags,tracked", [
    (["--one-pass", "momentum"], 4),  # recomputed at w: one pass over the 4 training batches
    (["--every", "2"], 8),            # as trained: one first-pass forward per update, 2 epochs of 4
], ids=["one-pass", "every2"])
def test_one_pass_batchnorm_statistics_are_recomputed_at_w(cifar_dir, tmp_path, flags, tracked):
    # The one-pass update's only forward runs at w + eps, so its running statistics are recomputed at the
    # final w (one forward pass over the training data) before the last evaluation and checkpoint.
    run = str(tmp_path / "r")
    vtrain.cli_main(["--dataset", "cifar10", "--data-dir", cifar_dir, "--epochs", "2", "--minimizer", "asam",
                     "--run-dir", run, *TINY, *flags])
    model = _ckpt(run)["model"]
    counts = {int(v) for k, v in model.items() if k.endswith("num_batches_tracked")}
    assert counts == {tracked}
    assert ("recomputed at w" in open(os.path.join(run, "train.log")).read()) == (tracked == 4)
    # The logged final accuracy is the saved model's: the recompute came before the evaluation.
    m, _ = vtrain.load_model_from_checkpoint(os.path.join(run, "checkpoint_last.pt"))
    from fairseq_asam.vision.data import build_eval_dataset

    ds = build_eval_dataset({"dataset": "cifar10", "data_dir": cifar_dir}, "test")
    m.eval()
    with torch.no_grad():
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        y = torch.tensor([ds[i][1] for i in range(len(ds))])
        acc = float((m(x).argmax(1) == y).double().mean()) * 100
    assert acc == pytest.approx(json.load(open(os.path.join(run, "metrics.json")))[-1]["test_acc"], abs=1e-9)
