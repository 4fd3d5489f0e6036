"""Experiment tracking with the `tracking` extra: TensorBoard event files from a real fairseq-train run with
asam_adam, and TensorBoard / W&B (offline) records from asam-vision-train, read back and checked."""

from __future__ import annotations

import json
import os

import fairseq_helpers as fh
import pytest

from fairseq_asam.vision import train as vtrain
from fairseq_asam.vision.toydata import write_cifar

pytest.importorskip("tensorboard")


def _scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from the event files of one TensorBoard run directory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_fairseq_tensorboard_logdir_gets_the_sharpness_metrics(tmp_path):
    data = fh.make_tiny_corpus(tmp_path / "corpus")
    tb = tmp_path / "tb"
    proc = fh.run_fairseq("train", fh.tiny_train_args(
        data, tmp_path / "ckpt", "--task", "translation_sam", "--optimizer", "asam_adam", "--asam-rho", "0.2",
        "--max-update", "5", "--no-save", "--tensorboard-logdir", str(tb)))
    logged = fh.train_logs(proc)  # --log-format json, --log-interval 1: one record per update
    assert len(logged) == 5
    tags = _scalars(tb / "train_inner")
    for tag in ("loss", "loss_eps", "sharpness", "eps_norm"):
        assert [s for s, _ in tags[tag]] == [1, 2, 3, 4, 5], (tag, tags[tag])
        # The same numbers as fairseq's own JSON log (which prints them to 3 decimals).
        for (_, v), rec in zip(tags[tag], logged):
            assert v == pytest.approx(float(rec[tag]), abs=1.5e-3), (tag, v, rec[tag])
    for (_, loss), (_, loss_eps), (_, sharp), (_, eps) in zip(tags["loss"], tags["loss_eps"], tags["sharpness"],
                                                            tags["eps_norm"]):
        assert sharp == pytest.approx(loss_eps - loss, abs=2e-3)
        assert eps > 0


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar(str(root), "cifar10", n_train=64, n_test=50, seed=0)
    return str(root)


VISION = ["--dataset", "cifar10", "--model", "resnet8", "--batch-size", "32", "--workers", "0", "--no-progress",
          "--test-batch-size", "50", "--epochs", "2", "--minimizer", "asam", "--device", "cpu"]


@pytest.mark.slow
def test_vision_tensorboard_logs_every_epoch_metric_and_images_per_second(cifar_dir, tmp_path):
    run = tmp_path / "run-tb"
    assert vtrain.cli_main([*VISION, "--data-dir", cifar_dir, "--run-dir", str(run),
                            "--tensorboard-logdir", str(tmp_path / "tb")]) == 0
    hist = json.loads((run / "metrics.json").read_text())
    assert all(h["images_per_s"] > 0 for h in hist)
    # 64 training images per epoch in train_s seconds; time_s adds the evaluation on top.
    assert all(64 / h["images_per_s"] <= h["time_s"] + 0.05 for h in hist)
    assert "img/s" in (run / "train.log").read_text()
    tags = _scalars(tmp_path / "tb" / "run-tb")
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "test_top5", "lr", "eps_norm", "images_per_s"):
        assert tags[key] == [(h["epoch"], pytest.approx(h[key], rel=1e-6)) for h in hist], key


def _wandb_history(run_file) -> list[dict]:
    """The history rows of an offline W&B run file.

    The file is a LevelDB-style log (a 7-byte header, then 32 KiB blocks of records: crc32 u32,
    length u16, type u8 = full/first/middle/last) of wandb's protobuf ``Record`` messages; current
    wandb reads it in its Go core only, so the test reads it here.
    """
    import struct

    from wandb.proto import wandb_internal_pb2

    buf = run_file.read_bytes()
    assert buf[:4] == b":W&B"
    block, pos, records, part = 32768, 7, [], b""
    while pos + 7 <= len(buf):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a record header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", buf[pos : pos + 7])
        data, pos = buf[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            records.append(data)
        elif kind in (2, 3):
            part = (b"" if kind == 2 else part) + data
        elif kind == 4:
            records.append(part + data)
    rows = []
    for data in records:
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(data)
        if rec.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
    return rows


@pytest.mark.slow
def test_vision_wandb_offline_logs_the_same_records(cifar_dir, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run-wb"
    assert vtrain.cli_main([*VISION, "--data-dir", cifar_dir, "--run-dir", str(run), "--wandb-project", "asam-test"]) == 0
    assert wandb.run is None  # finished: a second run in this process starts clean
    wandb.teardown()  # wandb's background service writes the run file out when it stops
    hist = json.loads((run / "metrics.json").read_text())
    (run_file,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    rows = _wandb_history(run_file)
    assert [r["_step"] for r in rows] == [1, 2]
    for row, h in zip(rows, hist):
        for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "eps_norm", "images_per_s"):
            assert row[key] == pytest.approx(h[key], rel=1e-9), key


@pytest.mark.slow
def test_fairseq_wandb_project_offline_gets_the_sharpness_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))  # run_fairseq's child process inherits the environment
    data = fh.make_tiny_corpus(tmp_path / "corpus")
    proc = fh.run_fairseq("train", fh.tiny_train_args(
        data, tmp_path / "ckpt", "--task", "translation_sam", "--optimizer", "sam_adam", "--asam-rho", "0.05",
        "--max-update", "3", "--no-save", "--wandb-project", "asam-test"))
    logged = fh.train_logs(proc)
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")  # written when the process exits
    by_step: dict[int, dict] = {}
    for row in _wandb_history(run_file):
        by_step.setdefault(row["_step"], {}).update(row)
    for step, rec in zip((1, 2, 3), logged):
        row = by_step[step]
        for key in ("loss", "loss_eps", "sharpness"):
            assert row[f"train_inner/{key}"] == pytest.approx(float(rec[key]), abs=1.5e-3), key
        # SAM with p = 2: ||eps||_2 is rho, every update.
        assert row["train_inner/eps_norm"] == pytest.approx(0.05, rel=1e-3)


def test_missing_tracker_package_is_a_clear_error(cifar_dir, tmp_path, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(SystemExit) as e:
        vtrain.cli_main([*VISION, "--data-dir", cifar_dir, "--run-dir", str(tmp_path / "r"), "--wandb-project", "x"])
    assert e.value.code == 2
    assert "--wandb-project needs the wandb package" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "r" / "checkpoint_last.pt")
