"""Omniglot, Stacked MNIST and LSUN: shapes, lengths, the fixed pairing, pixels equal to the official
transform chains (torchvision on the same images), clear errors, and their presets."""
import hashlib
import io
import os
import re
import shutil
import struct
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from conftest import DATA, needs_shared
from nvae import PRESETS, NVAEConfig
from nvae.config import TRAIN_PRESETS, TrainConfig
from nvae.data import DataError, available, build_dataset, prepare_batch
from nvae.data.binary import OMNIGLOT_URL, download_omniglot, load_omniglot, stacked_mnist_triples
from nvae.data.lsun import LSUNImages, lsun_transform

try:
    import lmdb
    HAVE_LMDB = True
except ImportError:
    HAVE_LMDB = False
needs_lmdb = pytest.mark.skipif(not HAVE_LMDB, reason="optional package lmdb not installed")

PAD_TO_TENSOR = transforms.Compose([transforms.Pad(2), transforms.ToTensor()])   # the official MNIST-size chain


# ------------------------------------------------------------------------------------------- Omniglot
def _write_chardata(path, n_train=5, n_test=3, seed=0):
    from scipy.io import savemat
    rng = np.random.default_rng(seed)
    train, test = rng.random((784, n_train)), rng.random((784, n_test))
    savemat(str(path), {"data": train, "testdata": test})
    return train, test


def _official_omniglot(columns):
    """The official loader's arithmetic on one array of chardata.mat."""
    return (255 * columns.astype("float32").reshape((28, 28, -1)).transpose((2, 1, 0))).astype("uint8")


def test_omniglot_pixels_are_the_official_chain(tmp_path):
    train, test = _write_chardata(tmp_path / "chardata.mat")
    for split, columns in (("train", train), ("test", test)):
        ds = build_dataset("omniglot", split, str(tmp_path))
        assert len(ds) == columns.shape[1]
        for i, img in enumerate(_official_omniglot(columns)):
            (x,) = ds[i]
            assert x.dtype == torch.float32 and x.shape == (1, 32, 32)
            assert torch.equal(x, PAD_TO_TENSOR(Image.fromarray(img)))


def test_omniglot_reads_columns_in_matlab_order(tmp_path):
    """Row r, column c of an image is entry c * 28 + r of its column (MATLAB's column-major layout)."""
    from scipy.io import savemat
    data = np.zeros((784, 2))
    data[10 * 28 + 3, 0] = 1.0      # image 0: row 3, column 10
    data[5, 1] = 0.5                # image 1: row 5, column 0; 127.5 truncates to 127
    savemat(str(tmp_path / "chardata.mat"), {"data": data, "testdata": data[:, :1]})
    (x0,), (x1,) = build_dataset("omniglot", "train", str(tmp_path))
    assert x0[0, 3 + 2, 10 + 2] == 1.0 and x0.sum() == 1.0
    assert x1[0, 5 + 2, 0 + 2] == 127 / 255 and (x1 > 0).sum() == 1


def test_omniglot_is_binarised_by_the_bernoulli_model(tmp_path):
    _write_chardata(tmp_path / "chardata.mat", n_train=4)
    ds = build_dataset("omniglot", "train", str(tmp_path))
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    assert ((x > 0) & (x < 1)).any()     # grey levels stored ...
    cfg = NVAEConfig.preset("omniglot")
    b = prepare_batch(x, cfg, torch.Generator().manual_seed(0))
    assert set(b.unique().tolist()) <= {0.0, 1.0}    # ... binarised afresh per batch
    assert torch.equal(b[x == 0], x[x == 0])


def test_omniglot_missing_file_names_it_and_where_to_get_it(tmp_path):
    with pytest.raises(DataError, match=r"chardata\.mat not found.*yburda/iwae.*download=True"):
        build_dataset("omniglot", "train", str(tmp_path))
    with pytest.raises(DataError, match="needs --data"):
        build_dataset("omniglot", "train", None)
    assert list(tmp_path.iterdir()) == []


def test_omniglot_wrong_file_is_a_clear_error(tmp_path):
    from scipy.io import savemat
    savemat(str(tmp_path / "chardata.mat"), {"images": np.zeros((784, 2))})
    with pytest.raises(DataError, match=r"no \['data', 'testdata'\]"):
        build_dataset("omniglot", "train", str(tmp_path))
    savemat(str(tmp_path / "chardata.mat"), {"data": np.zeros((28, 28)), "testdata": np.zeros((784, 1))})
    with pytest.raises(DataError, match="not 784 x N"):
        build_dataset("omniglot", "train", str(tmp_path))
    (tmp_path / "chardata.mat").write_text("not a MATLAB file")
    with pytest.raises(DataError, match="not a readable MATLAB file"):
        build_dataset("omniglot", "train", str(tmp_path))


def test_omniglot_comes_only_at_32_grey(tmp_path):
    _write_chardata(tmp_path / "chardata.mat")
    with pytest.raises(DataError, match="only as 1 channel"):
        build_dataset("omniglot", "train", str(tmp_path), image_size=28)
    with pytest.raises(DataError, match="takes no option 'flip'"):
        build_dataset("omniglot", "train", str(tmp_path), flip=True)


def test_omniglot_download_only_when_asked(tmp_path, monkeypatch):
    source = tmp_path / "published.mat"
    train, _ = _write_chardata(source, n_train=3)
    asked = []

    def fake_urlopen(url, timeout=None):
        asked.append(url)
        return io.BytesIO(source.read_bytes())

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    root = tmp_path / "omni"
    with pytest.raises(DataError):
        build_dataset("omniglot", "train", str(root))
    assert asked == [] and not root.exists()
    ds = build_dataset("omniglot", "train", str(root), download=True)
    assert asked == [OMNIGLOT_URL] and len(ds) == 3
    assert sorted(p.name for p in root.iterdir()) == ["chardata.mat"]     # no temporary file left
    assert np.array_equal(load_omniglot(root / "chardata.mat")[0], _official_omniglot(train))
    download_omniglot(root)      # already there: not fetched again
    assert asked == [OMNIGLOT_URL]


def test_omniglot_failed_download_writes_nothing(tmp_path, monkeypatch):
    def offline(url, timeout=None):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="could not download .*chardata.mat by hand"):
        build_dataset("omniglot", "train", str(tmp_path), download=True)
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------------------------- Stacked MNIST
def _idx(path, array, code):
    with open(path, "wb") as f:
        f.write(bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "i" * array.ndim, *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def _write_mnist(root, folder="MNIST", seed=1) -> dict:
    """A tiny raw MNIST (7 training and 4 test digits) in ``root/folder/raw``: {split: (digits, labels)}."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    splits = {}
    for prefix, n in (("train", 7), ("t10k", 4)):
        images, labels = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
        _idx(raw / f"{prefix}-images-idx3-ubyte", images, 3)
        _idx(raw / f"{prefix}-labels-idx1-ubyte", labels, 1)
        splits["train" if prefix == "train" else "test"] = (images.astype(np.uint8), labels)
    return splits


@pytest.fixture
def fake_mnist(tmp_path):
    """torchvision's raw MNIST layout with 7 training and 4 test digits."""
    return tmp_path, _write_mnist(tmp_path)


def _official_stack(digits, triple):
    return PAD_TO_TENSOR(Image.fromarray(np.stack([digits[j] for j in triple], axis=-1)))


def test_stacked_mnist_is_three_digits_as_rgb(fake_mnist):
    root, splits = fake_mnist
    for split, (digits, labels) in splits.items():
        ds = build_dataset("stacked_mnist", split, str(root))
        assert len(ds) == 2 * len(digits)
        for i in range(len(ds)):
            (x,) = ds[i]
            triple = ds.triples[i].tolist()
            assert x.dtype == torch.float32 and x.shape == (3, 32, 32)
            assert torch.equal(x, _official_stack(digits, triple))
            assert ds.labels[i] == 100 * labels[triple[0]] + 10 * labels[triple[1]] + labels[triple[2]]


def test_stacked_mnist_pairing_is_fixed(fake_mnist):
    root, _ = fake_mnist
    first = build_dataset("stacked_mnist", "train", str(root)).triples
    np.random.seed(123)             # neither global generator moves the pairing
    torch.manual_seed(123)
    np.random.permutation(10)
    again = build_dataset("stacked_mnist", "train", str(root)).triples
    assert torch.equal(first, again)
    assert not np.array_equal(stacked_mnist_triples(7, seed=1), first.numpy())   # the seed is what fixes it


def test_stacked_mnist_triples_are_two_permutations_per_channel():
    n = 50
    t = stacked_mnist_triples(n)
    assert t.shape == (2 * n, 3)
    for c in range(3):
        assert sorted(t[:n, c]) == list(range(n)) and sorted(t[n:, c]) == list(range(n))
    assert not np.array_equal(t[:, 0], t[:, 1]) and not np.array_equal(t[:n, 0], t[n:, 0])


@pytest.mark.parametrize("folder", ["MNIST", "StackedMNIST"])   # torchvision's layout, the official code's
def test_stacked_mnist_is_found_in_either_raw_folder(tmp_path, folder):
    splits = _write_mnist(tmp_path, folder)
    for split, (digits, _) in splits.items():
        ds = build_dataset("stacked_mnist", split, str(tmp_path))
        assert len(ds) == 2 * len(digits) and torch.equal(ds.digits, torch.from_numpy(digits))
        assert torch.equal(ds[3][0], _official_stack(digits, ds.triples[3].tolist()))


def test_stacked_mnist_reads_mnist_when_both_folders_hold_it(tmp_path):
    ours = _write_mnist(tmp_path, "MNIST", seed=1)
    official = _write_mnist(tmp_path, "StackedMNIST", seed=2)
    ds = build_dataset("stacked_mnist", "test", str(tmp_path))
    assert torch.equal(ds.digits, torch.from_numpy(ours["test"][0]))
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()   # an incomplete MNIST/raw is passed over
    ds = build_dataset("stacked_mnist", "test", str(tmp_path))
    assert torch.equal(ds.digits, torch.from_numpy(official["test"][0]))


def test_stacked_mnist_missing_mnist(tmp_path):
    with pytest.raises(DataError) as missing:
        build_dataset("stacked_mnist", "train", str(tmp_path))
    message = str(missing.value)
    assert message.startswith(f"MNIST not found under {tmp_path}") and "\n" not in message
    assert str(tmp_path / "MNIST" / "raw") in message and str(tmp_path / "StackedMNIST" / "raw") in message
    with pytest.raises(DataError, match="only as 3 channel"):
        build_dataset("stacked_mnist", "train", str(tmp_path), channels=1)


@needs_shared("data", "MNIST")
def test_stacked_mnist_on_real_mnist():
    from torchvision import datasets
    ds = build_dataset("stacked_mnist", "test", str(DATA))
    assert len(ds) == 20000
    mnist = datasets.MNIST(str(DATA), train=False)
    for i in (0, 9999, 10000, 19999):
        triple = ds.triples[i].tolist()
        pil = [np.asarray(mnist[j][0]) for j in triple]
        assert torch.equal(ds[i][0], _official_stack(pil, [0, 1, 2]))
        assert ds.labels[i] == sum(int(mnist[j][1]) * 10 ** (2 - c) for c, j in enumerate(triple))
    assert len(build_dataset("stacked_mnist", "train", str(DATA))) == 120000


@needs_shared("data", "MNIST", "raw")
def test_stacked_mnist_on_real_mnist_in_the_official_layout(tmp_path):
    raw = tmp_path / "StackedMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in (DATA / "MNIST" / "raw").iterdir():
        (raw / f.name).symlink_to(f.resolve())
    official = build_dataset("stacked_mnist", "test", str(tmp_path))
    ours = build_dataset("stacked_mnist", "test", str(DATA))
    assert len(official) == 20000 and torch.equal(official.digits, ours.digits)
    assert torch.equal(official.labels, ours.labels) and torch.equal(official[123][0], ours[123][0])


# ------------------------------------------------------------------------------------------------ LSUN
def _encoded(img, fmt):
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _write_lsun(path, n, seed=0):
    """An LMDB as LSUN publishes it: encoded images (webp, JPEG, PNG) of assorted sizes under SHA-1 hex keys.
    Returns the images as decoded, in key order."""
    rng = np.random.default_rng(seed)
    records = {}
    for i in range(n):
        w, h = [(80, 60), (60, 90), (70, 70), (100, 64)][i % 4]
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        if i % 5 == 4:
            img = img.convert("L")     # LSUN holds a few grey images; they are read as RGB
        data = _encoded(img, ["WEBP", "JPEG", "PNG"][i % 3])
        records[hashlib.sha1(data).hexdigest().encode()] = data
    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for k, v in records.items():
            txn.put(k, v)
    env.close()
    return [Image.open(io.BytesIO(records[k])).convert("RGB") for k in sorted(records)]


@pytest.fixture
def fake_lsun(tmp_path):
    root = tmp_path / "lsun"
    root.mkdir()
    train = _write_lsun(root / "church_outdoor_train_lmdb", 6)
    val = _write_lsun(root / "church_outdoor_val_lmdb", 3, seed=1)
    return root, train, val


def _official_lsun(size, train):
    crop = [transforms.RandomCrop(size), transforms.RandomHorizontalFlip()] if train else [transforms.CenterCrop(size)]
    steps = [transforms.Resize(size)] + crop
    return transforms.Compose(steps + [transforms.ToTensor()])


@needs_lmdb
def test_lsun_test_split_is_the_official_eval_chain(fake_lsun, tmp_path, monkeypatch):
    root, _, val = fake_lsun
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    before = sorted(os.listdir(root))
    for size in (32, 64):
        name = "lsun_church64"
        ds = build_dataset(name, "test", str(root), image_size=size)
        assert len(ds) == 3
        for i, img in enumerate(val):
            (x,) = ds[i]
            assert x.shape == (3, size, size)
            assert torch.equal(x, _official_lsun(size, train=False)(img))
    assert os.listdir(work) == [] and sorted(os.listdir(root)) == before     # nothing written anywhere


@needs_lmdb
def test_lsun_order_and_pixels_match_torchvision(fake_lsun, tmp_path, monkeypatch):
    """Same images in the same order as torchvision's LSUN (run on a copy: one LMDB opens once per process)."""
    from torchvision import datasets
    root, _, _ = fake_lsun
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    monkeypatch.chdir(tmp_path)        # torchvision drops its key cache in the working directory
    tf = lsun_transform(64, train=False)
    theirs = datasets.LSUN(str(copy), classes=["church_outdoor_train"], transform=tf)
    ours = build_dataset("lsun_church64", "train", str(root), flip=False)
    ours.transform = tf
    assert len(ours) == len(theirs) == 6
    for i in range(len(ours)):
        assert torch.equal(ours[i][0], theirs[i][0])


@needs_lmdb
def test_lsun_train_split_is_the_official_train_chain(fake_lsun):
    root, train, _ = fake_lsun
    ds = build_dataset("lsun_church128", "train", str(root), image_size=48)
    assert len(ds) == 6
    for i, img in enumerate(train):
        torch.manual_seed(i)
        (x,) = ds[i]
        torch.manual_seed(i)
        assert x.shape == (3, 48, 48)
        assert torch.equal(x, _official_lsun(48, train=True)(img))
    # The crop is random along the longer side and the flip random: two draws differ somewhere.
    assert any(not torch.equal(ds[i][0], ds[i][0]) for i in range(len(ds)) for _ in range(3))


@needs_lmdb
def test_lsun_grey_model_and_no_flip(fake_lsun):
    root, train, _ = fake_lsun
    ds = build_dataset("lsun_church64", "train", str(root), image_size=16, channels=1, flip=False)
    torch.manual_seed(0)
    (x,) = ds[0]
    torch.manual_seed(0)
    expected = transforms.Compose([transforms.Grayscale(), transforms.Resize(16), transforms.RandomCrop(16),
                                   transforms.ToTensor()])(train[0])
    assert x.shape == (1, 16, 16) and torch.equal(x, expected)


@needs_lmdb
def test_lsun_missing_db_names_the_folder(fake_lsun, tmp_path):
    root, _, _ = fake_lsun
    with pytest.raises(DataError, match=r"no LSUN LMDB .*bedroom_train_lmdb.*download\.py -c bedroom"):
        build_dataset("lsun_bedroom64", "train", str(root))
    shutil.rmtree(root / "church_outdoor_val_lmdb")
    assert len(build_dataset("lsun_church64", "train", str(root))) == 6
    with pytest.raises(DataError, match=r"church_outdoor_val_lmdb"):
        build_dataset("lsun_church64", "test", str(root))
    with pytest.raises(DataError, match="cannot download LSUN"):
        build_dataset("lsun_church64", "train", str(root), download=True)


@needs_lmdb
def test_lsun_unreadable_record(tmp_path, caplog):
    root = tmp_path / "lsun"
    root.mkdir()
    env = lmdb.open(str(root / "tower_val_lmdb"), map_size=1 << 24)
    good = _encoded(Image.new("RGB", (40, 30), (200, 10, 10)), "WEBP")
    with env.begin(write=True) as txn:
        txn.put(b"a", b"not an image")
        txn.put(b"b", good)
    env.close()
    ds = build_dataset("lsun_tower64", "test", str(root), image_size=8)
    with caplog.at_level("WARNING"):
        (x,) = ds[0]          # the bad record is skipped: the next one comes back
        ds[0]                 # ... and warned about once
    assert torch.equal(x, ds[1][0]) and ds.skipped == 1
    db = (root / "tower_val_lmdb").resolve()
    assert ds.skipped_files == [f"{db}[b'a']"]   # what training lists at its end
    assert [r.getMessage() for r in caplog.records] == [
        f"nvae: warning: skipping unreadable image {db}[b'a'] (cannot identify image file)"]
    strict = LSUNImages(root / "tower_val_lmdb", lsun_transform(8, train=False), strict=True)
    with pytest.raises(DataError, match=r"record b'a' of .*tower_val_lmdb is not a readable image "
                                        r"\(cannot identify image file\)$"):
        strict[0]


@needs_lmdb
def test_lsun_in_dataloader_workers(fake_lsun):
    root, _, val = fake_lsun
    ds = build_dataset("lsun_church64", "test", str(root), image_size=16)
    ds[0]     # the parent has the LMDB open before the worker forks
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=1)
    (batch,) = next(iter(loader))
    expected = torch.stack([_official_lsun(16, False)(img) for img in val])
    assert torch.equal(batch, expected)
    again = build_dataset("lsun_church64", "test", str(root), image_size=16)   # a second reader of the same LMDB
    assert torch.equal(torch.stack([ds[2][0], again[2][0]]), expected[[2, 2]])   # ... and the parent's still reads


# --------------------------------------------------------------------------------------------- presets
NEW = ["omniglot", "stacked_mnist"] + [f"lsun_{c}{s}" for c in ("church", "bedroom", "tower") for s in (64, 128)]


def test_new_data_sets_are_registered():
    names = set(available())
    assert {"omniglot", "stacked_mnist"} <= names
    assert {f"lsun_{c}{s}" for c in ("church", "bedroom", "tower") for s in (64, 128, 256)} <= names


@pytest.mark.parametrize("name", NEW)
def test_presets_fit_their_data(name):
    from nvae.data.registry import _REGISTRY
    cfg, recipe = NVAEConfig.preset(name), TRAIN_PRESETS[name]
    assert recipe.dataset == name and name in PRESETS
    shape = _REGISTRY[name].shape
    if shape is not None:
        assert shape == (cfg.in_channels, cfg.image_size, cfg.image_size)
    else:
        assert cfg.image_size == int(re.search(r"\d+$", name).group()) and cfg.in_channels == 3
    assert (cfg.decoder == "bernoulli") == (name == "omniglot")
    assert cfg.crop_output == (2 if name in ("omniglot", "stacked_mnist") else 0)   # the official model's crop


def test_official_dataset_names_map_to_ours():
    from nvae.formats.official import OFFICIAL_DATASETS, config_from_args
    assert set(OFFICIAL_DATASETS.values()) <= set(available())
    assert OFFICIAL_DATASETS["lsun_church_64"] == "lsun_church64"
    assert OFFICIAL_DATASETS["lsun_bedroom_128"] == "lsun_bedroom128"
    args = {k: getattr(NVAEConfig.preset("stacked_mnist"), k) for k in (
        "num_channels_enc", "num_channels_dec", "num_latent_scales", "num_groups_per_scale", "ada_groups",
        "num_preprocess_blocks", "num_preprocess_cells", "num_postprocess_blocks", "num_postprocess_cells",
        "num_cell_per_cond_enc", "num_cell_per_cond_dec", "num_latent_per_group", "num_nf", "num_mixture_dec")}
    official = config_from_args({**args, "dataset": "stacked_mnist", "use_se": True, "res_dist": True})
    assert official == NVAEConfig.preset("stacked_mnist")


def test_omniglot_takes_mnist_model_and_lsun64_the_celeba64_model():
    assert NVAEConfig.preset("omniglot") == NVAEConfig.preset("mnist")
    for c in ("church", "bedroom", "tower"):
        assert NVAEConfig.preset(f"lsun_{c}64") == NVAEConfig.preset("celeba64")


@pytest.mark.parametrize("name", ["omniglot", "stacked_mnist"])
def test_training_takes_the_preset_data(name, tmp_path, fake_mnist):
    """What `nvae train --preset NAME` builds: both splits, of the shape the preset's model takes."""
    from nvae.distributed import DistributedContext
    from nvae.training.loop import training_data
    root, _ = fake_mnist
    _write_chardata(root / "chardata.mat", n_train=8, n_test=4)
    data, test = training_data(NVAEConfig.preset(name), TrainConfig.preset(name, batch_size=4), str(root),
                               DistributedContext(device=torch.device("cpu")))
    assert len(data) == (8 if name == "omniglot" else 14) and len(test) == (4 if name == "omniglot" else 8)


@needs_lmdb
def test_training_takes_the_lsun_preset_data(fake_lsun):
    from nvae.distributed import DistributedContext
    from nvae.training.loop import training_data
    root, _, _ = fake_lsun
    data, test = training_data(NVAEConfig.preset("lsun_church128"), TrainConfig.preset("lsun_church128", batch_size=2),
                               str(root), DistributedContext(device=torch.device("cpu")))
    assert data[0][0].shape == test[0][0].shape == (3, 128, 128) and (len(data), len(test)) == (6, 3)


@pytest.mark.slow
def test_omniglot_preset_trains(tmp_path):
    """The whole path: `nvae train --preset omniglot` on a chardata.mat (a shrunk model, two steps)."""
    from nvae.cli import main
    _write_chardata(tmp_path / "chardata.mat", n_train=8, n_test=4)
    run = tmp_path / "run"
    small = ["num_channels_enc=8", "num_channels_dec=8", "num_groups_per_scale=2", "num_preprocess_cells=1",
             "num_postprocess_cells=1", "num_latent_per_group=4", "num_preprocess_blocks=1", "num_postprocess_blocks=1",
             "num_latent_scales=1"]
    argv = ["train", "--preset", "omniglot", "--data", str(tmp_path), "--run-dir", str(run), "--max-steps", "2",
            "--batch-size", "4"]
    for item in small:
        argv += ["--model", item]
    assert main(argv) == 0
    assert (run / "checkpoint.pt").is_file()
