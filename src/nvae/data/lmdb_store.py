"""Images in LMDB: reading them (one shared environment per file, safe across fork) and writing them."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Dict, Iterable

import torch

from .official_layout import decode_raw, raw_side
from .registry import DataError

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


def shared_env(path: Path):
    """This process's one read-only environment of the LMDB at ``path`` (a folder holding ``data.mdb``, or
    the file), opened on first use and reopened in forked children."""
    key = str(path.resolve())
    if key not in _LMDB_ENVS:
        import lmdb
        try:
            _LMDB_ENVS[key] = lmdb.open(key, readonly=True, lock=False, readahead=False, meminit=False,
                                        subdir=path.is_dir(), max_readers=512)
        except lmdb.Error as e:
            raise DataError(f"cannot open LMDB {path} ({e}); check the path and its permissions") from None
    return _LMDB_ENVS[key]


class _LMDBSource:
    """Images in an LMDB, one per record under its decimal index: encoded files (layout: see
    :func:`write_lmdb`) or raw square RGB pixels, told apart by the first record
    (:mod:`.official_layout`); ``raw_side`` is the side of raw records, ``None`` when encoded."""

    kind = "LMDB"

    def __init__(self, path: Path):
        self.path, self.where = path, str(path)
        env = self._env()
        n = env.stat()["entries"]
        with env.begin() as txn:
            ends_present = n > 0 and txn.get(b"0") is not None and txn.get(str(n - 1).encode()) is not None
        if n and not ends_present:
            raise DataError(f"LMDB {path} has {n} records but not the keys b'0' .. b'{n - 1}'; nvae expects one "
                            "image per record under its decimal index (write it with nvae.data.write_lmdb or "
                            "nvae data build)")
        self.keys = [str(i) for i in range(n)]
        self.raw_side = raw_side(self.read("0")) if n else None

    @property
    def description(self) -> str:
        """What the records hold, e.g. ``raw 32x32x3 uint8 pixels``."""
        return f"raw {self.raw_side}x{self.raw_side}x3 uint8 pixels" if self.raw_side else "encoded images"

    def open_image(self, key: str):
        """The record ``key`` as a PIL image (raw records are checked for their size)."""
        data = self.read(key)
        if self.raw_side:
            return decode_raw(data, self.raw_side, self.name(key))
        from PIL import Image
        return Image.open(io.BytesIO(data))

    def _env(self):
        return shared_env(self.path)

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
