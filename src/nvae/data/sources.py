"""Image sources (image folders and LMDBs), their train/test splits and the dataset that decodes them."""
from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from torch.utils.data import Dataset

from .lmdb_store import _is_lmdb, _LMDBSource, _require_lmdb
from .official_layout import missing_layout_message
from .registry import DataError
from .transforms import _colour_channels, image_transform

#: File name endings ``folder`` treats as images (case-insensitive); other files are ignored.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")

#: Folder names that hold each split, tried in order (an LMDB may carry a ``.lmdb`` suffix).
SPLIT_DIRS = {"train": ("train",), "test": ("test", "val", "valid", "validation")}

#: Fraction of a split-less source held out as the test split (at least one image).
HELD_OUT = 0.05

log = logging.getLogger(__name__)

# What PIL says about an in-memory file it cannot identify: "... <_io.BytesIO object at 0x7f...>".
_OBJECT_AT = re.compile(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>")


def unreadable_reason(e: BaseException) -> str:
    """Why an image could not be read, in a few words: the error's text without the in-memory buffer PIL
    names. The type is left out for OSError and SyntaxError (PIL's ways of saying "damaged data", such as
    ``broken PNG file``) and kept for anything else."""
    text = " ".join(_OBJECT_AT.sub("", str(e)).split())   # one line, whatever the error's text holds
    if text and isinstance(e, (OSError, SyntaxError)):
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def warn_skipped(name: str, why: BaseException) -> None:
    """The one line said about a skipped unreadable image: its ``name`` (path, or LMDB and key) and why.

    Logged (logger ``nvae.data.sources``) rather than raised as a Python warning: the fix is in the data,
    not in the calling code, and a log line carries no source-code location. With no logging set up, as in
    the commands, Python prints the line alone to stderr.
    """
    log.warning("nvae: warning: skipping unreadable image %s (%s)", name, unreadable_reason(why))


class _FileSource:
    """Images stored as files; ``keys`` are paths relative to ``root`` (posix)."""

    kind = "image folder"

    def __init__(self, root: Path, keys: Sequence[str]):
        self.root, self.keys, self.where = root, list(keys), str(root)

    def name(self, key: str) -> str:
        return str(self.root / key)

    description = "image files"

    def read(self, key: str) -> bytes:
        return (self.root / key).read_bytes()

    def open_image(self, key: str):
        from PIL import Image
        return Image.open(io.BytesIO(self.read(key)))


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


def _split_dir(root: Path, split: str, official: bool = False) -> Optional[Path]:
    # The official loader evaluates on validation.lmdb: the named sets look for it before test.
    names = (("validation",) if official and split == "test" else ()) + SPLIT_DIRS[split]
    for name in names:
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
    image folder or an LMDB, a ``.lmdb`` suffix allowed) gives the splits. The named
    sets (``require_split_dirs``, the official layout ``train.lmdb`` /
    ``validation.lmdb``) evaluate on ``validation`` where it exists, as the official
    loader does. Otherwise (unless ``require_split_dirs`` names the data set that needs
    split folders) all of ``root`` is one source: a hashed ~5% is the test split, the
    rest the training split.
    """
    official = require_split_dirs is not None
    train_dir, test_dir = _split_dir(root, "train"), _split_dir(root, "test", official)
    if train_dir is not None and test_dir is not None:
        src = _source(train_dir if split == "train" else test_dir)
        return src, src.keys
    if require_split_dirs:
        raise DataError(missing_layout_message(require_split_dirs, root))
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
    and, failing that, when loaded; each is warned about once, by name
    (:func:`warn_skipped`), and counted in ``skipped`` (and listed in
    ``skipped_files``), or raises :class:`DataError` when ``strict``. With
    ``strict`` an image whose channel count differs from ``channels`` also raises
    (otherwise it is converted).
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
            raise DataError(f"cannot read image {name} ({unreadable_reason(why)}); remove or replace the file, "
                            "or leave strict off to skip it") from None
        if name not in self.skipped_files:
            self.skipped_files.append(name)
            warn_skipped(name, why)

    def _check_channels(self, key: str, mode: str) -> None:
        if self.strict and _colour_channels(mode) != self.channels:
            raise DataError(f"image {self.source.name(key)} has {_colour_channels(mode)} channel(s) (PIL mode "
                            f"{mode}) but {self.channels} are expected; convert it, or leave strict off to convert "
                            "on loading")

    @property
    def source_description(self) -> str:
        """Where this split's images come from and how many there are (for reports such as the eval JSON)."""
        return f"{self.source.kind} {self.source.where} ({self.source.description}), {len(self.keys)} images"

    def _check(self, key: str, full: bool) -> bool:
        try:
            with self.source.open_image(key) as img:
                self._check_channels(key, img.mode)
                img.load() if full else img.verify()
            return True
        except DataError:
            raise
        except Exception as e:   # PIL raises OSError, SyntaxError, ValueError, ... for damaged files
            self._bad(key, e)
            return False

    def _load(self, key: str):
        img = self.source.open_image(key)
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
