"""Small learnable data sets in the real on-disk formats: CIFAR python pickles and an ImageFolder tree.

For smoke runs and tests where the real data cannot be downloaded. The files are byte-for-byte in
the official format (Python pickles of dicts with 'data' N x 3072 uint8 channel-major and 'labels' /
'fine_labels'), but their MD5 sums are not the official ones, so the loader reads them directly
(see :mod:`fairseq_asam.vision.data`). Each class is a colour plus noise, so a few epochs learn it.

    python -m fairseq_asam.vision.toydata --dataset cifar10 --out data-toy --train 512 --test 256
"""

from __future__ import annotations

import argparse
import os
import pickle

import numpy as np

__all__ = ["class_images", "write_cifar", "write_imagefolder"]


def class_images(labels: np.ndarray, num_classes: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """uint8 images N x size x size x 3: a per-class colour (spread over the RGB cube) plus noise."""
    hues = np.linspace(0, 1, num_classes, endpoint=False)
    base = np.stack([0.5 + 0.4 * np.cos(2 * np.pi * (hues + k / 3)) for k in range(3)], 1)  # C x 3 in [0.1, 0.9]
    img = base[labels][:, None, None, :] + rng.normal(0, 0.08, size=(len(labels), size, size, 3))
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def _dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the official files are protocol-2 Python 2 pickles


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
    xtr = class_images(ytr, nc, rng).transpose(0, 3, 1, 2).reshape(n_train, -1)  # channel-major rows
    xte = class_images(yte, nc, rng).transpose(0, 3, 1, 2).reshape(n_test, -1)
    if dataset == "cifar10":
        folder = os.path.join(root, "cifar-10-batches-py")
        os.makedirs(folder, exist_ok=True)
        for i, idx in enumerate(np.array_split(np.arange(n_train), 5)):
            _dump(os.path.join(folder, f"data_batch_{i + 1}"),
                  {"batch_label": f"training batch {i + 1} of 5", "labels": ytr[idx].tolist(),
                   "data": xtr[idx], "filenames": [f"img_{j}.png" for j in idx]})
        _dump(os.path.join(folder, "test_batch"),
              {"batch_label": "testing batch 1 of 1", "labels": yte.tolist(), "data": xte,
               "filenames": [f"test_{j}.png" for j in range(n_test)]})
        _dump(os.path.join(folder, "batches.meta"),
              {"label_names": [f"class{c}" for c in range(nc)], "num_cases_per_batch": n_train // 5, "num_vis": 3072})
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
    p.add_argument("--dataset", choices=("cifar10", "cifar100"), default="cifar10")
    p.add_argument("--out", required=True, help="the --data-dir to write into")
    p.add_argument("--train", type=int, default=500)
    p.add_argument("--test", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        print(write_cifar(a.out, a.dataset, a.train, a.test, a.seed))
    except ValueError as e:
        p.error(str(e))


if __name__ == "__main__":
    main()
