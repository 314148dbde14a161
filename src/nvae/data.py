"""Data sets, all behind one interface: ``build_dataset(name, split, root)`` -> images in [0, 1].

Adding a data set is one function registered with :func:`register`. Every
data set yields float tensors (C, H, W) already at the model's input
resolution; quantisation to ``num_x_bits`` and MNIST's dynamic binarisation
happen in :func:`prepare_batch`, on every load.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

_REGISTRY: Dict[str, Callable[..., Dataset]] = {}


class DataError(ValueError):
    """Data that cannot be used as asked; the message names the problem and the fix."""


def register(name: str):
    """Decorator: make ``fn(split, root, download) -> Dataset`` available as data set ``name``."""
    def wrap(fn):
        _REGISTRY[name] = fn
        return fn
    return wrap


def available() -> list:
    return sorted(_REGISTRY)


def build_dataset(name: str, split: str = "train", root: Optional[str] = None, download: bool = False) -> Dataset:
    """The ``split`` ('train' or 'test') of data set ``name``, yielding (image,) in [0, 1]."""
    if name not in _REGISTRY:
        raise DataError(f"unknown data set {name!r}; choose one of {available()}")
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    return _REGISTRY[name](split=split, root=root, download=download)


def quantize(x: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Reduce 8-bit images in [0, 1] to ``num_bits`` (the official ``pre_process``)."""
    if num_bits == 8:
        return x
    return torch.floor(x * 255 / 2 ** (8 - num_bits)) / (2 ** num_bits - 1)


def prepare_batch(x: torch.Tensor, decoder: str, num_bits: int, generator: Optional[torch.Generator] = None):
    """What the model sees: binarised afresh (Bernoulli decoder) or quantised to ``num_bits``."""
    if decoder == "bernoulli":
        return torch.bernoulli(x, generator=generator)
    return quantize(x, num_bits)


# ------------------------------------------------------------------ data sets
@register("digits")
def _digits(split: str, root=None, download=False) -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 17 grey levels); the last
    297 images are the test split."""
    from sklearn.datasets import load_digits
    images = torch.from_numpy(load_digits().images).float().div(16.0).unsqueeze(1)
    images = images[:1500] if split == "train" else images[1500:]
    return TensorDataset(images)


class _Padded(Dataset):
    def __init__(self, base: Dataset, pad: int):
        self.base, self.pad = base, pad

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x = self.base[i][0]
        return (F.pad(x, [self.pad] * 4),)


def _need_root(root: Optional[str], name: str) -> Path:
    if root is None:
        raise DataError(f"data set {name!r} needs --data DIR (the folder holding its files)")
    path = Path(root)
    if not path.is_dir():
        raise DataError(f"data directory {path} does not exist; check --data")
    return path


@register("mnist")
def _mnist(split: str, root=None, download=False) -> Dataset:
    """MNIST through torchvision, padded 28 -> 32 (binarised per load by :func:`prepare_batch`)."""
    from torchvision import datasets, transforms
    path = _need_root(root, "mnist")
    try:
        base = datasets.MNIST(str(path), train=split == "train", download=download, transform=transforms.ToTensor())
    except RuntimeError as e:
        raise DataError(f"MNIST not found under {path} ({e}); point --data at the folder holding MNIST/raw, "
                        "or pass --download") from None
    return _Padded(base, 2)


@register("cifar10")
def _cifar10(split: str, root=None, download=False) -> Dataset:
    """CIFAR-10 through torchvision. Where only some batch files are present (e.g. a subset),
    the ones there are used."""
    from torchvision import datasets, transforms
    path = _need_root(root, "cifar10")
    folder = path / datasets.CIFAR10.base_folder
    tf = transforms.ToTensor()

    class _Available(datasets.CIFAR10):
        # torchvision checks all five training batches; use those that exist.
        train_list = [e for e in datasets.CIFAR10.train_list if (folder / e[0]).exists()]
        test_list = [e for e in datasets.CIFAR10.test_list if (folder / e[0]).exists()] or \
            ([["test_batch_class_ordered", None]] if (folder / "test_batch_class_ordered").exists() else [])

        def _check_integrity(self):
            return bool(self.train_list if self.train else self.test_list)

    if download:
        datasets.CIFAR10(str(path), train=split == "train", download=True)
    ds = _Available(str(path), train=split == "train", transform=tf)
    return _Unlabelled(ds)


class _Unlabelled(Dataset):
    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        return (self.base[i][0],)
