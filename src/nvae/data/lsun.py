"""LSUN church_outdoor, bedroom and tower, read from the LMDBs LSUN publishes, with the official transforms.

Data set ``lsun_<category><size>`` (``lsun_church64``, ``lsun_bedroom128``,
``lsun_tower256``, ...) reads ``DIR/<lsun category>_train_lmdb`` for the training
split and ``DIR/<lsun category>_val_lmdb`` for the test split (``--data DIR``, the
folder LSUN's ``download.py`` unpacks into). Each record of those LMDBs is one
encoded image (webp or JPEG) under a hash key; images are taken in key order, the
order torchvision's ``LSUN`` gives them.

Transforms (the official ``_data_transforms_lsun``): training ``Resize(size)`` ->
``RandomCrop(size)`` -> ``RandomHorizontalFlip`` -> ``ToTensor``; test ``Resize(size)``
-> ``CenterCrop(size)`` -> ``ToTensor``.

We read the LMDB ourselves rather than through torchvision's ``LSUN``, which pickles
every key into ``_cache_<path letters>`` in the current working directory (and then
trusts whatever file of that name it finds there). Here the keys are listed once per
construction, kept in one compact array (no per-key Python objects for DataLoader
workers to copy), and nothing is written anywhere.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import List, Optional

import numpy as np
from torch.utils.data import Dataset

from .binary import _data_dir
from .registry import DataError, register
from .lmdb_store import shared_env
from .sources import unreadable_reason, warn_skipped

#: nvae's short category name -> LSUN's.
LSUN_CATEGORIES = {"church": "church_outdoor", "bedroom": "bedroom", "tower": "tower"}
#: The resolutions registered for every category.
LSUN_SIZES = (64, 128, 256)
#: LSUN's split suffix for each of our splits.
LSUN_SPLITS = {"train": "train", "test": "val"}

def _env(path: str):
    return shared_env(Path(path))


def _lsun_db(root: Path, category: str, split: str) -> Path:
    name = f"{category}_{LSUN_SPLITS[split]}_lmdb"
    path = root / name
    if not (path / "data.mdb").is_file():
        raise DataError(f"no LSUN LMDB {path} (a folder holding data.mdb); download LSUN {category} with "
                        f"`python download.py -c {category}` (github.com/fyu/lsun), unzip it into {root} and "
                        "point --data at that folder")
    return path


def _keys(env) -> np.ndarray:
    """Every key of ``env`` in LMDB (sorted) order, as a fixed-width bytes array."""
    with env.begin() as txn:
        keys = list(txn.cursor().iternext(keys=True, values=False))
    packed = np.array(keys, dtype=np.bytes_)
    # numpy drops trailing NULs; keys ending in one (never LSUN's hex hashes) are kept as objects.
    if any(k.endswith(b"\0") for k in keys):
        packed = np.array(keys, dtype=object)
    return packed


class LSUNImages(Dataset):
    """The images of one LSUN LMDB through ``transform``: ``(image,)``.

    An unreadable record is warned about once (:func:`~nvae.data.sources.warn_skipped`,
    naming the LMDB and the key), counted in ``skipped`` and listed in ``skipped_files``,
    and the next readable one returned; with ``strict`` it raises :class:`DataError`
    naming the record.
    """

    def __init__(self, path, transform, strict: bool = False):
        try:
            import lmdb  # noqa: F401
        except ImportError:
            raise DataError("LSUN is stored in LMDB, which needs the optional package lmdb: pip install lmdb") from None
        self.path, self.transform, self.strict = str(Path(path).resolve()), transform, strict
        self.keys = _keys(_env(self.path))
        if len(self.keys) == 0:
            raise DataError(f"LSUN LMDB {self.path} holds no images; download it again")
        self.skipped_files: List[str] = []

    @property
    def skipped(self) -> int:
        """How many unreadable records this process has met."""
        return len(self.skipped_files)

    def __len__(self):
        return len(self.keys)

    def _image(self, key: bytes):
        from PIL import Image
        with _env(self.path).begin() as txn:
            data = txn.get(key)
        with Image.open(io.BytesIO(data)) as img:   # a vanished key (None) raises a TypeError here
            return img.convert("RGB")

    def __getitem__(self, i):
        for j in range(len(self.keys)):
            key = bytes(self.keys[(i + j) % len(self.keys)])
            try:
                img = self._image(key)
            except Exception as e:   # PIL raises OSError, SyntaxError, ValueError, ... for damaged data
                if self.strict:
                    raise DataError(f"record {key!r} of {self.path} is not a readable image "
                                    f"({unreadable_reason(e)})") from None
                name = f"{self.path}[{key!r}]"
                if name not in self.skipped_files:
                    self.skipped_files.append(name)
                    warn_skipped(name, e)
                continue
            return (self.transform(img),)
        raise DataError(f"no record of {self.path} is a readable image")


def lsun_transform(size: int, train: bool, flip: bool = True, channels: int = 3):
    """The official LSUN pipeline: resize the shorter side to ``size``, then a random crop and a random flip
    (``train``) or a centre crop (test), then ``ToTensor``. ``channels`` 1 converts to grey first."""
    from torchvision import transforms
    steps = [transforms.Grayscale()] if channels == 1 else []
    steps.append(transforms.Resize(size))
    if train:
        steps.append(transforms.RandomCrop(size))
        if flip:
            steps.append(transforms.RandomHorizontalFlip())
    else:
        steps.append(transforms.CenterCrop(size))
    steps.append(transforms.ToTensor())
    return transforms.Compose(steps)


def build_lsun(category: str, split: str, root: Optional[str], image_size: int, channels: int = 3,
               flip: bool = True, strict: bool = False) -> Dataset:
    """The ``split`` of LSUN ``category`` (LSUN's name, e.g. ``church_outdoor``) under ``root``."""
    if category not in LSUN_CATEGORIES.values():
        raise DataError(f"unknown LSUN category {category!r}; choose one of {sorted(LSUN_CATEGORIES.values())}")
    name = f"lsun {category}"
    db = _lsun_db(_data_dir(root, name), category, split)
    return LSUNImages(db, lsun_transform(image_size, split == "train", flip, channels), strict=strict)


def _register(short: str, category: str, size: int):
    def fn(split: str, root=None, download=False, image_size: int = size, channels: int = 3, flip: bool = True,
           strict: bool = False) -> Dataset:
        if download:
            raise DataError(f"nvae cannot download LSUN; fetch {category} with `python download.py -c {category}` "
                            "(github.com/fyu/lsun) and point --data at the folder holding its *_lmdb folders")
        return build_lsun(category, split, root, image_size, channels, flip, strict)
    fn.__doc__ = (f"LSUN {category} at {size}x{size} from ``DIR/{category}_train_lmdb`` and "
                  f"``DIR/{category}_val_lmdb``, with the official resize-and-crop transforms.")
    register(f"lsun_{short}{size}")(fn)


for _short, _category in LSUN_CATEGORIES.items():
    for _size in LSUN_SIZES:
        _register(_short, _category, _size)
