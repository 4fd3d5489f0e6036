"""Data for the torchvision entry point: CIFAR-10/100 and ImageNet (paper Section 5.2), label noise (Section 5.4).

CIFAR is read from ``<data-dir>/cifar-10-batches-py`` or ``<data-dir>/cifar-100-python`` (the python
pickle batches of the official release). When every file's MD5 sum is the official one, torchvision's
own CIFAR10/CIFAR100 classes load them. When the files are there but their sums differ (a re-pickled
copy, a subset, files written by a test), :class:`CifarPickle` reads the same pickle format itself and
a log line says so. Downloads always go through torchvision, which checks the archive's MD5 sum: that
check is never skipped. ImageNet is an ImageFolder tree ``<data-dir>/train/<class>/*`` and
``<data-dir>/val/<class>/*``.

    python -c "from fairseq_asam.vision.data import build_eval_dataset; \
print(len(build_eval_dataset({'dataset': 'cifar10', 'data_dir': 'data'}, 'test')))"
"""

from __future__ import annotations

import logging
import os
import pickle

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

logger = logging.getLogger("fairseq_asam.vision")

__all__ = [
    "DATASETS",
    "CifarPickle",
    "NoisyLabels",
    "build_eval_dataset",
    "build_train_dataset",
    "load_cifar",
    "symmetric_label_noise",
]

DATASETS = ("cifar10", "cifar100", "imagenet")

# Per-channel mean and std of the training images (the usual values, computed on the official sets).
_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


class CifarPickle(Dataset):
    """The CIFAR python-pickle batches read directly, exactly as torchvision reads them, without MD5 checks.

    Holds ``data`` (uint8, N x 32 x 32 x 3), ``targets`` (list of int) and ``classes`` like
    torchvision's CIFAR10, so the rest of the code does not care which of the two loaded the files.
    """

    def __init__(self, folder: str, files: list[str], meta_file: str, meta_key: str, transform=None):
        data, targets = [], []
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="latin1")  # the official files are Python 2 pickles
            if "data" not in entry or not ("labels" in entry or "fine_labels" in entry):
                raise ValueError(f"{path} is not a CIFAR batch: it has no 'data' and 'labels'/'fine_labels'")
            arr = np.asarray(entry["data"], dtype=np.uint8)
            if arr.ndim != 2 or arr.shape[1] != 3 * 32 * 32:
                raise ValueError(f"{path}: 'data' must be N x 3072 uint8 (3 x 32 x 32, channel-major), got {arr.shape}")
            labels = entry["labels"] if "labels" in entry else entry["fine_labels"]
            if len(labels) != len(arr):
                raise ValueError(f"{path}: {len(arr)} images but {len(labels)} labels")
            data.append(arr)
            targets.extend(int(t) for t in labels)
        self.data = np.vstack(data).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()
        self.targets = targets
        meta_path = os.path.join(folder, meta_file)
        self.classes = None
        if os.path.exists(meta_path):
            with open(meta_path, "rb") as f:
                self.classes = list(pickle.load(f, encoding="latin1").get(meta_key, [])) or None
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        img = Image.fromarray(self.data[i])
        return (self.transform(img) if self.transform is not None else img), self.targets[i]


def _cifar_class(dataset: str):
    import torchvision

    return torchvision.datasets.CIFAR10 if dataset == "cifar10" else torchvision.datasets.CIFAR100


def load_cifar(dataset: str, data_dir: str, train: bool, transform=None, download: bool = False) -> Dataset:
    """CIFAR-10/100 from ``data_dir`` (see the module docstring for the rule on MD5 sums)."""
    from torchvision.datasets.utils import check_integrity

    cls = _cifar_class(dataset)
    folder = os.path.join(data_dir, cls.base_folder)
    files = cls.train_list + cls.test_list
    present = all(os.path.isfile(os.path.join(folder, name)) for name, _ in files)
    if not present:
        if not download:
            raise FileNotFoundError(
                f"{dataset}: {folder} does not hold the CIFAR pickle files "
                f"({', '.join(n for n, _ in files)}); pass --download to fetch them, or --data-dir with them"
            )
        try:
            cls(data_dir, train=train, download=True)  # torchvision checks the archive's MD5 sum
        except Exception as e:  # noqa: BLE001  (URLError, checksum failures: say what to do)
            raise RuntimeError(
                f"{dataset}: could not download into {data_dir} ({type(e).__name__}: {e}); put the official "
                f"{cls.base_folder} files there, or run where the internet can be reached"
            ) from e
    verified = all(check_integrity(os.path.join(folder, n), md5) for n, md5 in files)
    verified = verified and check_integrity(os.path.join(folder, cls.meta["filename"]), cls.meta["md5"])
    if verified:
        return cls(data_dir, train=train, transform=transform, download=False)
    names = [n for n, _ in (cls.train_list if train else cls.test_list)]
    logger.warning(
        "%s: the files in %s do not have the MD5 sums of the official release; reading the %s pickle "
        "batch(es) %s directly (not verified)",
        dataset, folder, "train" if train else "test", ", ".join(names),
    )
    return CifarPickle(folder, names, cls.meta["filename"], cls.meta["key"], transform=transform)


def symmetric_label_noise(targets, rate: float, num_classes: int, seed: int) -> tuple[list[int], int]:
    """Symmetric label noise (van Rooyen et al. 2015; paper Section 5.4, Table 6).

    round(rate * N) examples, chosen uniformly at random, get a label drawn uniformly from the
    *other* num_classes - 1 classes, so the fraction of wrong labels is the noise rate. The same seed
    gives the same labels on every run and every rank. Returns (new targets, number corrupted).
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"label noise rate must be in [0, 1), got {rate}")
    y = np.asarray(targets, dtype=np.int64).copy()
    if rate == 0.0:
        return y.tolist(), 0
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x4E015E]))  # independent of the training RNG
    n = int(round(rate * len(y)))
    idx = rng.choice(len(y), size=n, replace=False)
    shift = rng.integers(1, num_classes, size=n)  # 1..C-1: never the original class
    y[idx] = (y[idx] + shift) % num_classes
    return y.tolist(), int((y != np.asarray(targets)).sum())


class NoisyLabels(Dataset):
    """A dataset with its labels replaced (the images and transform are the wrapped dataset's)."""

    def __init__(self, base: Dataset, targets: list[int]):
        if len(targets) != len(base):
            raise ValueError(f"{len(targets)} labels for {len(base)} examples")
        self.base, self.targets = base, targets

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        return self.base[i][0], self.targets[i]


def _transforms(dataset: str, train: bool, autoaugment: bool = False):
    from torchvision import transforms as T

    mean, std = _STATS[dataset]
    if dataset == "imagenet":
        if train:
            aug = [T.RandomResizedCrop(224), T.RandomHorizontalFlip()]
        else:
            aug = [T.Resize(256), T.CenterCrop(224)]
    else:
        # Section 5.2: padding by four pixels + random crop, horizontal flip, per-channel normalization.
        aug = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if train else []
    if train and autoaugment:
        # PyramidNet-272 row (Section 5.2): AutoAugment's learned CIFAR-10 policy (used for CIFAR-100 too, as
        # by Cubuk et al. and Foret et al.), on the PIL image after crop and flip, before normalization.
        policy = T.AutoAugmentPolicy.IMAGENET if dataset == "imagenet" else T.AutoAugmentPolicy.CIFAR10
        aug.append(T.AutoAugment(policy))
    return T.Compose(aug + [T.ToTensor(), T.Normalize(mean, std)])


def _imagenet(data_dir: str, split: str, transform):
    from torchvision.datasets import ImageFolder

    root = os.path.join(data_dir, split)
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"imagenet: {root} is not a folder; --data-dir must hold train/<class>/*.JPEG and val/<class>/*.JPEG"
        )
    return ImageFolder(root, transform=transform)


def num_classes_of(dataset: str, ds: Dataset) -> int:
    if dataset == "cifar10":
        return 10
    if dataset == "cifar100":
        return 100
    return len(ds.classes)


def _check_dataset(name):
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")


def _base_dataset(dataset: str, data_dir: str, train: bool, transform, download: bool = False):
    if dataset == "imagenet":
        return _imagenet(data_dir, "train" if train else "val", transform)
    return load_cifar(dataset, data_dir, train=train, transform=transform, download=download)


def _targets(ds) -> list[int]:
    return list(ds.targets)


def _apply_noise(ds, dataset: str, rate: float, seed: int):
    if not rate:
        return ds, 0
    noisy, n = symmetric_label_noise(_targets(ds), rate, num_classes_of(dataset, ds), seed)
    return NoisyLabels(ds, noisy), n


def build_train_dataset(args: dict, download: bool = False):
    """(training set with the training transform and label noise, number of labels corrupted).

    ``args["autoaugment"]`` adds AutoAugment to the training transform.
    """
    _check_dataset(args["dataset"])
    transform = _transforms(args["dataset"], True, bool(args.get("autoaugment")))
    ds = _base_dataset(args["dataset"], args["data_dir"], True, transform, download)
    return _apply_noise(ds, args["dataset"], float(args.get("label_noise") or 0.0), int(args.get("seed", 0)))


def build_eval_dataset(args_dict: dict, split: str, data_dir: str | None = None, *, label_noise: bool = True):
    """A dataset with the test-time transform (no augmentation) for ``split`` "train" or "test".

    ``args_dict`` is a run's args.json (or a checkpoint's args): dataset, data_dir, seed, label_noise.
    For "train" the labels are the ones the run trained on (its label noise, same seed) unless
    ``label_noise=False``; "test" is never corrupted. For ImageNet, "test" is the val/ folder.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    dataset = args_dict.get("dataset")
    _check_dataset(dataset)
    root = data_dir if data_dir is not None else args_dict.get("data_dir")
    if not root:
        raise ValueError("no data directory: pass data_dir=, or an args dict with 'data_dir'")
    train = split == "train"
    ds = _base_dataset(dataset, root, train, _transforms(dataset, False))
    if train and label_noise:
        ds, _ = _apply_noise(ds, dataset, float(args_dict.get("label_noise") or 0.0), int(args_dict.get("seed", 0)))
    return ds


def default_num_workers() -> int:
    return min(8, max(0, (os.cpu_count() or 1) - 1))


def seed_worker(worker_id: int) -> None:  # noqa: ARG001
    # numpy/random in workers follow torch's per-worker seed (set from the loader's generator).
    import random

    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)
