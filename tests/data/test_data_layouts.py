"""The official NVAE LMDB layouts read as the official loader reads them (nvae.data.official_layout).

Each test writes small LMDBs as the official scripts write them (``train.lmdb``,
``validation.lmdb``, ``test.lmdb``; keys ``str(i)``; raw HWC uint8 pixels or encoded
files) and compares what our data sets yield with torchvision's transforms, built here
as the official ``datasets.py`` builds them, applied to the same PIL images.
"""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from nvae import NVAE, NVAEConfig
from nvae.cli import main
from nvae.data import DataError, build_dataset
from nvae.data.official_layout import raw_side

lmdb = pytest.importorskip("lmdb")


def _pixels(n: int, side: int, seed: int, height=None) -> list:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (height or side, side, 3), dtype=np.uint8) for _ in range(n)]


def _put(path, records) -> None:
    """An LMDB as the official scripts write one: record i under str(i).encode()."""
    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for i, rec in enumerate(records):
            txn.put(str(i).encode(), rec)
    env.close()


def _jpeg(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _official_generic(size: int, flip: bool):
    """The official transform of ffhq / celeba256 / imagenet-oord: Resize, flip on train, ToTensor."""
    return transforms.Compose([transforms.Resize(size)] + ([transforms.RandomHorizontalFlip()] if flip else [])
                              + [transforms.ToTensor()])


def _official_celeba64(flip: bool):
    """The official CelebA-64 transform: crop the PIL box (15, 40, 163, 188), Resize(64), flip on train."""
    return transforms.Compose([transforms.Lambda(lambda im: im.crop((15, 40, 178 - 15, 218 - 30))),
                               transforms.Resize(64)] + ([transforms.RandomHorizontalFlip()] if flip else [])
                              + [transforms.ToTensor()])


def _same_as(ds, images, tf, seed=3) -> None:
    """``ds[i]`` equals ``tf(images[i])`` for every i, both drawn from the same RNG state (the flips)."""
    assert len(ds) == len(images)
    for i, img in enumerate(images):
        torch.manual_seed(seed + i)
        (ours,) = ds[i]
        torch.manual_seed(seed + i)
        assert torch.equal(ours, tf(img)), f"image {i}"


@pytest.mark.parametrize("name,side,size", [("imagenet32", 8, 8), ("imagenet32", 12, 8), ("ffhq256", 8, 6),
                                            ("celebahq256", 8, 8)])
def test_raw_pixel_layout_matches_the_official_loader(tmp_path, name, side, size):
    train, val, test = _pixels(5, side, 0), _pixels(3, side, 1), _pixels(2, side, 2)
    train[0][0, 0] = (0xFF, 0xD8, 0xFF)   # raw pixels that begin with a JPEG signature are still raw pixels
    for fname, imgs in (("train.lmdb", train), ("validation.lmdb", val), ("test.lmdb", test)):
        _put(tmp_path / fname, [a.tobytes() for a in imgs])
    tr = build_dataset(name, "train", str(tmp_path), image_size=size)
    ev = build_dataset(name, "test", str(tmp_path), image_size=size)
    assert (len(tr), len(ev)) == (5, 3)   # the lengths of the LMDBs; validation.lmdb rather than test.lmdb
    _same_as(tr, [Image.fromarray(a, mode="RGB") for a in train], _official_generic(size, flip=True))
    _same_as(ev, [Image.fromarray(a, mode="RGB") for a in val], _official_generic(size, flip=False))
    assert "validation.lmdb" in ev.source_description and "3 images" in ev.source_description
    assert f"raw {side}x{side}x3" in ev.source_description


def test_encoded_celeba64_layout_matches_the_official_loader(tmp_path):
    photos = {s: _pixels(n, 178, seed, height=218) for s, n, seed in (("train", 3, 0), ("validation", 2, 1),
                                                                       ("test", 4, 2))}
    coded = {s: [_jpeg(a) for a in arrs] for s, arrs in photos.items()}
    for s, recs in coded.items():
        _put(tmp_path / f"{s}.lmdb", recs)
    (tmp_path / "celeba" / "img_align_celeba").mkdir(parents=True)   # the official files come first
    tr, ev = (build_dataset("celeba64", split, str(tmp_path)) for split in ("train", "test"))
    assert (len(tr), len(ev)) == (3, 2)
    decoded = {s: [Image.open(io.BytesIO(r)).convert("RGB") for r in recs] for s, recs in coded.items()}
    _same_as(tr, decoded["train"], _official_celeba64(flip=True))
    _same_as(ev, decoded["validation"], _official_celeba64(flip=False))
    assert "encoded images" in ev.source_description and "validation.lmdb" in ev.source_description
    assert raw_side(coded["train"][0]) is None


def test_without_validation_lmdb_the_test_lmdb_is_evaluated(tmp_path):
    _put(tmp_path / "train.lmdb", [a.tobytes() for a in _pixels(2, 4, 0)])
    test = _pixels(3, 4, 1)
    _put(tmp_path / "test.lmdb", [a.tobytes() for a in test])
    ev = build_dataset("imagenet32", "test", str(tmp_path), image_size=4)
    assert len(ev) == 3 and "test.lmdb" in ev.source_description
    _same_as(ev, [Image.fromarray(a) for a in test], _official_generic(4, flip=False))


def test_a_missing_layout_names_the_folder_and_the_files(tmp_path):
    _put(tmp_path / "train.lmdb", [a.tobytes() for a in _pixels(2, 4, 0)])
    for name in ("ffhq256", "celebahq256", "imagenet32", "celeba64"):
        with pytest.raises(DataError) as err:
            build_dataset(name, "test", str(tmp_path))
        msg = str(err.value)
        assert f"{tmp_path}/train.lmdb" in msg and f"{tmp_path}/validation.lmdb" in msg and "nvae data build" in msg
        assert "found ['train.lmdb']" in msg


def test_a_raw_record_of_the_wrong_size_is_named(tmp_path, caplog):
    good = [a.tobytes() for a in _pixels(3, 4, 0)]
    _put(tmp_path / "train.lmdb", good[:2] + [_pixels(1, 5, 1)[0].tobytes()] + [b"\x01" * 47])
    _put(tmp_path / "validation.lmdb", good)
    ds = build_dataset("imagenet32", "train", str(tmp_path), image_size=4)   # scan off: found when loading
    ds[1]
    with pytest.raises(DataError, match=r"train\.lmdb\[2\] has 75 bytes \(5x5x3\) but .* 4x4x3 = 48 bytes"):
        ds[2]
    with pytest.raises(DataError, match=r"train\.lmdb\[3\] has 47 bytes \(not 3\*s\*s for any side s\)"):
        ds[3]
    with pytest.raises(DataError, match=r"train\.lmdb\[2\]"):   # a scan finds it at construction
        build_dataset("imagenet32", "train", str(tmp_path), image_size=4, scan="verify")
    caplog.clear()
    for scan in ("verify", "load"):   # good raw records pass both scans, none skipped
        ds = build_dataset("imagenet32", "test", str(tmp_path), image_size=4, scan=scan)
        assert len(ds) == 3 and ds.skipped == 0
    assert "skipping" not in caplog.text


def test_raw_side_rule():
    assert raw_side(bytes(3 * 7 * 7)) == 7
    assert raw_side(bytes(3 * 7 * 7 + 3)) is None and raw_side(b"") is None
    png = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(png, format="PNG")
    assert raw_side(png.getvalue()) is None


def test_the_eval_json_names_the_file_and_count(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    model = NVAE(NVAEConfig.preset("digits", num_channels_enc=4, num_channels_dec=4, in_channels=3)).eval()
    model.save(tmp_path / "checkpoint.pt")
    data = tmp_path / "data"
    data.mkdir()
    for fname, n in (("train.lmdb", 2), ("validation.lmdb", 3), ("test.lmdb", 4)):
        _put(data / fname, [a.tobytes() for a in _pixels(n, 8, n)])
    out = tmp_path / "eval.json"   # the images come at the model's size (8), as every command reads them
    assert main(["eval", str(tmp_path / "checkpoint.pt"), "--dataset", "imagenet32", "--data", str(data), "-k", "2",
                 "--batch-size", "3", "--output", str(out), "--save-every", "0"]) == 0
    result = json.loads(out.read_text())
    assert result["num_images"] == 3
    assert result["data_source"].startswith(f"LMDB {data}/validation.lmdb (raw 8x8x3 uint8 pixels)")
    assert result["data_source"].endswith("3 images")


def test_torchvision_celeba_is_evaluated_on_its_validation_partition(tmp_path, monkeypatch):
    from torchvision import datasets
    folder = tmp_path / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    names, parts = [f"{i:06d}.jpg" for i in range(1, 7)], [0, 1, 1, 2, 0, 1]
    photos = _pixels(6, 178, 5, height=218)
    for name, arr in zip(names, photos):
        (folder / "img_align_celeba" / name).write_bytes(_jpeg(arr))
    (folder / "list_eval_partition.txt").write_text("".join(f"{n} {p}\n" for n, p in zip(names, parts)))
    (folder / "identity_CelebA.txt").write_text("".join(f"{n} 1\n" for n in names))
    for fname, cols in (("list_bbox_celeba.txt", "image_id x_1"), ("list_landmarks_align_celeba.txt", "lefteye_x"),
                        ("list_attr_celeba.txt", "Smiling")):
        (folder / fname).write_text(f"{len(names)}\n{cols}\n" + "".join(f"{n} 1\n" for n in names))
    monkeypatch.setattr(datasets.CelebA, "_check_integrity", lambda self: True)   # no md5 of the real files
    ev = build_dataset("celeba64", "test", str(tmp_path))
    valid = [Image.open(folder / "img_align_celeba" / n).convert("RGB") for n, p in zip(names, parts) if p == 1]
    _same_as(ev, valid, _official_celeba64(flip=False))
    assert "partition 'valid'" in ev.source_description and ev.source_description.endswith("3 images")
    assert len(build_dataset("celeba64", "train", str(tmp_path))) == 2


def test_train_then_eval_on_an_official_layout_without_naming_the_data_again(tmp_path, capsys):
    """`nvae train --data DIR` on train.lmdb / validation.lmdb, then `nvae eval RUN`: the folder the run recorded,
    its validation.lmdb, at the model's size."""
    data = tmp_path / "imagenet-oord-lmdb_8"
    data.mkdir()
    for fname, n in (("train.lmdb", 8), ("validation.lmdb", 3), ("test.lmdb", 5)):
        _put(data / fname, [a.tobytes() for a in _pixels(n, 12, n)])
    run = tmp_path / "run"
    assert main(["train", "--preset", "digits", "--train", "dataset=imagenet32", "--train", "batch_size=4",
                 "--model", "in_channels=3", "--model", "num_channels_enc=4", "--model", "num_channels_dec=4",
                 "--data", str(data), "--max-steps", "1", "--eval-every", "0", "--run-dir", str(run)]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "-k", "2", "--save-every", "0"]) == 0
    result = json.loads((run / "eval_test_K2.json").read_text())
    assert result["dataset"] == "imagenet32" and result["num_images"] == 3
    assert result["data_source"].startswith(f"LMDB {data}/validation.lmdb (raw 12x12x3 uint8 pixels)")
