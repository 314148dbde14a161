"""The data-set registry and the batch preparation every data set shares: ``build_dataset``, ``prepare_batch``."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from torch.utils.data import Dataset

#: Values of the ``scan`` option (see the package docstring).
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


def native_shape(name: str) -> Optional[Tuple[int, int, int]]:
    """(C, H, W) of a data set that comes in one shape only; None for those that resize (or unknown names)."""
    entry = _REGISTRY.get(name)
    return None if entry is None else entry.shape


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


def check_images_fit(data: Dataset, config, name: str) -> Dataset:
    """``data`` if its images have the shape a model of ``config`` takes; a clear error otherwise."""
    shape = tuple(data[0][0].shape)
    expected = (config.in_channels, config.image_size, config.image_size)
    if shape != expected:
        raise DataError(f"data set {name!r} yields images of shape {shape} but the model expects {expected}; "
                        "pick the data set the model was trained on (or the matching preset, or override "
                        "in_channels / image_size)")
    return data


def quantize(x: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Reduce 8-bit images in [0, 1] to ``num_bits`` (the official ``pre_process``):
    ``floor(x * 255 / 2^(8 - bits)) / (2^bits - 1)``."""
    if num_bits == 8:
        return x
    return torch.floor(x * 255 / 2 ** (8 - num_bits)) / (2 ** num_bits - 1)


def prepare_batch(x: torch.Tensor, config, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """What a model of ``config`` (an :class:`~nvae.NVAEConfig`) sees: images binarised afresh
    (Bernoulli decoder) or quantised to ``config.num_x_bits``."""
    if config.decoder == "bernoulli":
        return torch.bernoulli(x, generator=generator)
    return quantize(x, config.num_x_bits)
