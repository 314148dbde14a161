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
                loaded: it is skipped (warned about once, in one line on the logger
                ``nvae.data.sources`` naming the file or the LMDB and key, and why;
                counted; the next readable image is returned) or, with ``strict``,
                raises. Default ``"verify"`` for ``folder`` and ``lmdb`` (user data,
                often small and messy) and ``"none"`` for the large curated sets.

Image sources (``folder``, ``lmdb`` and the named image sets): a split is read from
an image folder or an LMDB (see :func:`write_lmdb` for the record layout). The
datasets expose ``skipped`` (how many unreadable images were met in this process;
DataLoader worker processes keep their own counts) and ``skipped_files``.

Modules: :mod:`.registry` (``build_dataset``, ``register``, ``prepare_batch``),
:mod:`.transforms` (PIL image -> tensor), :mod:`.sources` (image folders, splits,
:class:`ImageDataset`), :mod:`.lmdb_store` (reading and writing LMDBs),
:mod:`.official_layout` (the official ``train.lmdb`` / ``validation.lmdb`` layout, raw
and encoded records), :mod:`.build` (``nvae data build``: the official LMDBs from
downloaded data) and :mod:`.datasets` (the registered data sets). Import the public names from here.
"""
from __future__ import annotations

from . import datasets  # noqa: F401  (registers the data sets)
from . import binary, lsun  # noqa: F401  (registers omniglot, stacked_mnist, lsun_*)
from .build import BUILD_KINDS, build_official_lmdbs
from .lmdb_store import write_lmdb
from .registry import SCANS, DataError, available, build_dataset, check_images_fit, prepare_batch, quantize, register
from .sources import HELD_OUT, IMAGE_EXTENSIONS, SPLIT_DIRS, ImageDataset
from .transforms import CELEBA64_CROP, celeba64_transform, image_transform

__all__ = ["DataError", "register", "available", "build_dataset", "quantize", "prepare_batch",
           "ImageDataset", "image_transform", "celeba64_transform", "write_lmdb", "IMAGE_EXTENSIONS",
           "CELEBA64_CROP", "SPLIT_DIRS", "HELD_OUT", "SCANS", "check_images_fit",
           "BUILD_KINDS", "build_official_lmdbs"]

