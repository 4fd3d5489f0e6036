"""Small learnable data sets in the real on-disk formats: CIFAR python pickles and an ImageFolder tree.

For smoke runs and tests where the real data cannot be downloaded. The files are byte-for-byte in
the official format (Python pickles of dicts with 'data' N x 3072 uint8 channel-major and 'labels' /
'fine_labels'), but their MD5 sums are not the official ones, so the loader reads them directly
(see :mod:`fairseq_asam.vision.data`). Two sources:

* ``colors`` (default): each class is a colour plus noise, so a few epochs learn it (smoke tests);
* ``digits``: scikit-learn's bundled 1797 real handwritten digits (8x8, no download) resized to 32x32
  RGB, written as CIFAR-10 (:func:`write_cifar_digits`): small real images for laptop-scale studies
  such as the Figure 4 preset of ``scripts/figure4.py``.

    python -m fairseq_asam.vision.toydata --dataset cifar10 --out data-toy --train 512 --test 256
    python -m fairseq_asam.vision.toydata --source digits --out data-digits        # 1437 train / 360 test
"""

from __future__ import annotations

import argparse
import os
import pickle

import numpy as np

__all__ = ["class_images", "digits_images", "write_cifar", "write_cifar_digits", "write_imagefolder"]


def class_images(labels: np.ndarray, num_classes: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """uint8 images N x size x size x 3: a per-class colour (spread over the RGB cube) plus noise."""
    hues = np.linspace(0, 1, num_classes, endpoint=False)
    base = np.stack([0.5 + 0.4 * np.cos(2 * np.pi * (hues + k / 3)) for k in range(3)], 1)  # C x 3 in [0.1, 0.9]
    img = base[labels][:, None, None, :] + rng.normal(0, 0.08, size=(len(labels), size, size, 3))
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def _dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the official files are protocol-2 Python 2 pickles


def _write_cifar10_folder(folder: str, xtr, ytr, xte, yte, label_names) -> None:
    """The cifar-10-batches-py layout: 5 train batches + test_batch + batches.meta (rows channel-major)."""
    os.makedirs(folder, exist_ok=True)
    n_train, n_test = len(ytr), len(yte)
    for i, idx in enumerate(np.array_split(np.arange(n_train), 5)):
        _dump(os.path.join(folder, f"data_batch_{i + 1}"),
              {"batch_label": f"training batch {i + 1} of 5", "labels": ytr[idx].tolist(),
               "data": xtr[idx], "filenames": [f"img_{j}.png" for j in idx]})
    _dump(os.path.join(folder, "test_batch"),
          {"batch_label": "testing batch 1 of 1", "labels": yte.tolist(), "data": xte,
           "filenames": [f"test_{j}.png" for j in range(n_test)]})
    _dump(os.path.join(folder, "batches.meta"),
          {"label_names": list(label_names), "num_cases_per_batch": n_train // 5, "num_vis": 3072})


def _rows(images: np.ndarray) -> np.ndarray:
    """N x 32 x 32 x 3 uint8 -> N x 3072, channel-major, as the CIFAR pickles store them."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), -1))


def write_cifar(root: str, dataset: str = "cifar10", n_train: int = 500, n_test: int = 200, seed: int = 0) -> str:
    """Write cifar-10-batches-py/ (5 train batches + test_batch + batches.meta) or cifar-100-python/."""
    if dataset not in ("cifar10", "cifar100"):
        raise ValueError(f"dataset must be cifar10 or cifar100, got {dataset!r}")
    if n_train < 5 or n_test < 1:
        raise ValueError(f"need at least 5 training and 1 test image, got {n_train} and {n_test}")
    rng = np.random.default_rng(seed)
    nc = 10 if dataset == "cifar10" else 100
    ytr = rng.integers(0, nc, n_train)
    yte = rng.integers(0, nc, n_test)
    xtr = _rows(class_images(ytr, nc, rng))
    xte = _rows(class_images(yte, nc, rng))
    if dataset == "cifar10":
        folder = os.path.join(root, "cifar-10-batches-py")
        _write_cifar10_folder(folder, xtr, ytr, xte, yte, [f"class{c}" for c in range(nc)])
    else:
        folder = os.path.join(root, "cifar-100-python")
        os.makedirs(folder, exist_ok=True)
        for name, x, y in (("train", xtr, ytr), ("test", xte, yte)):
            _dump(os.path.join(folder, name), {"filenames": [f"{name}_{j}.png" for j in range(len(y))],
                                               "batch_label": f"{name} batch", "fine_labels": y.tolist(),
                                               "coarse_labels": (y // 5).tolist(), "data": x})
        _dump(os.path.join(folder, "meta"), {"fine_label_names": [f"class{c}" for c in range(nc)],
                                             "coarse_label_names": [f"super{c}" for c in range(20)]})
    return folder


DIGITS_TEST = 360  # default test split of the 1797 digits: 20%, the rest (1437) trains


def digits_images(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled handwritten digits (UCI optdigits test set: 1797 real 8x8 scans, 10 classes,
    no download) as uint8 N x 32 x 32 x 3 in a seed-fixed random order, and their labels.

    Each 8x8 image (grey levels 0..16) is scaled to 0..255 and resized to 32x32 with PIL's bilinear
    filter, then copied into the three channels: CIFAR-sized real images with real class structure.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    grey = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)  # 1797 x 8 x 8
    big = np.stack([np.asarray(Image.fromarray(g).resize((32, 32), Image.BILINEAR)) for g in grey])
    order = np.random.default_rng(seed).permutation(len(big))
    return np.repeat(big[order][..., None], 3, axis=3), d.target[order].astype(np.int64)


def write_cifar_digits(root: str, n_train: int | None = None, n_test: int | None = None, seed: int = 0) -> str:
    """Write <root>/cifar-10-batches-py/ holding scikit-learn's handwritten digits in the CIFAR-10 format.

    A train/test split of the 1797 digits, deterministic from ``seed``: the first ``n_test`` (default
    360) of a seeded permutation are the test set, the next ``n_train`` (default: all the others) the
    training set. Labels 0-9 are the digits; ``batches.meta`` names them "0".."9". Read it with
    ``asam-vision-train --dataset cifar10 --data-dir <root>``. Returns the folder written.
    """
    x, y = digits_images(seed)
    n_test = DIGITS_TEST if n_test is None else n_test
    if not 1 <= n_test <= len(y) - 5:
        raise ValueError(f"n_test must be in [1, {len(y) - 5}] (the digits have {len(y)} images), got {n_test}")
    avail = len(y) - n_test
    n_train = avail if n_train is None else n_train
    if not 5 <= n_train <= avail:
        raise ValueError(f"n_train must be in [5, {avail}] with n_test={n_test} ({len(y)} digits), got {n_train}")
    folder = os.path.join(root, "cifar-10-batches-py")
    _write_cifar10_folder(folder, _rows(x[n_test : n_test + n_train]), y[n_test : n_test + n_train],
                          _rows(x[:n_test]), y[:n_test], [str(c) for c in range(10)])
    return folder


def write_imagefolder(root: str, num_classes: int = 3, per_class: int = 4, size: int = 40, seed: int = 0) -> str:
    """root/train/<class>/*.png and root/val/<class>/*.png, as ImageFolder (ImageNet layout) reads them."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        labels = np.repeat(np.arange(num_classes), per_class)
        imgs = class_images(labels, num_classes, rng, size)
        for i, (img, c) in enumerate(zip(imgs, labels)):
            d = os.path.join(root, split, f"n{c:08d}")
            os.makedirs(d, exist_ok=True)
            Image.fromarray(img).save(os.path.join(d, f"{split}_{i}.png"))
    return root


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", choices=("colors", "digits"), default="colors",
                   help="colors: a colour per class plus noise; digits: scikit-learn's real handwritten digits")
    p.add_argument("--dataset", choices=("cifar10", "cifar100"), default="cifar10")
    p.add_argument("--out", required=True, help="the --data-dir to write into")
    p.add_argument("--train", type=int, default=None, help="default: 500 (colors), all but the test split (digits)")
    p.add_argument("--test", type=int, default=None, help=f"default: 200 (colors), {DIGITS_TEST} (digits)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        if a.source == "digits":
            if a.dataset != "cifar10":
                raise ValueError("--source digits has 10 classes: it writes --dataset cifar10 only")
            print(write_cifar_digits(a.out, a.train, a.test, a.seed))
        else:
            print(write_cifar(a.out, a.dataset, 500 if a.train is None else a.train,
                              200 if a.test is None else a.test, a.seed))
    except ValueError as e:
        p.error(str(e))


if __name__ == "__main__":
    main()
