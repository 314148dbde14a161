"""The registered data sets: digits, mnist, cifar10, celeba64, imagenet32, celebahq256, ffhq256, folder, lmdb."""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils.data import Dataset, TensorDataset

from .lmdb_store import _is_lmdb, _require_lmdb
from .registry import DataError, register
from .sources import _image_split, _need_root, _split_dir
from .transforms import CELEBA64_CROP, celeba64_transform


class _Unlabelled(Dataset):
    def __init__(self, base: Dataset, source_description: Optional[str] = None):
        self.base = base
        if source_description is not None:   # what reports (the eval JSON) say about the images used
            self.source_description = f"{source_description}, {len(base)} images"

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
    first, stop = (0, 1500) if split == "train" else (1500, len(images))
    data = TensorDataset(images[first:stop])
    # what reports (the eval JSON's data_source) say about the images used
    data.source_description = (f"scikit-learn's load_digits(), images {first} to {stop - 1}, "
                               f"{stop - first} images")
    return data


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
    """CelebA 64x64 (the official ``datasets.py``): aligned 178x218 images cropped to the box
    (15, 40, 163, 188), resized to 64, flipped on the training split.

    Reads, in this order: the official layout (``ROOT/train.lmdb`` and
    ``ROOT/validation.lmdb`` of encoded images, as ``nvae data build celeba64`` or the
    official ``create_celeba64_lmdb.py`` write them; evaluation on ``validation.lmdb``);
    torchvision's layout (``ROOT/celeba/img_align_celeba`` and the list files;
    ``download=True`` lets torchvision fetch them), evaluated on CelebA's validation
    partition as the official code is; or ``ROOT/train`` and ``ROOT/val`` (or ``test``)
    holding aligned images as image folders or LMDBs.
    """
    path = _need_root(root, "celeba64")
    official = (path / "train.lmdb").is_dir()
    if download or (not official and (path / "celeba" / "img_align_celeba").is_dir()):
        from torchvision import datasets
        tf = celeba64_transform(flip and split == "train", image_size, channels)
        partition = "train" if split == "train" else "valid"
        try:
            base = datasets.CelebA(str(path), split=partition, target_type=[], transform=tf, download=download)
        except (RuntimeError, OSError) as e:
            raise DataError(f"CelebA under {path}/celeba is incomplete ({e}); it needs img_align_celeba/ and the "
                            "list_*.txt / identity_CelebA.txt files (download=True fetches them)") from None
        return _Unlabelled(base, f"torchvision CelebA {path / 'celeba'} (partition {partition!r})")
    return _image_split("celeba64", split, root, image_size, channels, flip, strict, scan, crop_box=CELEBA64_CROP,
                        require_split_dirs=True)


@register("imagenet32")
def _imagenet32(split: str, root=None, download=False, image_size: int = 32, channels: int = 3, flip: bool = True,
                strict: bool = False, scan: str = "none") -> Dataset:
    """Downsampled ImageNet 32x32 (van den Oord et al. 2016): the official layout
    (``ROOT/train.lmdb`` and ``ROOT/validation.lmdb``, raw 32x32x3 pixels, as
    ``nvae data build imagenet32`` writes them), or ``ROOT/train`` and ``ROOT/val``, each a
    folder of 32x32 images (any sub-folder layout) or an LMDB; flips on train."""
    return _image_split("imagenet32", split, root, image_size, channels, flip, strict, scan, require_split_dirs=True)


@register("celebahq256")
def _celebahq256(split: str, root=None, download=False, image_size: int = 256, channels: int = 3,
                 flip: bool = True, strict: bool = False, scan: str = "none") -> Dataset:
    """CelebA-HQ 256x256: the official layout (``ROOT/train.lmdb`` and
    ``ROOT/validation.lmdb``, raw 256x256x3 pixels), or ``ROOT/train`` and ``ROOT/val`` as
    image folders or LMDBs; flips on train. The 5-bit quantisation is the model's
    (``num_x_bits``), applied by :func:`prepare_batch`."""
    return _image_split("celebahq256", split, root, image_size, channels, flip, strict, scan,
                        require_split_dirs=True)


@register("ffhq256")
def _ffhq256(split: str, root=None, download=False, image_size: int = 256, channels: int = 3, flip: bool = True,
             strict: bool = False, scan: str = "none") -> Dataset:
    """FFHQ 256x256: the official layout (``ROOT/train.lmdb`` and ``ROOT/validation.lmdb``,
    raw 256x256x3 pixels), or ``ROOT/train`` and ``ROOT/val`` as image folders or LMDBs; flips on train
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
