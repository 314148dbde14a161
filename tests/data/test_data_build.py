"""`nvae data build`: the official LMDBs written from downloaded data (nvae.data.build).

Tiny fake inputs in each published layout (a folder of PNGs, torchvision's CelebA folder
with its partition file, downsampled-ImageNet .npz batches); every record is compared
with what the official scripts store, and a build killed part way and run again must
equal an uninterrupted one.
"""
import json

import numpy as np
import pytest
from PIL import Image

import nvae.data.build as build
from nvae.cli import main
from nvae.data import DataError, build_dataset, build_official_lmdbs

lmdb = pytest.importorskip("lmdb")


def _records(path) -> dict:
    env = lmdb.open(str(path), readonly=True, lock=False)
    with env.begin() as txn:
        recs = {bytes(k): bytes(v) for k, v in txn.cursor()}
    env.close()
    return recs


def _pngs(folder, n: int, side: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"{i:05d}.png"
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _resized(path, side=256) -> bytes:
    """What the official create_ffhq_lmdb.py stores for one image."""
    im = Image.open(path).resize((side, side), resample=Image.BILINEAR)
    return np.asarray(im, dtype=np.uint8).reshape(side, side, 3).tobytes()


def _npz_batches(folder, rows=(3, 2, 2, 2, 2, 2, 2, 2, 2, 4), val_rows=5) -> dict:
    """Fake image-net.org Imagenet32 .npz batches; returns the 'data' arrays by split."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    out = {"train": [], "validation": []}
    for j, n in enumerate(rows, 1):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        np.savez(folder / f"train_data_batch_{j}.npz", data=data, labels=np.arange(n))
        out["train"].append(data)
    val = rng.integers(0, 256, (val_rows, 3072), dtype=np.uint8)
    np.savez(folder / "val_data.npz", data=val, labels=np.arange(val_rows))
    out["validation"].append(val)
    return {k: np.concatenate(v) for k, v in out.items()}


def test_ffhq_stored_permutation_resize_and_raw_records(tmp_path):
    files = _pngs(tmp_path / "ffhq" / "00000", 10, 40)
    counts = build_official_lmdbs("ffhq256", tmp_path / "ffhq", tmp_path / "out", seed=3, progress=False)
    assert counts == {"train": 9, "validation": 1}   # 9/10 as 63,000 / 70,000
    split = json.loads((tmp_path / "out" / "ffhq_split.json").read_text())
    assert sorted(split["train"] + split["validation"]) == list(range(10))
    assert split["train"] + split["validation"] == np.random.RandomState(3).permutation(10).tolist()
    for name in ("train", "validation"):
        recs = _records(tmp_path / "out" / f"{name}.lmdb")
        assert recs == {str(i).encode(): _resized(files[j]) for i, j in enumerate(split[name])}
    ds = build_dataset("ffhq256", "test", str(tmp_path / "out"))
    assert len(ds) == 1 and "validation.lmdb" in ds.source_description and tuple(ds[0][0].shape) == (3, 256, 256)
    with pytest.raises(DataError, match="finished ffhq256 build.*refusing to overwrite"):
        build_official_lmdbs("ffhq256", tmp_path / "ffhq", tmp_path / "out", progress=False)
    # the stored permutation is what a later build into a folder holding it uses, whatever the seed
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / "ffhq_split.json").write_text((tmp_path / "out" / "ffhq_split.json").read_text())
    build_official_lmdbs("ffhq256", tmp_path / "ffhq", tmp_path / "again", seed=99, progress=False)
    assert _records(tmp_path / "again" / "train.lmdb") == _records(tmp_path / "out" / "train.lmdb")


def test_celebahq_ordered_split_raw_pixels(tmp_path):
    files = _pngs(tmp_path / "hq", 5, 256) + _pngs(tmp_path / "hq" / "more", 1, 100, seed=1)
    counts = build_official_lmdbs("celebahq256", tmp_path / "hq", tmp_path / "out", num_train=4, progress=False)
    assert counts == {"train": 4, "validation": 2}
    train, val = _records(tmp_path / "out" / "train.lmdb"), _records(tmp_path / "out" / "validation.lmdb")
    assert train == {str(i).encode(): np.asarray(Image.open(f)).tobytes() for i, f in enumerate(files[:4])}
    assert val == {b"0": np.asarray(Image.open(files[4])).tobytes(), b"1": _resized(files[5])}
    with pytest.raises(DataError, match="num_train=6 must leave at least one of the 6 images"):
        build_official_lmdbs("celebahq256", tmp_path / "hq", tmp_path / "o2", num_train=6, progress=False)


def test_celeba64_from_torchvision_layout_by_partition(tmp_path):
    folder = tmp_path / "root" / "celeba"
    jpgs = folder / "img_align_celeba"
    jpgs.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"{i:06d}.jpg" for i in range(1, 7)]
    for name in names:
        Image.fromarray(rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)).save(jpgs / name, quality=90)
    parts = [0, 0, 1, 2, 0, 1]
    (folder / "list_eval_partition.txt").write_text("".join(f"{n} {p}\n" for n, p in zip(names, parts)))
    counts = build_official_lmdbs("celeba64", tmp_path / "root", tmp_path / "out", progress=False)
    assert counts == {"train": 3, "validation": 2, "test": 1}
    for name, code in (("train", 0), ("validation", 1), ("test", 2)):
        files = [n for n, p in zip(names, parts) if p == code]
        assert _records(tmp_path / "out" / f"{name}.lmdb") == \
            {str(i).encode(): (jpgs / f).read_bytes() for i, f in enumerate(files)}   # the JPEG files as they are
    ds = build_dataset("celeba64", "test", str(tmp_path / "out"))   # evaluation: CelebA's validation partition
    assert len(ds) == 2 and tuple(ds[0][0].shape) == (3, 64, 64)
    (folder / "list_eval_partition.txt").write_text("000001.jpg 7\n")
    with pytest.raises(DataError, match="line 1: expected 'FILE PARTITION' with partition 0, 1 or 2"):
        build_official_lmdbs("celeba64", tmp_path / "root", tmp_path / "o2", progress=False)
    with pytest.raises(DataError, match="not torchvision's CelebA layout.*list_eval_partition.txt"):
        build_official_lmdbs("celeba64", tmp_path, tmp_path / "o3", progress=False)


def test_imagenet32_npz_batches_to_raw_hwc(tmp_path):
    data = _npz_batches(tmp_path / "in")
    counts = build_official_lmdbs("imagenet32", tmp_path / "in", tmp_path / "out", progress=False)
    assert counts == {"train": 23, "validation": 5}
    for name, rows in data.items():
        hwc = rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)   # the published CHW rows as HWC images
        assert _records(tmp_path / "out" / f"{name}.lmdb") == \
            {str(i).encode(): np.ascontiguousarray(im).tobytes() for i, im in enumerate(hwc)}
    ds = build_dataset("imagenet32", "test", str(tmp_path / "out"), flip=False)
    first = data["validation"][0].reshape(3, 32, 32)
    assert np.array_equal((ds[0][0] * 255).round().byte().numpy(), first)
    (tmp_path / "in" / "train_data_batch_7.npz").unlink()
    with pytest.raises(DataError, match="lacks train_data_batch_7"):
        build_official_lmdbs("imagenet32", tmp_path / "in", tmp_path / "o2", progress=False)


def test_existing_lmdbs_are_never_overwritten(tmp_path):
    _npz_batches(tmp_path / "in")
    (tmp_path / "out" / "validation.lmdb").mkdir(parents=True)
    with pytest.raises(DataError, match="already holds validation.lmdb; refusing to overwrite"):
        build_official_lmdbs("imagenet32", tmp_path / "in", tmp_path / "out", progress=False)


class _Killed(Exception):
    pass


@pytest.mark.parametrize("kill_after", [1, 7])   # in train.lmdb; after train.lmdb, in validation.lmdb
def test_a_killed_build_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, kill_after):
    _npz_batches(tmp_path / "in")
    build_official_lmdbs("imagenet32", tmp_path / "in", tmp_path / "ref", progress=False, commit_every=4)
    real, commits = build._commit, []

    def dying(env, items, progress):
        if len(commits) == kill_after:
            raise _Killed
        real(env, items, progress)
        commits.append([k for k, _ in items])

    monkeypatch.setattr(build, "_commit", dying)
    with pytest.raises(_Killed):
        build_official_lmdbs("imagenet32", tmp_path / "in", tmp_path / "out", progress=False, commit_every=4)
    out = tmp_path / "out"
    assert (out / "train.lmdb").exists() == (kill_after == 7)   # a split appears only when complete
    # train: 23 records in 6 commits of up to 4; the kill leaves one commit (4 records) of the split it was in
    partial = out / f"{'validation' if kill_after == 7 else 'train'}.lmdb.partial"
    assert json.loads(_records(partial)[build.PROGRESS_KEY])["count"] == 4
    with pytest.raises(DataError, match="unfinished build of other inputs"):
        build_official_lmdbs("imagenet32", tmp_path / "in", out, progress=False, commit_every=4, seed=1)

    commits.clear()
    monkeypatch.setattr(build, "_commit", lambda env, items, progress: (real(env, items, progress),
                                                                         commits.append([k for k, _ in items])))
    build_official_lmdbs("imagenet32", tmp_path / "in", out, progress=False, commit_every=4)
    assert commits[0][0] == b"4"   # continued after the last commit, not from the start
    assert len(commits) == {1: 5 + 2, 7: 1}[kill_after]   # nothing committed twice
    for name in ("train", "validation"):
        assert _records(out / f"{name}.lmdb") == _records(tmp_path / "ref" / f"{name}.lmdb")
        assert not (out / f"{name}.lmdb.partial").exists()
    assert json.loads((out / "nvae_build.json").read_text())["complete"] is True


def test_a_partial_lmdb_of_other_inputs_is_refused(tmp_path):
    _pngs(tmp_path / "hq", 4, 16)
    (tmp_path / "out" / "train.lmdb.partial").mkdir(parents=True)
    env = lmdb.open(str(tmp_path / "out" / "train.lmdb.partial"))
    with env.begin(write=True) as txn:
        txn.put(build.PROGRESS_KEY, json.dumps({"count": 1, "fingerprint": "other"}).encode())
    env.close()
    with pytest.raises(DataError, match="partial build from other inputs"):
        build_official_lmdbs("celebahq256", tmp_path / "hq", tmp_path / "out", progress=False)


def test_cli_data_build(tmp_path, capsys):
    _npz_batches(tmp_path / "in")
    out = tmp_path / "out"
    assert main(["data", "build", "imagenet32", str(tmp_path / "in"), str(out), "--no-progress"]) == 0
    printed = capsys.readouterr()
    assert f"{out}/train.lmdb: 23 records" in printed.out and f"--data {out}" in printed.out
    assert printed.err == ""
    assert main(["data", "build", "imagenet32", str(tmp_path / "in"), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refusing to overwrite" in err
    assert main(["data", "build", "mnist", str(tmp_path), str(out)]) == 2
