"""Datasets and deterministic loaders for the training driver.

``load_dataset(name="digits", data_dir=None, upscale=None) -> Splits``

* ``"digits"`` (default): scikit-learn's bundled ``load_digits()`` — 1,797 real 8x8
  grey-scale images of 10 digits, no download.  Pixels scaled to [0, 1], then normalised
  with the train split's mean and std; labels int64.  A FIXED stratified 60/20/20 split
  into train / val (for model selection and search) / test, made with
  ``train_test_split(stratify=..., random_state=0)``: identical on every call and
  machine, independent of the user's seed.
* ``"cifar10"`` / ``"cifar100"``: read from a local directory only, never downloaded.
  ``data_dir`` must hold the standard python-pickle release (``cifar-10-batches-py/`` or
  ``cifar-100-python/``, exactly what ``torchvision.datasets.CIFAR10(root, download=True)``
  leaves there, or the extracted ``cifar-10-python.tar.gz`` from
  https://www.cs.toronto.edu/~kriz/cifar.html).  The files are read directly with
  ``pickle`` and numpy, so torchvision is not needed.  Standard per-channel normalisation
  and train augmentation (random crop with 4-pixel zero padding + horizontal flip,
  drawn from torch's global RNG); val = a fixed stratified 5,000-image slice of the train
  set (not augmented), test = the official test set.
* ``upscale=S`` resizes every image to SxS (bilinear), e.g. digits at 32x32 for a
  CIFAR-sized ResNet run when CIFAR is absent.

``make_loaders(splits, batch_size, seed, num_workers=0, distributed=False) -> Loaders``:
the train loader shuffles with a ``torch.Generator`` re-seeded from (seed, epoch) by
``Loaders.set_epoch`` (a ``DistributedSampler`` seeded with `seed` when distributed), so
the data order of epoch e does not depend on what ran before: a resumed run sees the
same batches as an uninterrupted one.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

DATASETS = ("digits", "cifar10", "cifar100")
SPLIT_SEED = 0  # the fixed split; never the user's seed

CIFAR_MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)}
CIFAR_STD = {"cifar10": (0.2470, 0.2435, 0.2616), "cifar100": (0.2673, 0.2564, 0.2762)}
_CIFAR_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
_CIFAR_FILES = {"cifar10": ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
                "cifar100": (["train"], ["test"], b"fine_labels")}


@dataclass
class Splits:
    """train / val / test datasets of (image float32 (C, H, W), label int64) pairs."""
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int
    name: str = "digits"
    mean: tuple = ()
    std: tuple = ()

    def sizes(self) -> dict:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def _sklearn_split():
    try:
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover
        raise ImportError("shiftadd.data needs scikit-learn (pip install scikit-learn, or shiftadd[nas])") from e
    return train_test_split


def stratified_split(labels: np.ndarray, fractions=(0.6, 0.2, 0.2)):
    """Indices (train, val, test) of a fixed stratified split (random_state 0), sorted."""
    train_test_split = _sklearn_split()
    labels = np.asarray(labels)
    idx = np.arange(len(labels))
    f_train, f_val, f_test = fractions
    rest, test = train_test_split(idx, test_size=f_test, stratify=labels, random_state=SPLIT_SEED)
    train, val = train_test_split(rest, test_size=f_val / (f_train + f_val), stratify=labels[rest],
                                  random_state=SPLIT_SEED)
    return np.sort(train), np.sort(val), np.sort(test)


def _resize(x: torch.Tensor, size: Optional[int]) -> torch.Tensor:
    if size is None or x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def load_digits_splits(upscale: Optional[int] = None) -> Splits:
    """scikit-learn digits as :class:`Splits` (see the module docstring)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover
        raise ImportError("the digits dataset needs scikit-learn (pip install scikit-learn)") from e
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    y = torch.tensor(d.target, dtype=torch.int64)
    x = _resize(x, upscale)
    tr, va, te = (torch.from_numpy(i) for i in stratified_split(d.target))
    mean, std = x[tr].mean().item(), x[tr].std().item()
    x = (x - mean) / std
    return Splits(TensorDataset(x[tr], y[tr]), TensorDataset(x[va], y[va]), TensorDataset(x[te], y[te]),
                  num_classes=10, in_channels=1, image_size=x.shape[-1], name="digits", mean=(mean,), std=(std,))


class CifarTensors(Dataset):
    """Uint8 CIFAR images (N, 3, 32, 32) + labels, normalised per channel on access;
    ``augment``: random 4-pixel-padded crop and horizontal flip (torch's global RNG)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std, augment: bool,
                 upscale: Optional[int] = None):
        self.images, self.labels, self.augment, self.upscale = images, labels, augment, upscale
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self._padded = F.pad(images, (4, 4, 4, 4)) if augment else None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        if self.augment:
            ij = torch.randint(0, 9, (2,))
            r, c = int(ij[0]), int(ij[1])
            img = self._padded[i, :, r:r + 32, c:c + 32]
            if torch.rand(()) < 0.5:
                img = img.flip(-1)
        else:
            img = self.images[i]
        x = (img.float() / 255.0 - self.mean) / self.std
        if self.upscale is not None and self.upscale != 32:
            x = _resize(x.unsqueeze(0), self.upscale).squeeze(0)
        return x, self.labels[i]


def _read_cifar(name: str, data_dir) -> tuple:
    if data_dir is None:
        raise FileNotFoundError(
            f"{name} needs --data-dir: a local directory holding {_CIFAR_DIRS[name]}/ (the python version from "
            "https://www.cs.toronto.edu/~kriz/cifar.html, extracted, or what torchvision.datasets."
            f"{name.upper()}(root, download=True) leaves in root). Nothing is downloaded.")
    root = os.path.join(os.fspath(data_dir), _CIFAR_DIRS[name])
    train_files, test_files, key = _CIFAR_FILES[name]
    missing = [f for f in train_files + test_files if not os.path.isfile(os.path.join(root, f))]
    if missing:
        raise FileNotFoundError(
            f"{name} not found in data directory {os.fspath(data_dir)!r}: expected {root}/ with "
            f"{', '.join(train_files + test_files)} (missing: {', '.join(missing)}). Get the python version "
            f"from https://www.cs.toronto.edu/~kriz/cifar.html and extract it there (or run torchvision.datasets."
            f"{name.upper()}(root={os.fspath(data_dir)!r}, download=True) on a machine with internet). "
            "shiftadd never downloads data.")

    def read(files):
        xs, ys = [], []
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                entry = pickle.load(fh, encoding="bytes")
            xs.append(np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(entry[key], dtype=np.int64))
        return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))

    return read(train_files), read(test_files)


def load_cifar_splits(name: str, data_dir, upscale: Optional[int] = None, val_size: int = 5000) -> Splits:
    """CIFAR-10/100 from `data_dir` as :class:`Splits` (see the module docstring)."""
    (xtr, ytr), (xte, yte) = _read_cifar(name, data_dir)
    train_test_split = _sklearn_split()
    idx = np.arange(len(ytr))
    tr, va = train_test_split(idx, test_size=val_size, stratify=ytr.numpy(), random_state=SPLIT_SEED)
    tr, va = torch.from_numpy(np.sort(tr)), torch.from_numpy(np.sort(va))
    mean, std = CIFAR_MEAN[name], CIFAR_STD[name]
    nc = 10 if name == "cifar10" else 100
    return Splits(CifarTensors(xtr[tr], ytr[tr], mean, std, True, upscale),
                  CifarTensors(xtr[va], ytr[va], mean, std, False, upscale),
                  CifarTensors(xte, yte, mean, std, False, upscale),
                  num_classes=nc, in_channels=3, image_size=upscale or 32, name=name, mean=mean, std=std)


def load_dataset(name: str = "digits", data_dir=None, upscale: Optional[int] = None) -> Splits:
    """Load `name` (one of :data:`DATASETS`) as train / val / test :class:`Splits`."""
    if upscale is not None and (not isinstance(upscale, int) or upscale < 1):
        raise ValueError(f"upscale must be a positive int or None, got {upscale!r}")
    if name == "digits":
        return load_digits_splits(upscale)
    if name in ("cifar10", "cifar100"):
        return load_cifar_splits(name, data_dir, upscale)
    raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}")


@dataclass
class Loaders:
    """train / val / test DataLoaders.  Call ``set_epoch(e)`` before each training epoch."""
    train: DataLoader
    val: DataLoader
    test: DataLoader
    seed: int
    generator: torch.Generator
    sampler: Optional[object] = None
    rank: int = 0
    world: int = 1

    def set_epoch(self, epoch: int) -> None:
        """Fix the data order (and worker seeds) of `epoch` from (seed, epoch, rank)."""
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        self.generator.manual_seed(epoch_seed(self.seed, epoch, self.rank))


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A 63-bit seed derived from (seed, epoch, rank)."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(rank)])
    return int(ss.generate_state(1, dtype=np.uint64)[0]) & ((1 << 63) - 1)


def _shard(ds: Dataset, rank: int, world: int) -> Dataset:
    return Subset(ds, list(range(rank, len(ds), world))) if world > 1 else ds


def make_loaders(splits: Splits, batch_size: int, seed: int, num_workers: int = 0, distributed: bool = False,
                 eval_batch_size: Optional[int] = None, pin_memory: bool = False) -> Loaders:
    """Deterministic loaders.  Train: shuffled with a seeded generator (or a seeded
    DistributedSampler when `distributed`, giving each rank batch_size samples per step);
    val / test: in order, and when `distributed` each rank gets the disjoint shard
    ``range(rank, N, world)`` (reduce the sums across ranks; nothing is padded or repeated)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    eval_bs = eval_batch_size or max(batch_size, 256)
    common = dict(num_workers=num_workers, pin_memory=pin_memory, persistent_workers=False)
    rank, world = 0, 1
    if distributed:
        import torch.distributed as dist

        rank, world = dist.get_rank(), dist.get_world_size()
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(splits.train, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    else:
        sampler = None
    gen = torch.Generator()
    gen.manual_seed(epoch_seed(seed, 0, rank))
    train = DataLoader(splits.train, batch_size=batch_size, shuffle=sampler is None, sampler=sampler,
                       generator=gen, **common)
    val = DataLoader(_shard(splits.val, rank, world), batch_size=eval_bs, shuffle=False, **common)
    test = DataLoader(_shard(splits.test, rank, world), batch_size=eval_bs, shuffle=False, **common)
    return Loaders(train, val, test, seed=seed, generator=gen, sampler=sampler, rank=rank, world=world)
