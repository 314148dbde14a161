"""Data sets, all behind one interface: ``build_dataset(name, split, root, **options)`` -> images in [0, 1].

Every data set yields 1-tuples ``(image,)``: a float tensor (C, H, W) in [0, 1] at
the model's input resolution. Quantisation to ``num_x_bits`` and MNIST's dynamic
binarisation happen in :func:`prepare_batch`, on every load, so a data set never
fixes one binarisation or bit depth.

Adding a data set is one function registered with :func:`register`. It receives
``split`` ('train' or 'test'), ``root``, ``download`` and the options it names in
its signature; a data set of fixed shape declares it (``register(name, shape=...)``)
and :func:`build_dataset` checks ``image_size`` / ``channels`` against it.

Options (``None`` always means "the data set's default"):

``image_size``  side of the square images produced (image sets resize the shorter
                side and centre-crop; fixed-shape sets only check it).
``channels``    1 (grey) or 3 (RGB); images are converted unless ``strict``.
``flip``        random horizontal flips, on the training split only (never on test).
                On by default for the colour data sets, as in the official recipe.
``strict``      turn conversions and skips into errors: an image whose channel count
                differs from ``channels``, or an unreadable / truncated file, raises
                :class:`DataError` instead of being converted or skipped.
``scan``        when unreadable files are looked for: ``"verify"`` opens every file of
                the split at construction and runs PIL's ``verify()`` (cheap; finds
                non-images and most damaged PNGs, not truncated JPEGs); ``"load"``
                decodes every file (finds everything, reads all the data); ``"none"``
                defers to loading. Whatever the scan misses is caught when an item is
                loaded: it is skipped (warned, counted, the next readable image is
                returned) or, with ``strict``, raises. Default ``"verify"`` for
                ``folder`` and ``lmdb`` (user data, often small and messy) and
                ``"none"`` for the large curated sets.

Image sources (``folder``, ``lmdb`` and the named image sets): a split is read from
an image folder or an LMDB (see :func:`write_lmdb` for the record layout). The
datasets expose ``skipped`` (how many unreadable images were met in this process;
DataLoader worker processes keep their own counts) and ``skipped_files``.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset, TensorDataset

__all__ = ["DataError", "register", "available", "build_dataset", "quantize", "prepare_batch",
           "ImageDataset", "image_transform", "celeba64_transform", "write_lmdb", "IMAGE_EXTENSIONS"]

#: File name endings ``folder`` treats as images (case-insensitive); other files are ignored.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")

#: Folder names that hold each split, tried in order (an LMDB may carry a ``.lmdb`` suffix).
SPLIT_DIRS = {"train": ("train",), "test": ("test", "val", "valid", "validation")}

#: Fraction of a split-less source held out as the test split (at least one image).
HELD_OUT = 0.05

SCANS = ("verify", "load", "none")


class DataError(ValueError):
    """Data that cannot be used as asked; the message names the problem and the fix."""


@dataclass(frozen=True)
class _Entry:
    fn: Callable[..., Dataset]
    shape: Optional[Tuple[int, int, int]]   # (C, H, W) for data sets that cannot be resized


_REGISTRY: Dict[str, _Entry] = {}


def register(name: str, shape: Optional[Tuple[int, int, int]] = None):
    """Decorator: make ``fn(split, root, download, **options) -> Dataset`` available as data set ``name``.

    ``shape`` (C, H, W) marks a data set that only comes in one shape; ``image_size``
    and ``channels`` asked of it are then checked rather than passed on.
    """
    def wrap(fn):
        _REGISTRY[name] = _Entry(fn, shape)
        return fn
    return wrap


def available() -> list:
    """Names of the registered data sets."""
    return sorted(_REGISTRY)


def build_dataset(name: str, split: str = "train", root: Optional[str] = None, download: bool = False,
                  **options) -> Dataset:
    """The ``split`` ('train' or 'test') of data set ``name``, yielding ``(image,)`` in [0, 1].

    ``options`` are those of the module docstring (``image_size``, ``channels``,
    ``flip``, ``strict``, ``scan``) where the data set takes them; an option set to
    ``None`` is left at the data set's default. ``download`` is only honoured by
    data sets torchvision can fetch, and only when asked for.
    """
    if name not in _REGISTRY:
        raise DataError(f"unknown data set {name!r}; choose one of {available()}")
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    entry = _REGISTRY[name]
    accepted = set(inspect.signature(entry.fn).parameters) - {"split", "root", "download"}
    kwargs = {}
    for key, value in options.items():
        if value is None:
            continue
        if key in accepted:
            kwargs[key] = value
        elif entry.shape is not None and key in ("channels", "image_size"):
            native = entry.shape[0] if key == "channels" else entry.shape[1]
            if value != native:
                raise DataError(f"data set {name!r} comes only as {entry.shape[0]} channel(s) at "
                                f"{entry.shape[1]}x{entry.shape[2]}, but {key}={value} was asked for; "
                                f"use a model with {key} {native}")
        elif key == "flip" and not value:
            continue   # "no flips" is what a data set without the option does anyway
        else:
            takes = ", ".join(sorted(accepted)) or "no options"
            raise DataError(f"data set {name!r} takes no option {key!r}; it takes {takes}")
    if "channels" in kwargs and kwargs["channels"] not in (1, 3):
        raise DataError(f"channels must be 1 (grey) or 3 (RGB), got {kwargs['channels']!r}")
    if "image_size" in kwargs and (not isinstance(kwargs["image_size"], int) or kwargs["image_size"] < 1):
        raise DataError(f"image_size must be a positive integer, got {kwargs['image_size']!r}")
    if "scan" in kwargs and kwargs["scan"] not in SCANS:
        raise DataError(f"scan must be one of {SCANS}, got {kwargs['scan']!r}")
    return entry.fn(split=split, root=root, download=download, **kwargs)


def quantize(x: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Reduce 8-bit images in [0, 1] to ``num_bits`` (the official ``pre_process``):
    ``floor(x * 255 / 2^(8 - bits)) / (2^bits - 1)``."""
    if num_bits == 8:
        return x
    return torch.floor(x * 255 / 2 ** (8 - num_bits)) / (2 ** num_bits - 1)


def prepare_batch(x: torch.Tensor, decoder: str, num_bits: int, generator: Optional[torch.Generator] = None):
    """What the model sees: binarised afresh (Bernoulli decoder) or quantised to ``num_bits``."""
    if decoder == "bernoulli":
        return torch.bernoulli(x, generator=generator)
    return quantize(x, num_bits)


# ------------------------------------------------------------------ transforms
_GREY_MODES = {"1", "L", "LA", "La", "I", "F"}


def _colour_channels(mode: str) -> int:
    """Channels an image of PIL ``mode`` carries, alpha not counted (palettes count as colour)."""
    return 1 if mode in _GREY_MODES or mode.startswith("I;16") else 3


class _ToChannels:
    """PIL image -> mode 'L' or 'RGB'. A picklable callable so DataLoader workers can spawn."""

    def __init__(self, channels: int):
        self.channels = channels

    def __call__(self, img):
        from PIL import Image
        if img.mode.startswith("I;16") or img.mode == "I":
            # PIL's own I;16 -> L conversion clips at 255 instead of rescaling 16 bits to 8.
            import numpy as np
            a = np.asarray(img, dtype=np.float64)
            if a.max() > 255:
                a = a / 257.0
            img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
        if img.mode == "P":
            img = img.convert("RGBA")   # a palette may carry transparency; going via RGBA avoids PIL's warning
        return img.convert("L" if self.channels == 1 else "RGB")

    def __repr__(self):
        return f"{type(self).__name__}(channels={self.channels})"


def image_transform(image_size: int, channels: int, flip: bool, crop_box: Optional[Tuple[int, int, int, int]] = None):
    """PIL image -> tensor (channels, image_size, image_size) in [0, 1].

    Converts to grey / RGB, optionally crops the PIL box ``(left, upper, right,
    lower)``, resizes the shorter side to ``image_size`` (bilinear, antialiased;
    an image already at that size is left untouched), centre-crops to a square and
    flips horizontally with probability 1/2 when ``flip``.
    """
    from torchvision import transforms
    from torchvision.transforms import functional as TF
    steps = [_ToChannels(channels)]
    if crop_box is not None:
        left, upper, right, lower = crop_box
        steps.append(functools.partial(TF.crop, top=upper, left=left, height=lower - upper, width=right - left))
    steps += [transforms.Resize(image_size), transforms.CenterCrop(image_size)]
    if flip:
        steps.append(transforms.RandomHorizontalFlip())
    steps.append(transforms.ToTensor())
    return transforms.Compose(steps)


#: NVAE.md section 3: CelebA 64 crops the aligned 178x218 image to this PIL box, then resizes to 64.
CELEBA64_CROP = (15, 40, 15 + 148, 40 + 148)


def celeba64_transform(flip: bool, image_size: int = 64, channels: int = 3):
    """The CelebA-64 pipeline on an aligned 178x218 CelebA image: crop :data:`CELEBA64_CROP`,
    resize to ``image_size``, random horizontal flip when ``flip``."""
    return image_transform(image_size, channels, flip, crop_box=CELEBA64_CROP)


# ------------------------------------------------------------------ image sources
class _FileSource:
    """Images stored as files; ``keys`` are paths relative to ``root`` (posix)."""

    kind = "image folder"

    def __init__(self, root: Path, keys: Sequence[str]):
        self.root, self.keys, self.where = root, list(keys), str(root)

    def name(self, key: str) -> str:
        return str(self.root / key)

    def read(self, key: str) -> bytes:
        return (self.root / key).read_bytes()


# py-lmdb allows one open environment per file and process, so readers share them.
_LMDB_ENVS: Dict[str, object] = {}


def _close_inherited_lmdb_envs():
    # An LMDB environment must not be used across fork(); a forked DataLoader worker drops the
    # parent's (closing the child's copy leaves the parent's intact) and opens its own.
    for env in _LMDB_ENVS.values():
        env.close()
    _LMDB_ENVS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_lmdb_envs)


class _LMDBSource:
    """Images stored as encoded bytes in an LMDB (layout: see :func:`write_lmdb`)."""

    kind = "LMDB"

    def __init__(self, path: Path):
        self.path, self.where = path, str(path)
        env = self._env()
        n = env.stat()["entries"]
        with env.begin() as txn:
            ends_present = n > 0 and txn.get(b"0") is not None and txn.get(str(n - 1).encode()) is not None
        if n and not ends_present:
            raise DataError(f"LMDB {path} has {n} records but not the keys b'0' .. b'{n - 1}'; nvae expects one "
                            "encoded image per record under its decimal index (write it with nvae.data.write_lmdb)")
        self.keys = [str(i) for i in range(n)]

    def _env(self):
        key = str(self.path.resolve())
        if key not in _LMDB_ENVS:
            import lmdb
            try:
                _LMDB_ENVS[key] = lmdb.open(key, readonly=True, lock=False, readahead=False, meminit=False,
                                            subdir=self.path.is_dir(), max_readers=512)
            except lmdb.Error as e:
                raise DataError(f"cannot open LMDB {self.path} ({e}); check the path and its permissions") from None
        return _LMDB_ENVS[key]

    def name(self, key: str) -> str:
        return f"{self.path}[{key}]"

    def read(self, key: str) -> bytes:
        with self._env().begin(buffers=False) as txn:
            data = txn.get(key.encode())
        if data is None:
            raise OSError(f"no record {key!r}")
        return data


def _require_lmdb():
    try:
        import lmdb  # noqa: F401
    except ImportError:
        raise DataError("reading LMDB data needs the optional package lmdb: pip install lmdb") from None


def _is_lmdb(path: Path) -> bool:
    return (path / "data.mdb").is_file() or (path.is_file() and path.suffix == ".lmdb")


def _find_image_files(root: Path) -> List[str]:
    found = []
    # Sorted walk: the order, and so the held-out split, must not depend on the file system.
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(dirpath, f).relative_to(root).as_posix())
    return found


def _source(path: Path):
    """The images under ``path``: an LMDB (``data.mdb`` inside) or an image folder (searched recursively)."""
    if _is_lmdb(path):
        _require_lmdb()
        src = _LMDBSource(path)
    else:
        src = _FileSource(path, _find_image_files(path))
    if not src.keys:
        what = "records" if src.kind == "LMDB" else f"images ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)})"
        raise DataError(f"no {what} found in {path}; point --data at a folder that holds images")
    return src


def _split_dir(root: Path, split: str) -> Optional[Path]:
    for name in SPLIT_DIRS[split]:
        for candidate in (root / name, root / f"{name}.lmdb"):
            if candidate.is_dir() or (candidate.is_file() and candidate.suffix == ".lmdb"):
                return candidate
    return None


def _held_out(keys: Sequence[str]) -> set:
    """A deterministic ~5% (at least one) of ``keys``, chosen by a hash of each key so the
    choice does not depend on listing order and mostly survives adding files."""
    n_test = max(1, round(HELD_OUT * len(keys)))
    ranked = sorted(keys, key=lambda k: hashlib.sha1(k.encode()).hexdigest())
    return set(ranked[:n_test])


def _split_source(root: Path, split: str, require_split_dirs: Optional[str] = None):
    """(source, keys) for ``split`` under ``root``.

    ``root/train`` with ``root/test`` (or ``val``, ``valid``, ``validation``; each an
    image folder or an LMDB) gives the splits. Otherwise (unless
    ``require_split_dirs`` names the data set that needs them) all of ``root`` is
    one source: a hashed ~5% is the test split, the rest the training split.
    """
    train_dir, test_dir = _split_dir(root, "train"), _split_dir(root, "test")
    if train_dir is not None and test_dir is not None:
        src = _source(train_dir if split == "train" else test_dir)
        return src, src.keys
    if require_split_dirs:
        raise DataError(f"data set {require_split_dirs!r} expects {root}/train and {root}/val (or test), each an "
                        "image folder or an LMDB; for one folder of images use the 'folder' data set")
    src = _source(root)
    if len(src.keys) < 2:
        raise DataError(f"{root} holds {len(src.keys)} image; a train/test split needs at least 2 "
                        f"(or give {root}/train and {root}/test folders)")
    test = _held_out(src.keys)
    return src, [k for k in src.keys if (k in test) == (split == "test")]


def _need_root(root: Optional[str], name: str) -> Path:
    if root is None:
        raise DataError(f"data set {name!r} needs --data DIR (the folder holding its files)")
    path = Path(root)
    if not path.exists():
        raise DataError(f"data directory {path} does not exist; check --data")
    if not path.is_dir():
        raise DataError(f"{path} is a file, not a directory; point --data at the folder holding the data")
    return path


class ImageDataset(Dataset):
    """Encoded images (files or LMDB records) decoded by PIL and passed through ``transform``.

    Yields ``(image,)``. Unreadable images are found by ``scan`` at construction
    and, failing that, when loaded; each is warned about by name and counted in
    ``skipped`` (and listed in ``skipped_files``), or raises :class:`DataError`
    when ``strict``. With ``strict`` an image whose channel count differs from
    ``channels`` also raises (otherwise it is converted).
    """

    def __init__(self, source, keys: Sequence[str], transform: Callable, channels: int, strict: bool = False,
                 scan: str = "verify"):
        self.source, self.transform, self.channels, self.strict = source, transform, channels, strict
        self.skipped_files: List[str] = []
        keys = list(keys)
        if scan != "none":
            keys = [k for k in keys if self._check(k, full=scan == "load")]
        if not keys:
            raise DataError(f"none of the images in {source.where} for this split could be read; "
                            "check the files (see the warnings above)")
        self.keys = keys

    @property
    def skipped(self) -> int:
        """How many unreadable images this process has met (at construction and when loading)."""
        return len(self.skipped_files)

    def __len__(self):
        return len(self.keys)

    def _bad(self, key: str, why: Exception) -> None:
        name = self.source.name(key)
        if self.strict:
            raise DataError(f"cannot read image {name} ({type(why).__name__}: {why}); remove or replace the file, "
                            "or leave strict off to skip it") from None
        if name not in self.skipped_files:
            self.skipped_files.append(name)
            warnings.warn(f"skipping unreadable image {name} ({type(why).__name__}: {why})", stacklevel=3)

    def _check_channels(self, key: str, mode: str) -> None:
        if self.strict and _colour_channels(mode) != self.channels:
            raise DataError(f"image {self.source.name(key)} has {_colour_channels(mode)} channel(s) (PIL mode "
                            f"{mode}) but {self.channels} are expected; convert it, or leave strict off to convert "
                            "on loading")

    def _check(self, key: str, full: bool) -> bool:
        from PIL import Image
        try:
            with Image.open(io.BytesIO(self.source.read(key))) as img:
                self._check_channels(key, img.mode)
                img.load() if full else img.verify()
            return True
        except DataError:
            raise
        except Exception as e:   # PIL raises OSError, SyntaxError, ValueError, ... for damaged files
            self._bad(key, e)
            return False

    def _load(self, key: str):
        from PIL import Image
        img = Image.open(io.BytesIO(self.source.read(key)))
        img.load()
        return img

    def __getitem__(self, i: int):
        n = len(self.keys)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} images")   # also ends plain iteration
        i %= n
        for attempt in range(n):
            key = self.keys[(i + attempt) % n]
            try:
                img = self._load(key)
            except DataError:
                raise
            except Exception as e:   # PIL raises OSError, SyntaxError, ValueError, ... for damaged files
                self._bad(key, e)
                continue
            self._check_channels(key, img.mode)
            return (self.transform(img),)
        raise DataError(f"none of the {len(self.keys)} images of this split in {self.source.where} could be "
                        "read; check the files (see the warnings above)")


def _image_split(name: str, split: str, root: Optional[str], image_size: int, channels: int, flip: bool,
                 strict: bool, scan: str, crop_box=None, require_split_dirs: bool = False) -> ImageDataset:
    path = _need_root(root, name)
    src, keys = _split_source(path, split, name if require_split_dirs else None)
    tf = image_transform(image_size, channels, flip and split == "train", crop_box)
    return ImageDataset(src, keys, tf, channels, strict=strict, scan=scan)


# ------------------------------------------------------------------ LMDB writing
def write_lmdb(images: Iterable, path, format: str = "PNG") -> int:
    """Write ``images`` to a new LMDB at ``path`` in the layout nvae reads; returns the count.

    Layout: one record per image, key = its index in decimal ASCII (``b'0'``,
    ``b'1'``, ...), value = the image encoded as PNG or JPEG (anything PIL can
    open); the number of images is the number of records, so the LMDB holds
    nothing else. ``path`` is a directory (``data.mdb`` inside). This is also the
    layout of the official NVAE LMDBs of encoded images.

    ``images`` may hold PIL images, uint8 arrays (H, W) or (H, W, C), float tensors
    (C, H, W) in [0, 1], or already-encoded ``bytes``.
    """
    _require_lmdb()
    import lmdb
    import numpy as np
    from PIL import Image

    path = Path(path)
    if (path / "data.mdb").exists():
        raise DataError(f"{path} already holds an LMDB; choose a new path")
    path.mkdir(parents=True, exist_ok=True)

    def encode(img) -> bytes:
        if isinstance(img, (bytes, bytearray)):
            return bytes(img)
        if isinstance(img, torch.Tensor):
            arr = (img.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
            img = arr[0].numpy() if arr.shape[0] == 1 else arr.permute(1, 2, 0).numpy()
        if isinstance(img, np.ndarray):
            img = Image.fromarray(img)
        buf = io.BytesIO()
        img.save(buf, format=format)
        return buf.getvalue()

    env = lmdb.open(str(path), map_size=1 << 26)
    n, pending = 0, []

    def flush():
        # The map size is fixed up front; grow it when full rather than guess the total.
        while True:
            try:
                with env.begin(write=True) as txn:
                    for key, data in pending:
                        txn.put(key, data)
                break
            except lmdb.MapFullError:
                env.set_mapsize(2 * env.info()["map_size"])
        pending.clear()

    try:
        for img in images:
            pending.append((str(n).encode(), encode(img)))
            n += 1
            if len(pending) == 1000:   # one commit (and sync) per batch, not per image
                flush()
        flush()
    finally:
        env.close()
    return n


# ------------------------------------------------------------------ data sets
class _Unlabelled(Dataset):
    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        return (self.base[i][0],)


@register("digits", shape=(1, 8, 8))
def _digits(split: str, root=None, download=False) -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 17 grey levels); the last
    297 images are the test split."""
    from sklearn.datasets import load_digits
    images = torch.from_numpy(load_digits().images).float().div(16.0).unsqueeze(1)
    images = images[:1500] if split == "train" else images[1500:]
    return TensorDataset(images)


@register("mnist", shape=(1, 32, 32))
def _mnist(split: str, root=None, download=False) -> Dataset:
    """MNIST through torchvision, padded 28 -> 32 with zeros (grey levels kept: binarised on
    every load by :func:`prepare_batch`). No flips: digits are not mirror-symmetric."""
    from torchvision import datasets, transforms
    path = _need_root(root, "mnist")
    tf = transforms.Compose([transforms.Pad(2), transforms.ToTensor()])
    try:
        base = datasets.MNIST(str(path), train=split == "train", download=download, transform=tf)
    except RuntimeError as e:
        raise DataError(f"MNIST not found under {path} ({e}); point --data at the folder holding MNIST/raw, "
                        "or download it (download=True)") from None
    return _Unlabelled(base)


@register("cifar10", shape=(3, 32, 32))
def _cifar10(split: str, root=None, download=False, flip: bool = True) -> Dataset:
    """CIFAR-10 through torchvision, random horizontal flips on the training split. Where only
    some batch files are present (e.g. ``data_batch_1`` and ``test_batch_class_ordered``), the
    ones there are used."""
    from torchvision import datasets, transforms
    path = _need_root(root, "cifar10")
    folder = path / datasets.CIFAR10.base_folder
    train = split == "train"
    tf = transforms.Compose(([transforms.RandomHorizontalFlip()] if flip and train else []) + [transforms.ToTensor()])

    class _Available(datasets.CIFAR10):
        # torchvision checks all five training batches; use those that exist.
        train_list = [e for e in datasets.CIFAR10.train_list if (folder / e[0]).exists()]
        test_list = [e for e in datasets.CIFAR10.test_list if (folder / e[0]).exists()] or \
            ([["test_batch_class_ordered", None]] if (folder / "test_batch_class_ordered").exists() else [])

        def _check_integrity(self):
            return bool(self.train_list if self.train else self.test_list)

    if download:
        datasets.CIFAR10(str(path), train=train, download=True)
    try:
        ds = _Available(str(path), train=train, transform=tf)
    except RuntimeError:
        raise DataError(f"no CIFAR-10 {split} batches under {folder}; point --data at the folder holding "
                        "cifar-10-batches-py, or download it (download=True)") from None
    return _Unlabelled(ds)


@register("celeba64")
def _celeba64(split: str, root=None, download=False, image_size: int = 64, channels: int = 3, flip: bool = True,
              strict: bool = False, scan: str = "none") -> Dataset:
    """CelebA 64x64 (NVAE.md section 3): aligned 178x218 images cropped to the box
    (15, 40, 163, 188), resized to 64, flipped on the training split.

    Reads torchvision's layout (``ROOT/celeba/img_align_celeba`` and the list files;
    ``download=True`` lets torchvision fetch them) with its 'test' partition as the
    test split, or else ``ROOT/train`` and ``ROOT/val`` (or ``test``) holding aligned
    images as image folders or LMDBs.
    """
    path = _need_root(root, "celeba64")
    if download or (path / "celeba" / "img_align_celeba").is_dir():
        from torchvision import datasets
        tf = celeba64_transform(flip and split == "train", image_size, channels)
        try:
            base = datasets.CelebA(str(path), split=split, target_type=[], transform=tf, download=download)
        except (RuntimeError, OSError) as e:
            raise DataError(f"CelebA under {path}/celeba is incomplete ({e}); it needs img_align_celeba/ and the "
                            "list_*.txt / identity_CelebA.txt files (download=True fetches them)") from None
        return _Unlabelled(base)
    return _image_split("celeba64", split, root, image_size, channels, flip, strict, scan, crop_box=CELEBA64_CROP,
                        require_split_dirs=True)


@register("imagenet32")
def _imagenet32(split: str, root=None, download=False, image_size: int = 32, channels: int = 3, flip: bool = True,
                strict: bool = False, scan: str = "none") -> Dataset:
    """Downsampled ImageNet 32x32 (van den Oord et al. 2016): ``ROOT/train`` and ``ROOT/val``,
    each a folder of 32x32 images (any sub-folder layout) or an LMDB; flips on train."""
    return _image_split("imagenet32", split, root, image_size, channels, flip, strict, scan, require_split_dirs=True)


@register("celebahq256")
def _celebahq256(split: str, root=None, download=False, image_size: int = 256, channels: int = 3,
                 flip: bool = True, strict: bool = False, scan: str = "none") -> Dataset:
    """CelebA-HQ 256x256: ``ROOT/train`` and ``ROOT/val`` as image folders or LMDBs; flips on
    train. The 5-bit quantisation is the model's (``num_x_bits``), applied by :func:`prepare_batch`."""
    return _image_split("celebahq256", split, root, image_size, channels, flip, strict, scan,
                        require_split_dirs=True)


@register("ffhq256")
def _ffhq256(split: str, root=None, download=False, image_size: int = 256, channels: int = 3, flip: bool = True,
             strict: bool = False, scan: str = "none") -> Dataset:
    """FFHQ 256x256: ``ROOT/train`` and ``ROOT/val`` as image folders or LMDBs; flips on train
    (as for every colour set in the official recipe); 5 bits via the model's ``num_x_bits``."""
    return _image_split("ffhq256", split, root, image_size, channels, flip, strict, scan, require_split_dirs=True)


@register("folder")
def _folder(split: str, root=None, download=False, image_size: Optional[int] = None, channels: int = 3,
            flip: bool = False, strict: bool = False, scan: str = "verify") -> Dataset:
    """Any folder of images (``--data DIR``), searched recursively for :data:`IMAGE_EXTENSIONS`.

    Images are converted to grey or RGB per ``channels``, the shorter side resized to
    ``image_size`` and centre-cropped. ``DIR/train`` with ``DIR/test`` (or ``val``)
    give the splits; otherwise a deterministic ~5% of the images (at least one) is
    the test split and the rest the training split. No flips unless ``flip=True``.
    """
    if image_size is None:
        raise DataError("the 'folder' data set needs image_size (the model's input resolution)")
    return _image_split("folder", split, root, image_size, channels, flip, strict, scan)


@register("lmdb")
def _lmdb(split: str, root=None, download=False, image_size: Optional[int] = None, channels: int = 3,
          flip: bool = False, strict: bool = False, scan: str = "verify") -> Dataset:
    """Images in LMDB (layout: :func:`write_lmdb`), handled as ``folder`` is: ``ROOT/train``
    and ``ROOT/test`` (or ``val``) LMDBs give the splits, or ``ROOT`` is one LMDB and a
    hashed ~5% of its records is the test split. Needs ``pip install lmdb``."""
    _require_lmdb()
    if image_size is None:
        raise DataError("the 'lmdb' data set needs image_size (the model's input resolution)")
    path = _need_root(root, "lmdb")
    dirs = [_split_dir(path, s) for s in ("train", "test")]
    if not (all(d is not None and _is_lmdb(d) for d in dirs) or _is_lmdb(path)):
        raise DataError(f"{path} is not an LMDB (no data.mdb) and has no train/ and test/ LMDBs; "
                        "write one with nvae.data.write_lmdb, or use the 'folder' data set for image files")
    return _image_split("lmdb", split, root, image_size, channels, flip, strict, scan)
