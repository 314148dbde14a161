"""``nvae data build``: the official NVAE LMDBs written from what users download.

Each kind writes ``OUT/train.lmdb`` and ``OUT/validation.lmdb`` (CelebA-64 also
``OUT/test.lmdb``) in the layout of the official scripts (:mod:`.official_layout`):

``celeba64``     torchvision's CelebA folder (``celeba/img_align_celeba`` and
                 ``celeba/list_eval_partition.txt``): partition 0 -> train, 1 -> validation,
                 2 -> test, in the partition file's order; records are the JPEG files as
                 they are (``create_celeba64_lmdb.py``).
``ffhq256``      a folder of FFHQ images (``00000.png`` ...; sub-folders allowed), taken in
                 sorted order and split by a random permutation: the first ``num_train``
                 (default 9/10: 63,000 of 70,000) train, the rest validation; each image
                 resized to 256x256 (PIL bilinear) and stored as raw HWC RGB bytes
                 (``create_ffhq_lmdb.py``). The permutation is stored in ``OUT/ffhq_split.json``
                 and reused by every later build into ``OUT``.
``celebahq256``  a folder of CelebA-HQ images in sorted order: the first ``num_train``
                 (default 9/10: 27,000 of 30,000) train, the rest validation; resized to
                 256x256 and stored as raw pixels like FFHQ.
``imagenet32``   image-net.org's downsampled ImageNet 32x32 (``train_data_batch_1`` ..
                 ``train_data_batch_10`` and ``val_data``, ``.npz`` with ``data`` of shape
                 (N, 3072) in CHW order), stored as raw 32x32x3 HWC bytes, as the official
                 tfrecord conversion stores them.

Writing is atomic and resumable: a split is written into ``NAME.lmdb.partial`` in
commits of ``commit_every`` records, each commit also recording how many records are in
(and a fingerprint of the inputs) under a key the finished LMDB does not keep; a build
that is killed continues after the last commit when run again, and the partial LMDB is
renamed to ``NAME.lmdb`` only when complete. ``OUT/nvae_build.json`` describes the build;
a finished build, or LMDBs that another build wrote, are never overwritten.
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from .lmdb_store import _require_lmdb
from .official_layout import OFFICIAL_FILES
from .registry import DataError

#: What :func:`build_official_lmdbs` can write.
BUILD_KINDS = ("celeba64", "ffhq256", "celebahq256", "imagenet32")

#: Key of the resume record inside a partial LMDB (removed before it is renamed to NAME.lmdb).
PROGRESS_KEY = b"__nvae_build_progress__"

BUILD_RECORD = "nvae_build.json"
FFHQ_SPLIT = "ffhq_split.json"


@dataclass
class _Split:
    """One LMDB to write: ``count`` records, record ``i`` given by ``record(i)``."""

    name: str
    count: int
    record: Callable[[int], bytes]
    inputs: str   # what identifies the inputs, hashed into the fingerprint


def _write_json(path: Path, obj) -> None:
    from ..formats.checkpoint import atomic_write
    text = json.dumps(obj, indent=1) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _raw_pixels(path: Path, side: int) -> bytes:
    """An image file -> raw ``side x side x 3`` uint8 RGB bytes (resized with PIL's bilinear filter)."""
    import numpy as np
    from PIL import Image
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if img.size != (side, side):
                img = img.resize((side, side), resample=Image.BILINEAR)
            return np.asarray(img, dtype=np.uint8).tobytes()
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read image {path} ({type(e).__name__}: {e}); replace or remove it and run the "
                        "build again (it continues where it stopped)") from None


def _image_files(source: Path) -> List[Path]:
    from .sources import _find_image_files
    files = [source / f for f in _find_image_files(source)]
    if len(files) < 2:
        raise DataError(f"{source} holds {len(files)} image file(s); point the build at the folder of the data "
                        "set's images (at least 2, one for each split)")
    return files


def _num_train(num_train: Optional[int], n: int) -> int:
    k = min(max(1, round(0.9 * n)), n - 1) if num_train is None else num_train
    if not 1 <= k < n:
        raise DataError(f"num_train={k} must leave at least one of the {n} images for each split; "
                        f"give --num-train between 1 and {n - 1}")
    return k


def _names(files: Sequence[Path], source: Path) -> str:
    return "\n".join(f.relative_to(source).as_posix() for f in files)


def _ffhq_permutation(out: Path, n: int, seed: int, num_train: Optional[int]) -> Dict[str, List[int]]:
    """The FFHQ split: read from ``out/ffhq_split.json`` when there, else drawn (seeded) and stored."""
    path = out / FFHQ_SPLIT
    if path.exists():
        stored = json.loads(path.read_text())
        if stored.get("num_images") != n:
            raise DataError(f"{path} splits {stored.get('num_images')} images but the source holds {n}; "
                            "point at the same image folder, or use a new output folder")
        return stored
    import numpy as np
    k = _num_train(num_train, n)
    perm = np.random.RandomState(seed).permutation(n).tolist()
    split = {"num_images": n, "seed": seed, "train": perm[:k], "validation": perm[k:]}
    out.mkdir(parents=True, exist_ok=True)
    _write_json(path, split)
    return split


def _plan_ffhq(source: Path, out: Path, seed: int, num_train: Optional[int]) -> List[_Split]:
    files = _image_files(source)
    split = _ffhq_permutation(out, len(files), seed, num_train)
    names = _names(files, source)
    return [_Split(name, len(split[name]), lambda i, ind=split[name]: _raw_pixels(files[ind[i]], 256),
                   f"{names}\n{split[name]}") for name in ("train", "validation")]


def _plan_celebahq(source: Path, num_train: Optional[int]) -> List[_Split]:
    files = _image_files(source)
    k = _num_train(num_train, len(files))
    parts = {"train": files[:k], "validation": files[k:]}
    return [_Split(name, len(fs), lambda i, fs=fs: _raw_pixels(fs[i], 256), _names(fs, source))
            for name, fs in parts.items()]


def _celeba_folder(source: Path) -> Path:
    for folder in (source / "celeba", source):
        if (folder / "list_eval_partition.txt").is_file() and (folder / "img_align_celeba").is_dir():
            return folder
    raise DataError(f"{source} is not torchvision's CelebA layout: expected {source}/celeba/img_align_celeba/ and "
                    f"{source}/celeba/list_eval_partition.txt (torchvision.datasets.CelebA(download=True) fetches "
                    "them)")


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path} ({e}); the CelebA folder is incomplete") from None


def _plan_celeba64(source: Path) -> List[_Split]:
    folder = _celeba_folder(source)
    parts: Dict[str, List[str]] = {"train": [], "validation": [], "test": []}
    by_code = {"0": "train", "1": "validation", "2": "test"}
    partition = folder / "list_eval_partition.txt"
    for n, line in enumerate(partition.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in by_code:
            raise DataError(f"{partition} line {n}: expected 'FILE PARTITION' with partition 0, 1 or 2, "
                            f"got {line!r}")
        parts[by_code[fields[1]]].append(fields[0])
    images = folder / "img_align_celeba"
    return [_Split(name, len(names), lambda i, names=names: _read_file(images / names[i]), "\n".join(names))
            for name, names in parts.items() if names]


def _npz_rows(path: Path) -> int:
    """Rows of ``data`` in an .npz, from the array header alone (no decompression)."""
    import numpy as np
    try:
        with zipfile.ZipFile(path) as z, z.open("data.npy") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as e:
        raise DataError(f"{path} is not a downsampled-ImageNet .npz batch with a 'data' array ({e}); download "
                        "the npz version (Imagenet32_train_npz.zip, Imagenet32_val_npz.zip)") from None
    if len(shape) != 2 or shape[1] != 3072 or dtype != np.uint8:
        raise DataError(f"{path}: 'data' is {dtype} {shape}, expected uint8 (N, 3072) (32x32 images, CHW order)")
    return shape[0]


class _NpzRows:
    """Record ``i`` of a sequence of .npz batches, one batch in memory at a time."""

    def __init__(self, paths: Sequence[Path]):
        self.paths, self.rows = list(paths), [_npz_rows(p) for p in paths]
        self.starts = [sum(self.rows[:j]) for j in range(len(self.rows))]
        self.loaded, self.data = None, None

    def __call__(self, i: int) -> bytes:
        import bisect

        import numpy as np
        j = bisect.bisect_right(self.starts, i) - 1
        if self.loaded != j:
            with np.load(self.paths[j], allow_pickle=False) as z:
                self.data, self.loaded = z["data"], j
        # CHW rows as published; the official LMDB holds HWC bytes
        return np.ascontiguousarray(self.data[i - self.starts[j]].reshape(3, 32, 32).transpose(1, 2, 0)).tobytes()


def _plan_imagenet32(source: Path) -> List[_Split]:
    def find(stem: str) -> Optional[Path]:
        return next((p for p in (source / f"{stem}.npz", source / stem) if p.is_file()), None)

    train = [find(f"train_data_batch_{j}") for j in range(1, 11)]
    val = find("val_data")
    missing = [f"train_data_batch_{j}" for j, p in enumerate(train, 1) if p is None] + ([] if val else ["val_data"])
    if missing:
        raise DataError(f"{source} lacks {', '.join(missing)} (.npz); it should hold image-net.org's downsampled "
                        "ImageNet 32x32 batches train_data_batch_1..10.npz and val_data.npz")
    splits = []
    for name, paths in (("train", train), ("validation", [val])):
        rows = _NpzRows(paths)
        ident = "\n".join(f"{p.name} {r} {p.stat().st_size}" for p, r in zip(paths, rows.rows))
        splits.append(_Split(name, sum(rows.rows), rows, ident))
    return splits


def _plan(kind: str, source: Path, out: Path, seed: int, num_train: Optional[int]) -> List[_Split]:
    if kind not in BUILD_KINDS:
        raise DataError(f"unknown build kind {kind!r}; choose one of {', '.join(BUILD_KINDS)}")
    if not source.is_dir():
        raise DataError(f"source folder {source} does not exist or is not a folder; point at the downloaded data")
    if kind == "celeba64":
        return _plan_celeba64(source)
    if kind == "ffhq256":
        return _plan_ffhq(source, out, seed, num_train)
    if kind == "celebahq256":
        return _plan_celebahq(source, num_train)
    return _plan_imagenet32(source)


def _commit(env, items, progress_record: bytes) -> None:
    """One write transaction: ``items`` and the resume record together (so they land or fail as one);
    the map grows when full."""
    import lmdb
    while True:
        try:
            with env.begin(write=True) as txn:
                for key, value in items:
                    txn.put(key, value)
                txn.put(PROGRESS_KEY, progress_record)
            return
        except lmdb.MapFullError:
            env.set_mapsize(2 * env.info()["map_size"])


def _committed(env, partial: Path, fingerprint: str) -> int:
    """How many records a partial LMDB already holds (0 for a new one); refuses one of other inputs."""
    with env.begin() as txn:
        stored = txn.get(PROGRESS_KEY)
        entries = env.stat()["entries"]
    if stored is None:
        if entries:
            raise DataError(f"{partial} holds {entries} records but no build progress; remove it and build again")
        return 0
    record = json.loads(stored)
    if record["fingerprint"] != fingerprint:
        raise DataError(f"{partial} is a partial build from other inputs or options; remove it (or run the build "
                        "with the same source and options) to continue")
    return record["count"]


def _write_split(out: Path, split: _Split, fingerprint: str, progress: bool, commit_every: int) -> None:
    """Write ``split`` to ``out/NAME.lmdb`` through ``NAME.lmdb.partial``, continuing a killed run."""
    import lmdb
    from tqdm import tqdm
    final, partial = out / f"{split.name}.lmdb", out / f"{split.name}.lmdb.partial"
    env = lmdb.open(str(partial), map_size=1 << 28)
    try:
        done = _committed(env, partial, fingerprint)
        with tqdm(total=split.count, initial=done, desc=final.name, unit="img", disable=not progress,
                  dynamic_ncols=True) as bar:
            for start in range(done, split.count, commit_every):
                stop = min(split.count, start + commit_every)
                items = [(str(i).encode(), split.record(i)) for i in range(start, stop)]
                _commit(env, items, json.dumps({"count": stop, "fingerprint": fingerprint}).encode())
                bar.update(stop - start)
        with env.begin(write=True) as txn:
            txn.delete(PROGRESS_KEY)
        env.sync(True)
    finally:
        env.close()
    os.replace(partial, final)   # one rename: NAME.lmdb exists only when complete


def _refuse_finished(out: Path) -> None:
    """Refuse an output folder holding a finished build, or LMDBs that no unfinished nvae build there owns."""
    record = out / BUILD_RECORD
    if record.exists():
        stored = json.loads(record.read_text())
        if stored.get("complete"):
            raise DataError(f"{out} already holds a finished {stored.get('kind')} build ({BUILD_RECORD}); refusing "
                            "to overwrite it: remove the folder or choose another output")
        return
    existing = [name for name in OFFICIAL_FILES if (out / name).exists()]
    if existing:
        raise DataError(f"{out} already holds {', '.join(existing)}; refusing to overwrite: remove them or choose "
                        "another output folder")


def _claim(out: Path, kind: str, splits: List[_Split], fingerprint: str) -> None:
    """Record this build in ``out``, refusing to continue an unfinished build of other inputs there."""
    record = out / BUILD_RECORD
    if record.exists() and json.loads(record.read_text()).get("fingerprint") != fingerprint:
        raise DataError(f"{out} holds an unfinished build of other inputs or options ({BUILD_RECORD}); run it "
                        "with the same ones to continue, or choose another output")
    _write_json(record, {"kind": kind, "complete": False, "fingerprint": fingerprint,
                         "counts": {s.name: s.count for s in splits}})


def build_official_lmdbs(kind: str, source, out, *, seed: int = 0, num_train: Optional[int] = None,
                         progress: bool = True, commit_every: int = 1000) -> Dict[str, int]:
    """Write the official NVAE LMDBs of ``kind`` (:data:`BUILD_KINDS`) from ``source`` into ``out``.

    Returns the number of records per LMDB name (``{"train": ..., "validation": ...}``).
    ``seed`` draws the FFHQ permutation (stored, then reused); ``num_train`` overrides
    the default train/validation sizes of ``ffhq256`` and ``celebahq256``; ``progress``
    shows a tqdm bar per LMDB; ``commit_every`` records go in one transaction (the unit
    of resumption). The module docstring gives each kind's inputs, split and records.
    A run killed part way continues where it stopped when called again with the same
    arguments.
    """
    _require_lmdb()
    if commit_every < 1:
        raise DataError(f"commit_every must be >= 1, got {commit_every}")
    source, out = Path(source), Path(out)
    _refuse_finished(out)
    splits = _plan(kind, source, out, seed, num_train)
    fingerprint = _digest(json.dumps([kind, seed, num_train, [(s.name, s.count, _digest(s.inputs))
                                                               for s in splits]]))
    _claim(out, kind, splits, fingerprint)
    for split in splits:
        if not (out / f"{split.name}.lmdb").exists():   # finished by an earlier run of this build
            _write_split(out, split, fingerprint, progress, commit_every)
    counts = {s.name: s.count for s in splits}
    _write_json(out / BUILD_RECORD, {"kind": kind, "complete": True, "fingerprint": fingerprint, "counts": counts,
                                    "source": str(source.resolve()), "seed": seed, "num_train": num_train})
    return counts
