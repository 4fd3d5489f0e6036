"""CIFAR pickles (MD5 fallback), ImageFolder, symmetric label noise, build_eval_dataset."""

import logging
import os
import pickle

import numpy as np
import pytest
import torch

from fairseq_asam.vision import data as vdata
from fairseq_asam.vision.toydata import write_cifar, write_cifar_digits, write_imagefolder


def _read(path):
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cifar_pickles_with_other_md5_are_read_with_a_log_line(tmp_path, caplog, dataset):
    folder = write_cifar(str(tmp_path), dataset, n_train=23, n_test=7, seed=3)
    with caplog.at_level(logging.WARNING, logger="fairseq_asam.vision"):
        train = vdata.load_cifar(dataset, str(tmp_path), train=True)
        test = vdata.load_cifar(dataset, str(tmp_path), train=False)
    assert "do not have the MD5 sums of the official release" in caplog.text
    assert isinstance(train, vdata.CifarPickle) and (len(train), len(test)) == (23, 7)
    # The same pixels and labels as in the files: rows are channel-major 3x32x32, images HWC.
    files = [f"data_batch_{i}" for i in range(1, 6)] if dataset == "cifar10" else ["train"]
    raw = [_read(os.path.join(folder, f)) for f in files]
    key = "labels" if dataset == "cifar10" else "fine_labels"
    rows = np.concatenate([r["data"] for r in raw])
    assert train.targets == sum((list(r[key]) for r in raw), [])
    assert np.array_equal(train.data[5], rows[5].reshape(3, 32, 32).transpose(1, 2, 0))
    img, label = train[5]
    assert np.array_equal(np.asarray(img), train.data[5]) and label == train.targets[5]
    assert len(train.classes) == (10 if dataset == "cifar10" else 100)


def test_cifar_missing_files_error_names_the_flags(tmp_path):
    with pytest.raises(FileNotFoundError, match="--download"):
        vdata.load_cifar("cifar10", str(tmp_path), train=True)


def test_cifar_file_that_is_not_a_batch(tmp_path):
    folder = write_cifar(str(tmp_path), "cifar10", n_train=10, n_test=2)
    with open(os.path.join(folder, "data_batch_2"), "wb") as f:
        pickle.dump({"foo": 1}, f)
    with pytest.raises(ValueError, match="data_batch_2 is not a CIFAR batch"):
        vdata.load_cifar("cifar10", str(tmp_path), train=True)


def test_eval_dataset_cifar_has_no_augmentation(tmp_path):
    write_cifar(str(tmp_path), "cifar10", n_train=10, n_test=4)
    ds = vdata.build_eval_dataset({"dataset": "cifar10", "data_dir": str(tmp_path)}, "test")
    a, b = ds[1][0], ds[1][0]
    assert a.shape == (3, 32, 32) and torch.equal(a, b)
    mean, std = vdata._STATS["cifar10"]
    raw = torch.from_numpy(ds.data[1]).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(a, (raw - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None])
    train_ds, _ = vdata.build_train_dataset({"dataset": "cifar10", "data_dir": str(tmp_path)})
    torch.manual_seed(0)
    crops = {tuple(train_ds[0][0].flatten()[:50].tolist()) for _ in range(8)}
    assert len(crops) > 1  # random crop + flip in training


def test_imagefolder(tmp_path):
    root = write_imagefolder(str(tmp_path), num_classes=3, per_class=2, size=40)
    args = {"dataset": "imagenet", "data_dir": root}
    val = vdata.build_eval_dataset(args, "test")
    train, n = vdata.build_train_dataset(args)
    assert (len(val), len(train), n) == (6, 6, 0)
    assert val.classes == ["n00000000", "n00000001", "n00000002"]
    x, y = val[3]
    assert x.shape == (3, 224, 224) and y == 1
    assert train[0][0].shape == (3, 224, 224)
    with pytest.raises(FileNotFoundError, match="train/<class>"):
        vdata.build_eval_dataset({"dataset": "imagenet", "data_dir": str(tmp_path / "nope")}, "test")


def test_symmetric_label_noise_fraction_and_reproducibility():
    y = np.random.default_rng(0).integers(0, 10, 1000).tolist()
    noisy, n = vdata.symmetric_label_noise(y, 0.4, 10, seed=7)
    assert n == 400 == sum(a != b for a, b in zip(y, noisy))
    again, _ = vdata.symmetric_label_noise(y, 0.4, 10, seed=7)
    other, _ = vdata.symmetric_label_noise(y, 0.4, 10, seed=8)
    assert again == noisy and other != noisy
    assert set(noisy) <= set(range(10))
    # Symmetric: the wrong labels spread over the other classes (each of 9 gets about 1/9 of them).
    shifts = np.bincount([(b - a) % 10 for a, b in zip(y, noisy) if a != b], minlength=10)
    assert shifts[0] == 0 and shifts[1:].min() > 20
    assert vdata.symmetric_label_noise(y, 0.0, 10, 0) == (y, 0)
    with pytest.raises(ValueError, match="label noise rate"):
        vdata.symmetric_label_noise(y, 1.0, 10, 0)


def test_eval_train_split_has_the_runs_noisy_labels(tmp_path):
    write_cifar(str(tmp_path), "cifar10", n_train=200, n_test=20)
    args = {"dataset": "cifar10", "data_dir": str(tmp_path), "label_noise": 0.2, "seed": 5}
    train, n = vdata.build_train_dataset(args)
    assert n == 40
    ev = vdata.build_eval_dataset(args, "train")
    clean = vdata.build_eval_dataset(args, "train", label_noise=False)
    assert ev.targets == train.targets
    assert sum(a != b for a, b in zip(ev.targets, clean.targets)) == 40
    assert vdata.build_eval_dataset(args, "test").targets == vdata.load_cifar("cifar10", str(tmp_path), False).targets
    with pytest.raises(ValueError, match="split"):
        vdata.build_eval_dataset(args, "val")



def test_write_cifar_digits_is_the_cifar10_format_with_sklearns_digits(tmp_path):
    from sklearn.datasets import load_digits

    folder = write_cifar_digits(str(tmp_path / "a"), n_train=100, n_test=40, seed=1)
    assert sorted(os.listdir(folder)) == ["batches.meta", "data_batch_1", "data_batch_2", "data_batch_3",
                                          "data_batch_4", "data_batch_5", "test_batch"]
    train = vdata.load_cifar("cifar10", str(tmp_path / "a"), train=True)
    test = vdata.load_cifar("cifar10", str(tmp_path / "a"), train=False)
    assert (len(train), len(test)) == (100, 40) and train.classes == [str(c) for c in range(10)]
    assert train.data.shape == (100, 32, 32, 3) and train.data.dtype == np.uint8
    assert np.array_equal(train.data[..., 0], train.data[..., 2])  # grey in RGB
    # Real digits: each image is an 8x8 scan resized, so its 4x4 block means track the source pixels,
    # and the labels are the source's. Match every image to its source by that block mean.
    d = load_digits()
    src = d.images.reshape(len(d.images), -1) * 255.0 / 16.0
    blocks = train.data[..., 0].reshape(100, 8, 4, 8, 4).mean((2, 4)).reshape(100, -1)
    nearest = ((blocks[:, None, :] - src[None]) ** 2).sum(-1).argmin(1)
    assert np.array_equal(d.target[nearest], np.asarray(train.targets))
    assert len(set(nearest.tolist())) == 100
    # Deterministic from the seed, disjoint train/test, all 1797 by default with 360 held out.
    again = write_cifar_digits(str(tmp_path / "b"), n_train=100, n_test=40, seed=1)
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as fa, open(os.path.join(again, name), "rb") as fb:
            assert fa.read() == fb.read(), name
    rows_tr = {r.tobytes() for r in train.data}
    assert not rows_tr & {r.tobytes() for r in test.data}
    write_cifar_digits(str(tmp_path / "c"))
    full = vdata.load_cifar("cifar10", str(tmp_path / "c"), train=True)
    assert len(full) == 1437 and len(vdata.load_cifar("cifar10", str(tmp_path / "c"), train=False)) == 360
    with pytest.raises(ValueError, match=r"n_train must be in \[5, 1437\]"):
        write_cifar_digits(str(tmp_path / "d"), n_train=2000)
