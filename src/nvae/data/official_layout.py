"""The official NVAE LMDB layouts: which files a data set folder holds, and how a record is told apart.

The official loader (``lmdb_datasets.py``) opens ``ROOT/train.lmdb`` for training and
``ROOT/validation.lmdb`` for evaluation, one record per image under the key
``str(i).encode()``. A record is either an encoded image file (CelebA-64: the JPEGs of
``img_align_celeba``) or raw pixels: ``uint8`` H x W x 3 RGB in row-major (HWC) order,
square, so the side is ``sqrt(len / 3)`` (FFHQ, CelebA-HQ 256, ImageNet-32).

nvae decides per LMDB from its first record (key ``b'0'``): a record that starts with a
known image signature and that PIL can identify is encoded; otherwise a record of
``3 * s * s`` bytes is raw pixels of side ``s``; anything else is treated as encoded
(and then reported as unreadable). Every raw record read later must have the same
size, or reading it raises :class:`DataError` naming the LMDB and the key.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Optional

from .registry import DataError

#: The LMDBs of the official layout under ``--data DIR`` (``test.lmdb`` only for CelebA-64).
OFFICIAL_FILES = ("train.lmdb", "validation.lmdb", "test.lmdb")

#: Leading bytes of the image formats PIL reads that an LMDB record may hold.
IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*",
                    b"P1", b"P2", b"P3", b"P4", b"P5", b"P6")


def _looks_encoded(data: bytes) -> bool:
    is_webp = data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    if not (is_webp or data.startswith(IMAGE_SIGNATURES)):
        return False
    from PIL import Image
    try:   # raw pixels may start with a signature's bytes by chance; a real image file also parses
        with Image.open(io.BytesIO(data)):
            return True
    except Exception:   # PIL raises OSError, SyntaxError, ValueError, ... for what it cannot identify
        return False


def raw_side(data: bytes) -> Optional[int]:
    """The side ``s`` when ``data`` holds raw ``s x s x 3`` uint8 pixels, ``None`` for an encoded image
    (the rule is in this module's docstring)."""
    if _looks_encoded(data) or len(data) == 0 or len(data) % 3:
        return None
    side = math.isqrt(len(data) // 3)
    return side if 3 * side * side == len(data) else None


def decode_raw(data: bytes, side: int, name: str):
    """Raw ``side x side x 3`` pixels -> a PIL RGB image; :class:`DataError` naming ``name`` (LMDB path
    and key) when the record has another size."""
    import numpy as np
    from PIL import Image
    if len(data) != 3 * side * side:
        got = math.isqrt(len(data) // 3)
        shape = f"{got}x{got}x3" if 3 * got * got == len(data) else "not 3*s*s for any side s"
        raise DataError(f"raw-pixel record {name} has {len(data)} bytes ({shape}) but the LMDB's first record is "
                        f"{side}x{side}x3 = {3 * side * side} bytes; every record of a raw LMDB must be one square "
                        "RGB image of the same size: rebuild this LMDB (nvae data build)")
    return Image.fromarray(np.frombuffer(data, dtype=np.uint8).reshape(side, side, 3), mode="RGB")


def missing_layout_message(name: str, root: Path) -> str:
    """The error for a data set folder that holds neither the official files nor split folders."""
    present = sorted(p.name for p in root.iterdir())[:8] if root.is_dir() else []
    return (f"data set {name!r} expects {root}/train.lmdb and {root}/validation.lmdb (the official NVAE layout; "
            f"'nvae data build' writes it), or {root}/train and {root}/val (or test) as image folders or LMDBs; "
            f"found {present or 'nothing'} (for one folder of images use the 'folder' data set)")
