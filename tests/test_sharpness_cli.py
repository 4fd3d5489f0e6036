"""asam-sharpness on real checkpoints: a tiny fairseq-train transformer and a tiny asam-vision-train ResNet.

The checkpoints come from the real trainers on data written in the real on-disk formats (a binarized
parallel corpus; CIFAR-10 python pickles). The losses the tool reports are checked against the
trainers' own evaluation code (fairseq-validate; the vision run's metrics.json).
"""

import json
import math
import re

import fairseq_helpers as fh  # tests/ is on sys.path under pytest (rootdir-relative import)
import pytest
import torch

from fairseq_asam.sharpness import measure_sharpness
from fairseq_asam.sharpness_cli import build_parser, cli_main, load_fairseq, load_vision


@pytest.fixture(scope="module")
def fairseq_ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fairseq")
    data = fh.make_tiny_corpus(tmp)
    save = tmp / "ckpt"
    fh.run_fairseq("train", fh.tiny_train_args(data, save, "--optimizer", "adam", "--max-update", "8"))
    return data, save / "checkpoint_last.pt"


@pytest.fixture(scope="module")
def vision_run(tmp_path_factory):
    from fairseq_asam.vision.toydata import write_cifar
    from fairseq_asam.vision.train import cli_main as vision_train

    tmp = tmp_path_factory.mktemp("vision")
    write_cifar(str(tmp / "data"), "cifar10", n_train=60, n_test=40)
    run = tmp / "run"
    torch.manual_seed(0)
    vision_train([
        "--dataset", "cifar10", "--data-dir", str(tmp / "data"), "--model", "resnet8", "--epochs", "1",
        "--batch-size", "30", "--minimizer", "sgd", "--run-dir", str(run), "--workers", "0", "--device", "cpu",
        "--no-progress",
    ])  # fmt: skip
    return run


def _run(capsys, argv):
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    return out, json.loads(out[out.index("{") :])


@pytest.mark.slow
def test_fairseq_checkpoint(fairseq_ckpt, tmp_path, capsys):
    data, ckpt = fairseq_ckpt
    out_json = tmp_path / "out" / "s.json"
    # --device cpu: the loss is compared with fairseq-validate --cpu; on a GPU TF32 and other kernels differ.
    base = ["fairseq", str(ckpt), "--data", str(data), "--split", "valid", "--max-tokens", "200", "--device", "cpu",
            "--rho", "0.5"]
    text, rep = _run(capsys, base + ["--steps", "3", "--restarts", "1", "--out", str(out_json)])
    assert text.startswith("adaptive sharpness (Eq. 4), p=2, rho=0.5: ")
    assert json.loads(out_json.read_text()) == rep
    assert rep["task"] == "translation" and rep["criterion"] == "label_smoothed_cross_entropy"
    assert rep["num_sentences"] == 24  # the whole valid split of the tiny corpus
    assert rep["value"] > 0 and rep["max_loss"] == pytest.approx(rep["loss"] + rep["value"], rel=1e-12)
    assert rep["value"] == max(max(t) for t in rep["losses"]) and len(rep["losses"]) == 2
    assert rep["eps_norm"] == pytest.approx(0.5, rel=1e-5)

    # The loss at w is what fairseq's own validation computes (it logs base 2, rounded to 3 decimals).
    proc = fh.run_fairseq("validate", [
        str(data), "--task", "translation", "--path", str(ckpt), "--user-dir", fh.USER_DIR, "--valid-subset", "valid",
        "--max-tokens", "200", "--cpu", "--num-workers", "0", "--no-progress-bar",
    ])  # fmt: skip
    logged = float(re.search(r"valid on 'valid' subset \| loss ([0-9.]+)", proc.stdout + proc.stderr).group(1))
    assert rep["loss"] / math.log(2) == pytest.approx(logged, abs=6e-4)

    # Deterministic for a seed; plain sharpness on the inf ball is a different number.
    _, again = _run(capsys, base + ["--steps", "3", "--restarts", "1"])
    assert again["value"] == rep["value"] and again["losses"] == rep["losses"]
    _, plain = _run(capsys, base[:-1] + ["0.01", "--steps", "2", "--no-adaptive", "--p", "inf", "--max-batches", "1"])
    assert plain["measure"] == "sharpness (Eq. 2)" and plain["p"] == "inf" and plain["num_batches"] == 1
    assert plain["num_sentences"] < 24 and plain["value"] > 0
    # --batch-seed: the same batches in a seeded random order, so one batch is another sample of the split.
    _, first = _run(capsys, base + ["--steps", "1", "--max-batches", "1"])
    _, shuffled = _run(capsys, base + ["--steps", "1", "--max-batches", "1", "--batch-seed", "1"])
    _, again = _run(capsys, base + ["--steps", "1", "--max-batches", "1", "--batch-seed", "1"])
    assert first["batch_seed"] is None and shuffled["batch_seed"] == 1 and again == shuffled | {"seconds": again["seconds"]}
    assert (shuffled["num_sentences"], shuffled["loss"]) != (first["num_sentences"], first["loss"])


def test_vision_checkpoint(vision_run, tmp_path, capsys):
    ckpt = vision_run / "checkpoint_last.pt"
    out_json = tmp_path / "v.json"
    argv = ["vision", str(ckpt), "--split", "test", "--batch-size", "16", "--rho", "0.5", "--steps", "2",
            "--normalization", "filter", "--device", "cpu", "--out", str(out_json)]  # fmt: skip
    text, rep = _run(capsys, argv)
    assert json.loads(out_json.read_text()) == rep
    assert rep["model"] == "resnet8" and rep["num_examples"] == 40 and rep["num_batches"] == 3
    assert rep["normalization"] == "filter" and rep["value"] > 0
    # The loss at w is the test loss the training run itself logged for its last epoch (on the CPU, as here).
    logged = json.loads((vision_run / "metrics.json").read_text())[-1]["test_loss"]
    assert rep["loss"] == pytest.approx(logged, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    "argv, needle",
    [
        (["fairseq", "{ckpt}", "--rho", "-1"], "--rho must be > 0, got -1"),
        (["fairseq", "{ckpt}", "--rho", "0.1", "--steps", "-3"], "--steps must be >= 0"),
        (["fairseq", "{ckpt}", "--rho", "0.1", "--batch-seed", "-1"], "--batch-seed must be >= 0"),
        (["fairseq", "{ckpt}", "--rho", "0.1", "--p", "3"], "--p"),
        (["fairseq", "{ckpt}"], "--rho"),
        (["fairseq", "/no/such/checkpoint.pt", "--rho", "0.1"], "checkpoint: no file"),
        (["fairseq", "{ckpt}", "--rho", "0.1", "--split", "nosuch", "--data", "{data}"], "--split nosuch"),
        (["fairseq", "{ckpt}", "--rho", "0.1", "--data", "/no/such/dir"], "--data /no/such/dir"),
        (["vision", "{ckpt}", "--rho", "0.1", "--split", "valid"], "--split"),
    ],
)
def test_bad_input(fairseq_ckpt, tmp_path, capsys, argv, needle):
    data, ckpt = fairseq_ckpt
    out_json = tmp_path / "never.json"
    argv = [a.format(ckpt=ckpt, data=data) for a in argv] + ["--out", str(out_json)]
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err
    assert not out_json.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: compares the measure on CUDA with the CPU")
def test_vision_checkpoint_cuda_matches_cpu(vision_run, capsys):
    # The measure switches TF32 off, so a CUDA measurement of a conv net agrees with the CPU one to fp32 noise;
    # with TF32 convolutions the loss alone differed by about 1e-3 relative.
    argv = ["vision", str(vision_run / "checkpoint_last.pt"), "--split", "test", "--batch-size", "16", "--rho", "0.5",
            "--steps", "2", "--normalization", "filter"]  # fmt: skip
    _, cpu = _run(capsys, [*argv, "--device", "cpu"])
    tf32 = torch.backends.cudnn.allow_tf32
    _, cuda = _run(capsys, [*argv, "--device", "cuda"])
    assert torch.backends.cudnn.allow_tf32 == tf32  # the caller's setting is back
    assert cuda["device"].startswith("cuda")
    assert cuda["loss"] == pytest.approx(cpu["loss"], rel=1e-5)
    assert cuda["max_loss"] == pytest.approx(cpu["max_loss"], rel=1e-5)
    assert cuda["value"] == pytest.approx(cpu["value"], rel=1e-2, abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fairseq", "vision"])
def test_streamed_split_equals_the_materialized_split(fairseq_ckpt, vision_run, kind, capsys):
    # The tool streams the split (each pass re-reads it, one batch on the device at a time); measuring
    # on the same batches held in a list, as the tool did before, gives the same numbers exactly.
    data, ckpt = fairseq_ckpt
    if kind == "fairseq":
        argv = ["fairseq", str(ckpt), "--data", str(data), "--max-tokens", "100", "--rho", "0.5", "--steps", "2"]
        loader = load_fairseq
    else:
        argv = ["vision", str(vision_run / "checkpoint_last.pt"), "--batch-size", "16", "--rho", "0.5", "--steps", "2"]
        loader = load_vision
    _, rep = _run(capsys, argv)
    args = build_parser().parse_args(argv)
    model, loss_fn, batches, _ = loader(args, torch.device("cpu"))
    materialized = list(batches)
    assert len(materialized) == rep["num_batches"] > 1
    r = measure_sharpness(model, loss_fn, materialized, rho=0.5, steps=2, normalization="element")
    assert r.value == rep["value"] and r.loss == rep["loss"] and r.losses == rep["losses"]


def test_progress_bar_counts_batches(vision_run, capsys):
    argv = ["vision", str(vision_run / "checkpoint_last.pt"), "--batch-size", "16", "--rho", "0.5", "--steps", "2"]
    assert cli_main(argv) == 0
    err = capsys.readouterr().err
    # 3 batches x (1 unperturbed + 3 points of the one start) evaluations.
    assert "asam-sharpness" in err and "12/12" in err, err
    assert cli_main(argv + ["--no-progress"]) == 0
    assert "asam-sharpness" not in capsys.readouterr().err
