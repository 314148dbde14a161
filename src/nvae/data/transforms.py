"""PIL image -> tensor pipelines: conversion to grey / RGB, resizing, cropping, flips."""
from __future__ import annotations

import functools
from typing import Optional, Tuple

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


#: The official ``datasets.py``: CelebA 64 crops the aligned 178x218 image to this PIL box, then resizes to 64.
CELEBA64_CROP = (15, 40, 15 + 148, 40 + 148)


def celeba64_transform(flip: bool, image_size: int = 64, channels: int = 3):
    """The CelebA-64 pipeline on an aligned 178x218 CelebA image: crop :data:`CELEBA64_CROP`,
    resize to ``image_size``, random horizontal flip when ``flip``."""
    return image_transform(image_size, channels, flip, crop_box=CELEBA64_CROP)
