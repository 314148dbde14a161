"""Omniglot and Stacked MNIST: the 28x28 digit-like sets of the official code, padded to 32x32.

Both pad 28 -> 32 with zeros and scale 8-bit grey levels to [0, 1], exactly as
torchvision's ``Pad(2)`` followed by ``ToTensor()`` does on the PIL image (the
official transform chain); the pixels are kept as ``uint8`` and converted per item.

- ``omniglot``: the IWAE split of Omniglot (24,345 training and 8,070 test
  characters) read from ``chardata.mat``. Grey levels are kept; a model with the
  Bernoulli decoder binarises them afresh on every load in
  :func:`~nvae.data.prepare_batch`, as the official ``Binarize`` transform does.
- ``stacked_mnist``: three MNIST digits as the R, G and B channels of one colour
  image (1,000 modes), twice as many images as the MNIST split. The official code
  draws the triples from unseeded permutations, so every process and every run
  sees different images; ours come from a generator seeded with
  :data:`STACKED_MNIST_SEED`, the same pairing everywhere. MNIST is read from
  ``DIR/MNIST/raw`` (torchvision's layout) or ``DIR/StackedMNIST/raw`` (the official
  code's, whose MNIST subclass gives the folder its name).
"""
from __future__ import annotations

import logging
import shutil
import urllib.request
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from .registry import DataError, register

log = logging.getLogger(__name__)

#: Where ``chardata.mat`` (Burda et al.'s IWAE split of Omniglot) is published.
OMNIGLOT_URL = "https://raw.githubusercontent.com/yburda/iwae/master/datasets/OMNIGLOT/chardata.mat"
OMNIGLOT_FILE = "chardata.mat"

#: Seed of the generator that pairs MNIST digits into Stacked MNIST images (train and test alike).
STACKED_MNIST_SEED = 2020

_PAD = 2   # 28 -> 32, as the official Pad(padding=2)


def _data_dir(root: Optional[str], name: str) -> Path:
    if root is None:
        raise DataError(f"data set {name!r} needs --data DIR (the folder holding its files)")
    path = Path(root)
    if path.exists() and not path.is_dir():
        raise DataError(f"{path} is a file, not a directory; point --data at the folder holding the data")
    return path


def _to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (C, H, W) -> float in [0, 1], zero-padded by :data:`_PAD` on every side (= Pad(2), ToTensor)."""
    return torch.nn.functional.pad(pixels, (_PAD, _PAD, _PAD, _PAD)).float().div(255)


class _PaddedGrey(Dataset):
    """N x 28 x 28 uint8 images -> ``(image,)`` of shape (1, 32, 32) in [0, 1]."""

    def __init__(self, images: np.ndarray):
        self.images = torch.from_numpy(np.ascontiguousarray(images))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return (_to_unit(self.images[i].unsqueeze(0)),)


# ------------------------------------------------------------------------------------------- Omniglot
def _matlab_images(columns: np.ndarray, key: str, path: Path) -> np.ndarray:
    """784 x N grey levels in [0, 1], each column a 28x28 image in MATLAB's column-major order -> N x 28 x 28 uint8.

    Scaled and truncated as the official loader does (float32 times 255, then cast to uint8).
    """
    if columns.ndim != 2 or columns.shape[0] != 28 * 28:
        raise DataError(f"{path}: {key!r} has shape {columns.shape}, not 784 x N (one 28x28 image per column); "
                        f"is this the IWAE repository's {OMNIGLOT_FILE}? Get it from {OMNIGLOT_URL}")
    scaled = 255 * columns.astype(np.float32)
    # Column-major pixels: row r, column c of an image is entry c * 28 + r of its column.
    return scaled.T.reshape(-1, 28, 28).transpose(0, 2, 1).astype(np.uint8)


def load_omniglot(path) -> Tuple[np.ndarray, np.ndarray]:
    """``(train, test)`` images of ``chardata.mat`` at ``path``, as N x 28 x 28 ``uint8`` arrays."""
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError
    path = Path(path)
    try:
        mat = loadmat(str(path))
    except FileNotFoundError:
        raise DataError(f"{path} not found; Omniglot is read from the IWAE repository's {OMNIGLOT_FILE} "
                        f"({OMNIGLOT_URL}): put it in the --data folder, or ask for download=True") from None
    except (ValueError, TypeError, OSError, MatReadError, NotImplementedError) as e:   # NotImplemented: v7.3 (HDF5)
        raise DataError(f"{path} is not a readable MATLAB file ({e}); download {OMNIGLOT_FILE} again from "
                        f"{OMNIGLOT_URL}") from None
    missing = [k for k in ("data", "testdata") if k not in mat]
    if missing:
        present = sorted(k for k in mat if not k.startswith("_"))
        raise DataError(f"{path} holds no {missing} array(s) (it has {present}); is this the IWAE repository's "
                        f"{OMNIGLOT_FILE}? Get it from {OMNIGLOT_URL}")
    return _matlab_images(mat["data"], "data", path), _matlab_images(mat["testdata"], "testdata", path)


def download_omniglot(folder, url: str = OMNIGLOT_URL) -> Path:
    """Fetch ``chardata.mat`` into ``folder`` (atomically) unless it is there; its path."""
    from ..formats.checkpoint import atomic_write
    target = Path(folder) / OMNIGLOT_FILE
    if target.exists():
        return target
    log.info("downloading %s to %s", url, target)
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            atomic_write(target, lambda f: shutil.copyfileobj(response, f))
    except OSError as e:   # URLError and HTTPError are OSErrors
        raise DataError(f"could not download {url} ({e}); fetch {OMNIGLOT_FILE} by hand and put it in "
                        f"{Path(folder)}") from None
    return target


@register("omniglot", shape=(1, 32, 32))
def _omniglot(split: str, root=None, download=False) -> Dataset:
    """Omniglot from ``DIR/chardata.mat`` (``--data DIR``), padded 28 -> 32; binarised on every load
    by :func:`prepare_batch` for the Bernoulli decoder. Nothing is fetched unless ``download=True``."""
    path = _data_dir(root, "omniglot")
    if download:
        download_omniglot(path)
    train, test = load_omniglot(path / OMNIGLOT_FILE)
    return _PaddedGrey(train if split == "train" else test)


# -------------------------------------------------------------------------------------- Stacked MNIST
def stacked_mnist_triples(n: int, seed: int = STACKED_MNIST_SEED) -> np.ndarray:
    """(2n, 3) indices into an MNIST split of ``n`` digits: column c picks channel c's digit.

    Each column is two independent random permutations of ``range(n)`` one after the
    other (the official construction), drawn from ``numpy.random.default_rng(seed)``
    so the pairing is the same in every process and run.
    """
    rng = np.random.default_rng(seed)
    columns = [np.concatenate([rng.permutation(n), rng.permutation(n)]) for _ in range(3)]
    return np.stack(columns, axis=1)


class StackedMNIST(Dataset):
    """Three MNIST digits as the R, G, B channels, padded to 32x32: ``(image,)`` of shape (3, 32, 32).

    ``digits`` (N x 28 x 28 uint8) and ``labels`` (N) are an MNIST split; the data set
    has 2N images, image i stacking ``digits[triples[i]]``. ``labels`` gives each
    image's mode, ``100 * red + 10 * green + blue`` (0 .. 999), for mode counting.
    """

    def __init__(self, digits: torch.Tensor, labels: torch.Tensor, seed: int = STACKED_MNIST_SEED):
        self.digits = digits
        self.triples = torch.from_numpy(stacked_mnist_triples(len(digits), seed))
        self.labels = (labels[self.triples] * torch.tensor([100, 10, 1])).sum(1)

    def __len__(self):
        return len(self.triples)

    def __getitem__(self, i):
        return (_to_unit(self.digits[self.triples[i]]),)


#: Folders under ``--data DIR`` whose ``raw/`` may hold MNIST for Stacked MNIST, in order of preference:
#: torchvision's ``MNIST`` (shared with the ``mnist`` data set), then ``StackedMNIST``, where the official
#: code's MNIST subclass of that name reads and downloads it (torchvision names the folder after the class).
STACKED_MNIST_FOLDERS = ("MNIST", "StackedMNIST")


def _load_mnist_for_stacking(path: Path, train: bool, download: bool):
    """torchvision's MNIST split from the first of ``DIR/MNIST/raw`` and ``DIR/StackedMNIST/raw`` that holds
    it; with neither, downloaded into ``DIR/MNIST/raw`` when ``download``, else a :class:`DataError`."""
    from torchvision import datasets
    for folder in STACKED_MNIST_FOLDERS:
        # torchvision reads DIR/<class name>/raw: a subclass named after the folder reads that folder.
        cls = datasets.MNIST if folder == "MNIST" else type(folder, (datasets.MNIST,), {})
        try:
            return cls(str(path), train=train)
        except RuntimeError:   # torchvision's "Dataset not found": try the next folder
            continue
    if download:
        try:
            return datasets.MNIST(str(path), train=train, download=True)
        except RuntimeError as e:   # every mirror failed
            raise DataError(f"could not download MNIST into {path / 'MNIST' / 'raw'} ({e}); put the idx files "
                            "there by hand") from None
    looked = " nor ".join(str(path / folder / "raw") for folder in STACKED_MNIST_FOLDERS)
    raise DataError(f"MNIST not found under {path}: neither {looked} holds the four idx files "
                    "(train-images-idx3-ubyte, ...); point --data at the folder holding MNIST/raw or "
                    "StackedMNIST/raw, or download it (download=True)")


@register("stacked_mnist", shape=(3, 32, 32))
def _stacked_mnist(split: str, root=None, download=False) -> Dataset:
    """Stacked MNIST from torchvision's MNIST under ``--data DIR``: ``DIR/MNIST/raw`` or, as the official code
    lays it out, ``DIR/StackedMNIST/raw`` (``MNIST`` is read when both hold it); 120,000 training and 20,000
    test images, paired with the fixed seed :data:`STACKED_MNIST_SEED`. No binarisation and no flips: a
    colour 8-bit set for the logistic-mixture decoder, as in the official code."""
    mnist = _load_mnist_for_stacking(_data_dir(root, "stacked_mnist"), split == "train", download)
    return StackedMNIST(mnist.data, mnist.targets)
