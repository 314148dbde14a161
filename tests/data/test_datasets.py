"""Data sets through one interface: shapes, ranges, splits, flips, quantisation and clear errors."""
import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import DATA, needs_shared
from nvae import NVAEConfig
from nvae.data import (CELEBA64_CROP, DataError, available, build_dataset, celeba64_transform, image_transform,
                       prepare_batch, quantize, write_lmdb)

try:
    import lmdb  # noqa: F401
    HAVE_LMDB = True
except ImportError:
    HAVE_LMDB = False
needs_lmdb = pytest.mark.skipif(not HAVE_LMDB, reason="optional package lmdb not installed")


def _check_items(ds, shape, n=None):
    """Every item is a 1-tuple of a float tensor of ``shape`` in [0, 1]."""
    for i in range(len(ds) if n is None else min(n, len(ds))):
        item = ds[i]
        assert isinstance(item, tuple) and len(item) == 1
        x = item[0]
        assert x.dtype == torch.float32 and tuple(x.shape) == shape
        assert 0.0 <= x.min().item() and x.max().item() <= 1.0


def _rgb(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _grey(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8))


def _asymmetric(w=16, h=16):
    """An RGB image whose mirror image differs from it: a left-to-right ramp."""
    ramp = np.tile(np.linspace(0, 255, w).astype(np.uint8), (h, 1))
    return Image.fromarray(np.stack([ramp, ramp, ramp], -1))


def _skip_lines(caplog) -> list:
    """The skipped-image warnings logged so far in this test, one message each."""
    return [r.getMessage() for r in caplog.records
            if r.name.startswith("nvae.data") and "skipping unreadable image" in r.getMessage()]


def _encoded(img, fmt="PNG"):
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def messy_folder(tmp_path):
    """Grey and RGB images of odd sizes and modes, one truncated PNG, one truncated JPEG,
    one text file named .png, and a non-image file that must be ignored."""
    root = tmp_path / "imgs"
    (root / "a" / "deep").mkdir(parents=True)
    (root / "b").mkdir()
    _grey(13, 7).save(root / "a" / "grey.png")
    _rgb(9, 17, 1).save(root / "a" / "deep" / "colour.jpg", quality=95)
    _rgb(20, 20, 2).convert("RGBA").save(root / "b" / "alpha.png")
    _rgb(11, 5, 3).convert("P").save(root / "b" / "palette.png")
    Image.fromarray((np.arange(12 * 10).reshape(10, 12) * 500).astype(np.uint16)).save(root / "b" / "deep16.png")
    _rgb(8, 8, 4).save(root / "b" / "small.bmp")
    for i in range(14):
        _rgb(10 + i, 12, 10 + i).save(root / f"img{i:02d}.png")
    (root / "broken.png").write_bytes(_encoded(_rgb(30, 30, 5))[:200])       # caught by verify()
    (root / "cut.jpeg").write_bytes(_encoded(_rgb(30, 30, 6), "JPEG")[:-60])  # only caught by decoding
    (root / "fake.png").write_text("not an image at all")
    (root / "notes.txt").write_text("ignored: not an image extension")
    (root / ".hidden.png").write_bytes(_encoded(_grey(4, 4)))
    return root


GOOD_IN_MESSY = 20   # 6 odd ones + 14 numbered


# ------------------------------------------------------------------ interface
def test_registry_and_unknown_names():
    for name in ["digits", "mnist", "cifar10", "celeba64", "imagenet32", "celebahq256", "ffhq256", "folder", "lmdb"]:
        assert name in available()
    with pytest.raises(DataError, match="unknown data set 'nope'.*digits"):
        build_dataset("nope", "train")
    with pytest.raises(DataError, match="split must be"):
        build_dataset("digits", "validation")
    assert issubclass(DataError, ValueError)


def test_digits_splits_shapes_and_range():
    train, test = build_dataset("digits", "train"), build_dataset("digits", "test", image_size=8, channels=1)
    assert (len(train), len(test)) == (1500, 297)
    # what the eval JSON's data_source says (it was null for digits)
    assert test.source_description == "scikit-learn's load_digits(), images 1500 to 1796, 297 images"
    assert train.source_description.endswith("images 0 to 1499, 1500 images")
    _check_items(train, (1, 8, 8), n=50)
    _check_items(test, (1, 8, 8))


def test_fixed_shape_sets_check_options_instead_of_ignoring_them():
    with pytest.raises(DataError, match="8x8.*image_size=32"):
        build_dataset("digits", "train", image_size=32)
    with pytest.raises(DataError, match="1 channel.*channels=3"):
        build_dataset("digits", "train", channels=3)
    with pytest.raises(DataError, match="no option 'flip'"):
        build_dataset("digits", "train", flip=True)
    with pytest.raises(DataError, match="no option 'colour'"):
        build_dataset("digits", "train", colour=True)
    build_dataset("digits", "train", flip=False, image_size=None)   # "no flips" and "default" are always fine


@pytest.mark.parametrize("name", ["mnist", "cifar10", "folder", "imagenet32", "celeba64", "ffhq256"])
def test_missing_root_is_a_clear_error(name, tmp_path):
    opts = {"image_size": 8} if name == "folder" else {}
    with pytest.raises(DataError, match="needs --data"):
        build_dataset(name, "train", None, **opts)
    with pytest.raises(DataError, match="does not exist"):
        build_dataset(name, "train", str(tmp_path / "absent"), **opts)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        build_dataset(name, "train", str(tmp_path / "file"), **opts)


def test_torchvision_sets_missing_files(tmp_path):
    with pytest.raises(DataError, match="MNIST not found"):
        build_dataset("mnist", "test", str(tmp_path))
    with pytest.raises(DataError, match="no CIFAR-10 train batches"):
        build_dataset("cifar10", "train", str(tmp_path))


# ------------------------------------------------------------------ real data
@needs_shared("data", "MNIST", "raw")
@pytest.mark.parametrize("split,n", [("train", 60000), ("test", 10000)])
def test_mnist_padded_to_32_both_splits(split, n):
    from torchvision import datasets
    ds = build_dataset("mnist", split, str(DATA), image_size=32, channels=1)
    assert len(ds) == n
    _check_items(ds, (1, 32, 32), n=8)
    raw = datasets.MNIST(str(DATA), train=split == "train")
    x = ds[3][0]
    assert torch.equal(x[0, 2:30, 2:30], torch.from_numpy(np.array(raw[3][0])).float() / 255)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert x[0][border].abs().max() == 0
    assert torch.equal(ds[3][0], x)   # no randomness in the data set itself: binarisation is prepare_batch's


@needs_shared("data", "cifar-10-batches-py")
def test_cifar10_subset_flips_only_on_train():
    train = build_dataset("cifar10", "train", str(DATA))
    test = build_dataset("cifar10", "test", str(DATA), image_size=32, channels=3)
    assert (len(train), len(test)) == (10000, 10000)
    _check_items(train, (3, 32, 32), n=4)
    _check_items(test, (3, 32, 32), n=4)
    unflipped = build_dataset("cifar10", "train", str(DATA), flip=False)[5][0]
    seen = set()
    for _ in range(40):
        x = train[5][0]
        if torch.equal(x, unflipped):
            seen.add("plain")
        else:
            assert torch.equal(x, unflipped.flip(-1))
            seen.add("flipped")
    assert seen == {"plain", "flipped"}
    assert all(torch.equal(test[7][0], test[7][0]) for _ in range(20))


# ------------------------------------------------------------------ quantisation and binarisation
@pytest.mark.parametrize("bits", range(1, 9))
def test_quantize_matches_official_formula(bits):
    k = torch.arange(256)
    x = k.float() / 255   # what ToTensor gives for 8-bit pixels
    expected = torch.floor(x * 255 / 2 ** (8 - bits)) / (2 ** bits - 1)
    q = quantize(x, bits)
    assert torch.equal(q, expected)
    # ... and that formula is exact integer bit-dropping here (no float off-by-one at bin edges)
    assert torch.equal(q, (k >> (8 - bits)).float() / (2 ** bits - 1))
    assert q.min() == 0 and q.max() == 1 and q.unique().numel() == 2 ** bits
    assert torch.equal(prepare_batch(x, NVAEConfig(decoder="mixture", num_x_bits=bits)), q)


def test_prepare_batch_binarises_afresh_each_call():
    x = torch.rand(64, 1, 32, 32)
    binary = NVAEConfig(decoder="bernoulli")
    a, b = prepare_batch(x, binary), prepare_batch(x, binary)
    assert not torch.equal(a, b)
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    assert abs(a.mean().item() - x.mean().item()) < 0.01
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(prepare_batch(x, binary, g1), prepare_batch(x, binary, g2))
    assert not torch.equal(prepare_batch(x, binary, g1), prepare_batch(x, binary, g1))


# ------------------------------------------------------------------ transforms
def test_resize_shorter_side_then_centre_crop():
    # three vertical bands; a 2:1 image resized to height 16 and centre-cropped keeps the middle band
    bands = np.zeros((30, 60, 3), np.uint8)
    bands[:, :20, 0], bands[:, 20:40, 1], bands[:, 40:, 2] = 255, 255, 255
    x = image_transform(16, 3, flip=False)(Image.fromarray(bands))
    assert x.shape == (3, 16, 16)
    assert x[1, :, 4:12].min() == 1 and x[0, :, 4:12].max() == 0 and x[2, :, 4:12].max() == 0
    # an image already at the size passes through untouched (exact 8-bit values)
    img = _rgb(32, 32)
    assert torch.equal(image_transform(32, 3, False)(img), torch.from_numpy(np.array(img)).permute(2, 0, 1) / 255)
    assert image_transform(32, 1, False)(img).shape == (1, 32, 32)


def test_celeba64_crop_box_and_resize():
    assert CELEBA64_CROP == (15, 40, 163, 188)
    # pixel (x, y) encodes its own coordinates, so the crop's position can be read off
    ys, xs = np.mgrid[0:218, 0:178]
    coded = Image.fromarray(np.stack([xs, ys, np.zeros_like(xs)], -1).astype(np.uint8))
    crop = celeba64_transform(flip=False, image_size=148)(coded)   # 148 = no resize: the bare crop
    assert crop.shape == (3, 148, 148)
    assert round(crop[0, 0, 0].item() * 255) == 15 and round(crop[1, 0, 0].item() * 255) == 40
    assert round(crop[0, -1, -1].item() * 255) == 162 and round(crop[1, -1, -1].item() * 255) == 187
    photo = _rgb(178, 218, 7)
    x = celeba64_transform(flip=False)(photo)
    assert x.shape == (3, 64, 64)
    from torchvision.transforms import functional as TF
    manual = TF.to_tensor(TF.resize(photo.crop((15, 40, 163, 188)), [64, 64]))
    assert torch.allclose(x, manual, atol=1 / 255 + 1e-6)


def test_celeba64_from_split_folders(tmp_path):
    for split, n in [("train", 3), ("val", 2)]:
        (tmp_path / split).mkdir()
        for i in range(n):
            _rgb(178, 218, i).save(tmp_path / split / f"{i:06d}.jpg")
    train = build_dataset("celeba64", "train", str(tmp_path))
    test = build_dataset("celeba64", "test", str(tmp_path))
    assert (len(train), len(test)) == (3, 2)
    _check_items(train, (3, 64, 64))
    _check_items(test, (3, 64, 64))


# ------------------------------------------------------------------ flips
@pytest.mark.parametrize("name,opts", [("folder", {"image_size": 16, "flip": True}), ("imagenet32", {}),
                                       ("celeba64", {"image_size": 16})])
def test_flips_happen_on_train_and_never_on_test(name, opts, tmp_path):
    size = 178 if name == "celeba64" else 32
    for split in ("train", "test"):
        (tmp_path / split).mkdir()
        _asymmetric(size, size if name != "celeba64" else 218).save(tmp_path / split / "ramp.png")
    train = build_dataset(name, "train", str(tmp_path), **opts)
    test = build_dataset(name, "test", str(tmp_path), **opts)
    plain = build_dataset(name, "train", str(tmp_path), **{**opts, "flip": False})[0][0]
    assert not torch.equal(plain, plain.flip(-1))
    outs = [train[0][0] for _ in range(40)]
    assert any(torch.equal(o, plain) for o in outs) and any(torch.equal(o, plain.flip(-1)) for o in outs)
    assert all(torch.equal(o, plain) or torch.equal(o, plain.flip(-1)) for o in outs)
    assert all(torch.equal(test[0][0], plain) for _ in range(40))


def test_generic_folder_has_no_flips_by_default(tmp_path):
    _asymmetric().save(tmp_path / "a.png")
    _asymmetric().save(tmp_path / "b.png")
    ds = build_dataset("folder", "train", str(tmp_path), image_size=16, scan="none")
    first = ds[0][0]
    assert all(torch.equal(ds[0][0], first) for _ in range(20))


# ------------------------------------------------------------------ folder
def test_folder_finds_converts_and_skips(messy_folder, caplog):
    both = [build_dataset("folder", s, str(messy_folder), image_size=12, channels=c, scan="load")
            for s in ("train", "test") for c in (1, 3)]
    named = " ".join(_skip_lines(caplog))
    for bad in ("broken.png", "cut.jpeg", "fake.png"):
        assert bad in named
    assert "notes.txt" not in named and ".hidden" not in named
    train_grey, train_rgb, test_grey, test_rgb = both
    assert len(train_rgb) + len(test_rgb) == GOOD_IN_MESSY
    assert len(test_rgb) == 1   # 5% of 23 candidates, at least one
    assert train_rgb.skipped + test_rgb.skipped == 3
    assert set(train_rgb.keys).isdisjoint(test_rgb.keys)
    _check_items(train_grey, (1, 12, 12))
    _check_items(train_rgb, (3, 12, 12))
    _check_items(test_rgb, (3, 12, 12))
    # the 16-bit grey image is rescaled, not clipped to white
    i = train_rgb.keys.index("b/deep16.png")
    assert 0.05 < train_grey[i][0].mean().item() < 0.95


def _folder_with_one_corrupt_image(root) -> Path:
    """``root/train``: four images and ``bad.png`` (text, not an image); ``root/test``: one image. bad.png's path."""
    for split, n in (("train", 4), ("test", 1)):
        (root / split).mkdir(parents=True)
        for i in range(n):
            _rgb(8, 8, i).save(root / split / f"{i}.png")
    (root / "train" / "bad.png").write_text("not an image")
    return root / "train" / "bad.png"


def test_a_skipped_image_is_one_log_line_naming_the_file_and_why(tmp_path, caplog):
    bad = _folder_with_one_corrupt_image(tmp_path)
    ds = build_dataset("folder", "train", str(tmp_path), image_size=8)
    assert len(ds) == 4 and ds.skipped_files == [str(bad)]
    (record,) = [r for r in caplog.records if r.name.startswith("nvae.data")]
    assert record.levelname == "WARNING"
    assert record.getMessage() == f"nvae: warning: skipping unreadable image {bad} (cannot identify image file)"
    assert record.exc_info is None and record.stack_info is None


_SKIPS_TO_STDERR = """
import sys
from nvae.data import build_dataset
build_dataset("folder", "train", sys.argv[1], image_size=8)
if len(sys.argv) > 2:
    build_dataset("lmdb", "train", sys.argv[2], image_size=8)
"""


def test_skip_warnings_reach_stderr_as_bare_lines(tmp_path):
    """What a user sees without any logging set up (as under the commands): one line per skipped image, naming
    the file (or LMDB and key) and why, with no source location, no source line and no in-memory buffer."""
    bad = _folder_with_one_corrupt_image(tmp_path / "folder")
    argv = [sys.executable, "-c", _SKIPS_TO_STDERR, str(tmp_path / "folder")]
    expected = [f"nvae: warning: skipping unreadable image {bad} (cannot identify image file)"]
    if HAVE_LMDB:
        write_lmdb([_rgb(8, 8, i) for i in range(3)] + [b"garbage"], tmp_path / "db" / "train")
        write_lmdb([_rgb(8, 8, 9)], tmp_path / "db" / "val")
        argv.append(str(tmp_path / "db"))
        expected.append(f"nvae: warning: skipping unreadable image {tmp_path / 'db' / 'train'}[3] "
                        "(cannot identify image file)")
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert [line for line in lines if "skipping" in line] == expected
    assert "<_io.BytesIO" not in done.stderr and "object at 0x" not in done.stderr
    assert ".py:" not in done.stderr and "Warning:" not in done.stderr   # no file:line: Category: of warnings
    assert not any(line.startswith((" ", "\t")) for line in lines)      # no source line below it


def test_folder_held_out_split_is_deterministic(tmp_path):
    for i in range(45):
        _grey(6, 6, i).save(tmp_path / f"{i}.png")
    a = build_dataset("folder", "test", str(tmp_path), image_size=6, channels=1)
    b = build_dataset("folder", "test", str(tmp_path), image_size=6, channels=1)
    train = build_dataset("folder", "train", str(tmp_path), image_size=6, channels=1)
    assert a.keys == b.keys and len(a) == 2 and len(train) == 43
    assert sorted(a.keys + train.keys) == sorted(f"{i}.png" for i in range(45))


def test_folder_uses_train_and_test_subfolders(tmp_path):
    for split, n in [("train", 4), ("val", 2)]:
        (tmp_path / split / "cls").mkdir(parents=True)
        for i in range(n):
            _rgb(9, 7, i).save(tmp_path / split / "cls" / f"{i}.png")
    train = build_dataset("folder", "train", str(tmp_path), image_size=7)
    test = build_dataset("folder", "test", str(tmp_path), image_size=7)
    assert (len(train), len(test)) == (4, 2)
    _check_items(test, (3, 7, 7))
    assert len(list(train)) == 4 and torch.equal(train[-1][0], train[3][0])   # plain iteration ends
    with pytest.raises(IndexError):
        train[4]


def test_truncated_jpeg_missed_by_verify_is_skipped_when_loaded(tmp_path, caplog):
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    _rgb(8, 8).save(tmp_path / "test" / "ok.png")
    (tmp_path / "train" / "a_cut.jpg").write_bytes(_encoded(_rgb(30, 30), "JPEG")[:-60])
    good = _rgb(8, 8, 9)
    good.save(tmp_path / "train" / "b_ok.png")
    ds = build_dataset("folder", "train", str(tmp_path), image_size=8)   # default scan: verify
    assert len(ds) == 2 and ds.skipped == 0 and _skip_lines(caplog) == []
    x = ds[0][0]
    assert ["a_cut.jpg (image file is truncated" in line for line in _skip_lines(caplog)] == [True]
    assert torch.equal(x, torch.from_numpy(np.array(good)).permute(2, 0, 1) / 255)   # the next readable one
    assert ds.skipped == 1 and ds.skipped_files[0].endswith("a_cut.jpg")
    ds[0]
    assert len(_skip_lines(caplog)) == 1 and ds.skipped == 1   # warned once per file
    strict = build_dataset("folder", "train", str(tmp_path), image_size=8, strict=True)
    with pytest.raises(DataError, match="cannot read image .*a_cut.jpg"):
        strict[0]


def test_folder_errors(tmp_path, messy_folder, caplog):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no images .*png.*found in"):
        build_dataset("folder", "train", str(empty), image_size=8)
    with pytest.raises(DataError, match="needs image_size"):
        build_dataset("folder", "train", str(messy_folder))
    with pytest.raises(DataError, match="channels must be 1"):
        build_dataset("folder", "train", str(messy_folder), image_size=8, channels=4)
    with pytest.raises(DataError, match="scan must be"):
        build_dataset("folder", "train", str(messy_folder), image_size=8, scan="maybe")
    with pytest.raises(DataError, match="cannot read image .*(broken|cut|fake)"):
        build_dataset("folder", "train", str(messy_folder), image_size=8, strict=True, scan="load")
    single = tmp_path / "single"
    single.mkdir()
    _rgb(5, 5).save(single / "only.png")
    with pytest.raises(DataError, match="at least 2"):
        build_dataset("folder", "train", str(single), image_size=5)
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"{i}.png").write_text("nope")
    with pytest.raises(DataError, match="could be read"):
        build_dataset("folder", "train", str(bad), image_size=5)
    assert sum(str(bad) in line for line in _skip_lines(caplog)) == 2   # 2 training images, each warned about


def test_strict_refuses_wrong_channel_count(tmp_path):
    for split in ("train", "test"):
        (tmp_path / split).mkdir()
    _grey(6, 6).save(tmp_path / "train" / "a_grey.png")
    _rgb(6, 6).save(tmp_path / "train" / "b_rgb.png")
    _rgb(6, 6).save(tmp_path / "test" / "rgb.png")
    ds = build_dataset("folder", "train", str(tmp_path), image_size=6, channels=3)   # default: convert
    _check_items(ds, (3, 6, 6))
    assert torch.equal(ds[0][0][0], ds[0][0][2])
    build_dataset("folder", "test", str(tmp_path), image_size=6, channels=3, strict=True)
    with pytest.raises(DataError, match="a_grey.png has 1 channel.*3 are expected"):
        build_dataset("folder", "train", str(tmp_path), image_size=6, channels=3, strict=True)
    lazy = build_dataset("folder", "train", str(tmp_path), image_size=6, channels=1, strict=True, scan="none")
    lazy[0]
    with pytest.raises(DataError, match="b_rgb.png has 3 channel.*1 are expected"):
        lazy[1]


@pytest.mark.parametrize("name,size", [("imagenet32", 32), ("celebahq256", 256), ("ffhq256", 256)])
def test_named_image_sets_from_split_folders(name, size, tmp_path):
    with pytest.raises(DataError, match="expects .*/train and .*/val"):
        _rgb(size, size).save(tmp_path / "loose.png")
        build_dataset(name, "train", str(tmp_path))
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        for i in range(2):
            _rgb(size + 3 * i, size, i).save(tmp_path / split / f"{i}.png")
    for split in ("train", "test"):
        ds = build_dataset(name, split, str(tmp_path), image_size=size, channels=3)
        assert len(ds) == 2
        _check_items(ds, (3, size, size))


# ------------------------------------------------------------------ LMDB
@needs_lmdb
def test_lmdb_roundtrip_and_held_out_split(tmp_path):
    images = [_rgb(8, 8, i) for i in range(30)]
    mixed = images[:10] + [np.asarray(im) for im in images[10:20]] + \
        [torch.from_numpy(np.array(im)).permute(2, 0, 1) / 255 for im in images[20:29]] + [_encoded(images[29])]
    assert write_lmdb(mixed, tmp_path / "db") == 30
    train = build_dataset("lmdb", "train", str(tmp_path / "db"), image_size=8)
    test = build_dataset("lmdb", "test", str(tmp_path / "db"), image_size=8)
    assert len(train) + len(test) == 30 and len(test) == 2
    assert set(train.keys).isdisjoint(test.keys)
    for ds in (train, test):
        for key, (x,) in zip(ds.keys, ds):
            assert torch.equal(x, torch.from_numpy(np.array(images[int(key)])).permute(2, 0, 1) / 255)
    # DataLoader workers get their own copy and open the LMDB themselves
    clone = pickle.loads(pickle.dumps(train))
    assert torch.equal(clone[3][0], train[3][0])
    from torch.utils.data import DataLoader
    batches = list(DataLoader(train, batch_size=7, num_workers=2))
    assert torch.equal(torch.cat([b[0] for b in batches]), torch.stack([x for (x,) in train]))
    grey = build_dataset("lmdb", "train", str(tmp_path / "db"), image_size=4, channels=1)
    _check_items(grey, (1, 4, 4))
    with pytest.raises(DataError, match="already holds an LMDB"):
        write_lmdb(images, tmp_path / "db")


@needs_lmdb
def test_lmdb_splits_named_sets_and_bad_records(tmp_path, caplog):
    write_lmdb([_rgb(32, 32, i) for i in range(3)] + [b"garbage"], tmp_path / "train.lmdb")
    write_lmdb([_rgb(32, 32, 9)], tmp_path / "val")
    train = build_dataset("lmdb", "train", str(tmp_path), image_size=32)
    line = f"nvae: warning: skipping unreadable image {tmp_path / 'train.lmdb'}[3] (cannot identify image file)"
    assert _skip_lines(caplog) == [line]
    assert len(train) == 3 and train.skipped == 1
    assert len(build_dataset("lmdb", "test", str(tmp_path), image_size=32)) == 1
    ds = build_dataset("imagenet32", "train", str(tmp_path))   # named sets read LMDBs as well; scan off
    assert len(ds) == 4
    caplog.clear()
    _check_items(ds, (3, 32, 32))
    assert len(_skip_lines(caplog)) == 1 and "train.lmdb[3] (cannot identify image file)" in caplog.text
    with pytest.raises(DataError, match="cannot read"):
        build_dataset("imagenet32", "train", str(tmp_path), strict=True)[3]


@needs_lmdb
def test_lmdb_layout_errors(tmp_path):
    import lmdb
    env = lmdb.open(str(tmp_path / "odd"), map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"img_a", _encoded(_rgb(4, 4)))
    env.close()
    with pytest.raises(DataError, match="b'0'.*write_lmdb"):
        build_dataset("lmdb", "train", str(tmp_path / "odd"), image_size=4)
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="not an LMDB"):
        build_dataset("lmdb", "train", str(tmp_path / "plain"), image_size=4)
    write_lmdb([], tmp_path / "empty")
    with pytest.raises(DataError, match="no records"):
        build_dataset("lmdb", "train", str(tmp_path / "empty"), image_size=4)


def test_lmdb_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lmdb", None)   # import lmdb now raises ImportError
    with pytest.raises(DataError, match="pip install lmdb"):
        build_dataset("lmdb", "train", str(tmp_path), image_size=8)
    with pytest.raises(DataError, match="pip install lmdb"):
        write_lmdb([], tmp_path / "db")
