"""FID: pytorch-fid's Inception fed from a local weights file, statistics files, model FID, CLI.

The weights are random, in the exact state-dict layout of pytorch-fid's FID Inception, so
nothing is downloaded; FIDs are computed on the 64 features of the first block where the
2048-dimensional matrix square root would take tens of seconds on one CPU core.
"""
import argparse
import json
import socket

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

pytest.importorskip("pytorch_fid")
import pytorch_fid.inception as pfi  # noqa: E402
from pytorch_fid.fid_score import compute_statistics_of_path  # noqa: E402

from conftest import count_reads  # noqa: E402
from nvae import NVAE, NVAEConfig, cli  # noqa: E402
from nvae.formats.checkpoint import save_model  # noqa: E402
from nvae.cli.fid import add_fid_parsers, cmd_fid, cmd_fid_stats  # noqa: E402
from nvae.analysis.fid import (FID_WEIGHTS_FILE, FIDError, InceptionFeatures, dataset_statistics,  # noqa: E402
                      frechet_distance, load_statistics, load_statistics_info, model_fid, save_statistics)
from nvae.analysis.fid_protocol import official_reference_dataset, stats_dataset  # noqa: E402


pytestmark = [  # pytorch-fid's sqrtm call on a newer SciPy; few images give singular covariances
    pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Matrix is singular"),
]


def _randomise(net: nn.Module, seed: int = 0) -> None:
    """Weights that keep activations of a plain-ReLU network at a sensible scale."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2 / m.weight[0].numel()) ** 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.bias.shape, generator=g) + 0.5)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A random state dict of pytorch-fid's own FID Inception structure, saved like the real file.

    ``fid_inception_v3`` builds torchvision's Inception, swaps in the FID blocks and then asks
    for the weights; the structure is captured at that point and given random weights.
    """
    mp = pytest.MonkeyPatch()
    built = []
    make = pfi._inception_v3

    def record(*args, **kwargs):
        built.append(make(*args, **kwargs))
        return built[-1]

    def fetch(url, *args, **kwargs):
        _randomise(built[-1])
        return built[-1].state_dict()

    mp.setattr(pfi, "_inception_v3", record)
    mp.setattr(pfi, "load_state_dict_from_url", fetch)
    try:
        state = pfi.fid_inception_v3().state_dict()
    finally:
        mp.undo()
    path = tmp_path_factory.mktemp("inception") / FID_WEIGHTS_FILE
    torch.save(state, path)
    return path


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Any connection attempt fails, and torch.hub's cache is empty."""
    def refuse(*args, **kwargs):
        raise AssertionError("tried to use the network")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


@pytest.fixture(scope="module")
def inception64(weights):
    return InceptionFeatures(weights, dims=64)


def _images(n, channels=3, seed=0):
    """Smooth random images in [0, 1] (low-resolution noise, upsampled), 8-bit values."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, channels, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(low, size=(16, 16), mode="bilinear", align_corners=False)
    return torch.round(x * 255) / 255


def _tiny_model():
    cfg = NVAEConfig.preset("digits", num_channels_enc=4, num_channels_dec=4)
    return NVAE(cfg).eval()


# ----------------------------------------------------------------------------- features
def test_features_equal_pytorch_fid_inception_with_the_same_weights(weights, no_network, monkeypatch):
    ours = InceptionFeatures(weights)   # 2048 features: the standard FID layer
    state = torch.load(weights, weights_only=True)
    first, last = ours.net.blocks[0][0], ours.net.blocks[3][2]     # Conv2d_1a_3x3 and Mixed_7c
    for prefix, module in (("Conv2d_1a_3x3.", first), ("Mixed_7c.", last)):
        for name, value in module.state_dict().items():
            assert torch.equal(value, state[prefix + name]), prefix + name

    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: torch.load(weights, weights_only=True))
    reference = pfi.InceptionV3([3]).eval()   # pytorch-fid's own network, as its fid_score uses it
    rgb = _images(1, 3, seed=1)
    grey = _images(1, 1, seed=2)
    with torch.no_grad():
        expected = reference(torch.cat([rgb, grey.repeat(1, 3, 1, 1)]))[0].flatten(1)
    got = torch.cat([ours(rgb), ours(grey)])          # grey goes in as one channel
    assert got.shape == (2, 2048)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got[0], got[1])   # features depend on the image


def test_features_round_to_8_bits_and_reject_out_of_range_images(inception64):
    x = _images(2)
    torch.testing.assert_close(inception64(x + 0.4 / 255), inception64(x))   # same PNG pixels
    inception64.quantize = False                                               # the official protocol's float means
    try:
        assert not torch.allclose(inception64(x + 0.4 / 255), inception64(x))
    finally:
        inception64.quantize = True
    with pytest.raises(FIDError, match=r"\[0, 1\]"):
        inception64(x * 2 - 1)
    with pytest.raises(FIDError, match="shape"):
        inception64(torch.rand(2, 2, 8, 8))


# ----------------------------------------------------------------------------- statistics and distance
def test_fid_against_own_statistics_is_zero_and_grows_with_a_shift(inception64):
    x = _images(8)
    stats = dataset_statistics(TensorDataset(x), inception64, batch_size=3, progress=False)
    feats = inception64(x).double().numpy()
    np.testing.assert_allclose(stats[0], feats.mean(0), rtol=1e-6, atol=1e-9)   # uneven batches kept in order
    np.testing.assert_allclose(stats[1], np.cov(feats, rowvar=False), rtol=1e-6, atol=1e-9)

    again = dataset_statistics(x, inception64, batch_size=8, progress=False)
    assert abs(frechet_distance(stats, again)) < 1e-6 * np.trace(stats[1]) + 1e-8
    slight = frechet_distance(stats, dataset_statistics(x * 0.9, inception64, progress=False))
    strong = frechet_distance(stats, dataset_statistics(x * 0.5, inception64, progress=False))
    assert 0 < slight < strong
    other = dataset_statistics(_images(8, seed=5), inception64, progress=False)
    assert frechet_distance(stats, other) > 10 * abs(frechet_distance(stats, again))


def test_dataset_statistics_takes_build_dataset_items_and_max_images(inception64):
    x = _images(10, channels=1)
    one_tuples = TensorDataset(x)                     # items are (image,) as build_dataset gives
    mu, sigma = dataset_statistics(one_tuples, inception64, batch_size=4, max_images=6, progress=False)
    ref = dataset_statistics(x[:6], inception64, progress=False)
    np.testing.assert_allclose(mu, ref[0])
    np.testing.assert_allclose(sigma, ref[1])
    with pytest.raises(FIDError, match="at least 2 images"):
        dataset_statistics(x, inception64, max_images=1, progress=False)
    picked = torch.randperm(10, generator=torch.Generator().manual_seed(3))[:6].sort().values
    mu, sigma = dataset_statistics(one_tuples, inception64, max_images=6, subset_seed=3, progress=False)
    ref = dataset_statistics(x[picked], inception64, progress=False)
    np.testing.assert_allclose(mu, ref[0])
    np.testing.assert_allclose(sigma, ref[1])
    assert sorted(picked.tolist()) != list(range(6))          # not the first six


def test_statistics_round_trip_in_pytorch_fid_format(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20, 8))
    mu, sigma = a.mean(0), np.cov(a, rowvar=False)
    path = save_statistics(tmp_path / "stats.npz", mu, sigma)
    assert [p.name for p in tmp_path.iterdir()] == ["stats.npz"]   # no temporary file left behind
    with np.load(path) as f:
        assert sorted(f.files) == ["mu", "sigma"]
    m2, s2 = load_statistics(path)
    np.testing.assert_array_equal(m2, mu)
    np.testing.assert_array_equal(s2, sigma)
    m3, s3 = compute_statistics_of_path(str(path), None, 1, 8, "cpu")   # pytorch-fid reads it
    np.testing.assert_array_equal(m3, mu)
    np.testing.assert_array_equal(s3, sigma)
    assert load_statistics_info(path) is None
    tagged = save_statistics(tmp_path / "tagged.npz", mu, sigma, info={"protocol": "official", "seed": 3})
    assert load_statistics_info(tagged) == {"protocol": "official", "seed": 3}
    m4, s4 = compute_statistics_of_path(str(tagged), None, 1, 8, "cpu")   # pytorch-fid ignores the extra array
    np.testing.assert_array_equal(m4, mu)
    np.testing.assert_array_equal(load_statistics(tagged)[1], sigma)
    with pytest.raises(FIDError, match=r"\.npz"):
        save_statistics(tmp_path / "stats.txt", mu, sigma)
    with pytest.raises(FIDError, match="shape"):
        save_statistics(tmp_path / "bad.npz", mu, sigma[:3])


def test_bad_statistics_files_are_clear_errors(tmp_path):
    with pytest.raises(FIDError, match="no FID statistics.*nvae fid-stats"):
        load_statistics(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(FIDError, match="could not be read as a .npz"):
        load_statistics(tmp_path / "junk.npz")
    np.savez(tmp_path / "nosigma.npz", mu=np.zeros(4))
    with pytest.raises(FIDError, match=r"lacks \['sigma'\]"):
        load_statistics(tmp_path / "nosigma.npz")
    np.savez(tmp_path / "shape.npz", mu=np.zeros(4), sigma=np.eye(3))
    with pytest.raises(FIDError, match=r"mu must have shape \(D,\) and sigma \(D, D\)"):
        load_statistics(tmp_path / "shape.npz")
    np.savez(tmp_path / "nan.npz", mu=np.full(3, np.nan), sigma=np.eye(3))
    with pytest.raises(FIDError, match="NaN"):
        load_statistics(tmp_path / "nan.npz")
    with pytest.raises(FIDError, match="same --dims"):
        frechet_distance((np.zeros(3), np.eye(3)), (np.zeros(4), np.eye(4)))


# ----------------------------------------------------------------------------- weights errors
def test_missing_or_wrong_weights_are_clear_errors(weights, tmp_path, no_network):
    with pytest.raises(FIDError, match=f"stored locally.*{FID_WEIGHTS_FILE}.*--inception-weights"):
        InceptionFeatures(None)
    with pytest.raises(FIDError, match=f"no Inception weights at .*{FID_WEIGHTS_FILE}"):
        InceptionFeatures(tmp_path / "nowhere.pth")
    (tmp_path / "junk.pth").write_bytes(b"\x00" * 100)
    with pytest.raises(FIDError, match="could not be read as a PyTorch state dict"):
        InceptionFeatures(tmp_path / "junk.pth")
    torch.save(nn.Linear(2, 2), tmp_path / "module.pth")           # a pickled module: refused, not run
    with pytest.raises(FIDError, match="could not be read as a PyTorch state dict"):
        InceptionFeatures(tmp_path / "module.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(FIDError, match="not a state dict"):
        InceptionFeatures(tmp_path / "list.pth")
    torch.save(nn.Conv2d(3, 8, 3).state_dict(), tmp_path / "other.pth")
    with pytest.raises(FIDError, match="not the FID Inception state dict.*missing keys: "):
        InceptionFeatures(tmp_path / "other.pth")
    state = torch.load(weights, weights_only=True)
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)   # torchvision's classes
    torch.save(state, tmp_path / "torchvision_like.pth")
    with pytest.raises(FIDError, match="not the FID Inception state dict.*size mismatch"):
        InceptionFeatures(tmp_path / "torchvision_like.pth")
    with pytest.raises(FIDError, match="dims must be one of"):
        InceptionFeatures(weights, dims=100)


def test_a_download_request_fails_instead_of_downloading(weights, monkeypatch, no_network):
    original = pfi.load_state_dict_from_url
    monkeypatch.setattr(pfi, "FID_WEIGHTS_URL", "https://example.com/other-weights.pth")
    with pytest.raises(FIDError, match="asked to download https://example.com/other-weights.pth"):
        InceptionFeatures(weights, dims=64)
    assert pfi.load_state_dict_from_url is original   # pytorch-fid left as it was


def test_missing_pytorch_fid_says_how_to_install(weights, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "pytorch_fid", None)
    with pytest.raises(FIDError, match=r"pip install pytorch-fid.*nvae\[fid\]"):
        InceptionFeatures(weights, dims=64)


# ----------------------------------------------------------------------------- model FID
def test_model_fid_against_its_own_samples(inception64):
    model = _tiny_model()
    g = torch.Generator().manual_seed(1)
    x = torch.cat([model.sample(3, 1.0, g), model.sample(3, 1.0, g)])
    feats = inception64(x).double().numpy()
    own = feats.mean(0), np.cov(feats, rowvar=False)

    model.train()
    same = model_fid(model, own, inception64, num_samples=6, batch_size=3,
                     generator=torch.Generator().manual_seed(1), progress=False)
    assert model.training                               # mode restored
    assert abs(same) < 1e-6 * np.trace(own[1]) + 1e-8   # the same samples
    other_seed = model_fid(model, own, inception64, num_samples=6, batch_size=3,
                           generator=torch.Generator().manual_seed(2), progress=False)
    cold = model_fid(model, own, inception64, num_samples=6, temperature=0.0, batch_size=3,
                     generator=torch.Generator().manual_seed(1), progress=False)
    assert other_seed > 10 * abs(same) and cold > 10 * abs(same)
    with pytest.raises(FIDError, match="hold 2048 features but the Inception extractor gives 64"):
        model_fid(model, (np.zeros(2048), np.eye(2048)), inception64, num_samples=4, progress=False)
    with pytest.raises(FIDError, match="at least 2 samples"):
        model_fid(model, own, inception64, num_samples=1, progress=False)


# ----------------------------------------------------------------------------- command line
@pytest.fixture
def nvae_main():
    return cli.main


@pytest.mark.parametrize("command", [["fid", "RUN", "--stats", "s.npz"],
                                     ["fid-stats", "--dataset", "digits", "--output", "s.npz"]])
def test_cli_without_inception_weights_says_where_to_get_them(command, nvae_main, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert nvae_main(command) == 2
    err = capsys.readouterr().err
    assert err.startswith("nvae: error: FID needs the Inception weights stored locally")
    assert FID_WEIGHTS_FILE in err and "--inception-weights PATH" in err and "pytorch-fid releases" in err
    assert list(tmp_path.iterdir()) == []


def test_handlers_raise_value_errors_for_bad_input(tmp_path):
    parser = argparse.ArgumentParser()
    add_fid_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["fid", "RUN", "--stats", "s.npz"])
    assert args.func is cmd_fid
    with pytest.raises(FIDError, match=FID_WEIGHTS_FILE):
        cmd_fid(args)
    args = parser.parse_args(["fid-stats", "--dataset", "digits", "--output", str(tmp_path / "s.npz"),
                              "--inception-weights", str(tmp_path / "none.pth")])
    assert args.func is cmd_fid_stats
    with pytest.raises(FIDError, match="no Inception weights at"):
        cmd_fid_stats(args)
    args = parser.parse_args(["fid-stats", "--dataset", "digits", "--output", str(tmp_path / "s.npz"),
                              "--inception-weights", "w.pth", "--subset-seed", "1"])
    with pytest.raises(FIDError, match="give --max-images too"):
        cmd_fid_stats(args)
    args = parser.parse_args(["fid", "RUN", "--stats", str(tmp_path / "none.npz"), "--inception-weights", "w.pth"])
    with pytest.raises(FIDError, match="no FID statistics"):
        cmd_fid(args)


def test_cli_fid_stats_then_fid_end_to_end(weights, nvae_main, tmp_path, no_network, capsys):
    stats = tmp_path / "digits.npz"
    assert nvae_main(["fid-stats", "--dataset", "digits", "--split", "test", "--max-images", "8",
                      "--dims", "64", "--batch-size", "6", "--inception-weights", str(weights),
                      "--output", str(stats), "--no-progress"]) == 0
    assert "8 images of digits (test)" in capsys.readouterr().out
    mu, sigma = load_statistics(stats)
    assert mu.shape == (64,) and sigma.shape == (64, 64)

    ckpt = tmp_path / "run" / "checkpoint.pt"
    ckpt.parent.mkdir()
    save_model(_tiny_model(), ckpt)
    argv = ["fid", str(ckpt.parent), "--stats", str(stats), "--inception-weights", str(weights),
            "-n", "6", "--batch-size", "3", "--temperature", "0.8", "--no-progress"]
    assert nvae_main(argv) == 0          # our checkpoint: our protocol by default
    printed = json.loads(capsys.readouterr().out)
    written = json.loads((ckpt.parent / "fid_ours_t0.8_n6.json").read_text())
    assert printed == written
    assert np.isfinite(written["fid"]) and written["fid"] > 0
    assert written["dims"] == 64 and written["num_samples"] == 6 and written["temperature"] == 0.8
    assert written["protocol"] == "ours" and written["sampling_temperature"] == 0.8
    assert written["images"] == "samples of p(x|z) (mixture)" and written["readjust_bn"] is False
    assert written["bn_temperature"] is None and written["world_size"] == 1 and written["reduction"] == "pooled"
    assert len(written["inception_weights_sha256"]) == 64

    official = argv[:-5] + ["-t", "0.6", "--protocol", "official", "--readjust-bn", "--readjust-steps", "2",
                            "--no-progress"]
    assert nvae_main(official) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["protocol"] == "official" and first["sampling_temperature"] == 1.0
    assert first["images"] == "means of p(x|z) (mixture)" and first["bn_temperature"] == 0.6
    assert first["readjust_bn"] is True and first["readjust_batch"] == 2 and first["readjust_steps"] == 2
    assert first["rounded_to_8_bits"] is False and written["rounded_to_8_bits"] is True
    assert first["bn_from_cache"] is False and (ckpt.parent / "checkpoint.b2.bn_t0.6_s2.pt").is_file()
    assert first["reduction"] == "average" and first["readjust_precision"] == "float32"    # official, on CPU
    assert nvae_main(official) == 0      # the re-adjusted statistics come from the cache: the same FID
    again = json.loads((ckpt.parent / "fid_official_t0.6_bn_n6.json").read_text())
    assert again["bn_from_cache"] is True and again["fid"] == first["fid"]
    assert again["fid"] != written["fid"]

    capsys.readouterr()
    groups = _tiny_model().num_groups
    ramp = argv[:-5] + ["-t", "linear:0.6:0.9", "--protocol", "ours", "--no-progress"]
    assert nvae_main(ramp) == 0          # a schedule acts per group and is recorded as its list
    scheduled = json.loads(capsys.readouterr().out)
    expected = [0.6 + 0.3 * g / (groups - 1) for g in range(groups)]
    assert scheduled["sampling_temperature"] == pytest.approx(expected)
    assert scheduled["fid"] != written["fid"]

    capsys.readouterr()
    assert nvae_main(argv[:-5] + ["-t", "0.6", "--protocol", "official", "-n", "2", "--no-progress"]) == 0
    assert "only sets the temperature of --readjust-bn, which is off" in capsys.readouterr().err

    bad = tmp_path / "bad.npz"
    np.savez(bad, mu=np.zeros(64))
    assert nvae_main(["fid", str(ckpt), "--stats", str(bad), "--inception-weights", str(weights)]) == 2
    assert "lacks ['sigma']" in capsys.readouterr().err
    assert nvae_main(["fid-stats", "--dataset", "digits", "--split", "valid", "--inception-weights", str(weights),
                      "--output", str(tmp_path / "v.npz")]) == 2
    assert "--split must be train, test or train,test" in capsys.readouterr().err


def test_cli_fid_stats_official_protocol_takes_the_official_images_and_records_its_seed(
        weights, nvae_main, tmp_path, no_network, capsys):
    """``--protocol official``: the first --max-images of a seeded, shuffled, drop_last loader of the training
    split; protocol, seed and selection recorded in the file (``meta``) and printed; ours unchanged."""
    base = ["fid-stats", "--dataset", "digits", "--dims", "64", "--inception-weights", str(weights), "--no-progress"]
    official = base + ["--protocol", "official", "--max-images", "10", "--batch-size", "16"]
    assert nvae_main(official + ["--seed", "3", "--output", str(tmp_path / "o3.npz")]) == 0
    out = capsys.readouterr().out
    assert "10 images of digits (train), official protocol, seed 3: shuffled, batches of 16" in out
    info = load_statistics_info(tmp_path / "o3.npz")
    assert info == {"protocol": "official", "seed": 3, "dataset": "digits", "splits": ["train"], "images": 10,
                    "loader_batch_size": 16, "drop_last": True, "max_images": 10, "training_transforms": True,
                    "binarised": False, "dims": 64}
    expected = dataset_statistics(official_reference_dataset("digits", seed=3, batch_size=16, max_images=10),
                                  InceptionFeatures(weights, dims=64), progress=False)
    mu, sigma = load_statistics(tmp_path / "o3.npz")
    np.testing.assert_allclose(mu, expected[0], rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(sigma, expected[1], rtol=1e-5, atol=1e-8)
    assert nvae_main(official + ["--seed", "4", "--output", str(tmp_path / "o4.npz")]) == 0
    assert not np.allclose(load_statistics(tmp_path / "o4.npz")[0], mu)       # another seed, other images
    first = dataset_statistics(stats_dataset("digits", ("train",)), InceptionFeatures(weights, dims=64),
                               max_images=10, progress=False)
    assert not np.allclose(first[0], mu)                                      # not the first 10 in order

    assert nvae_main(base + ["--max-images", "10", "--output", str(tmp_path / "ours.npz")]) == 0   # ours: default
    assert "our protocol: in order" in capsys.readouterr().out
    assert load_statistics_info(tmp_path / "ours.npz")["protocol"] == "ours"
    np.testing.assert_allclose(load_statistics(tmp_path / "ours.npz")[0], first[0], rtol=1e-6, atol=1e-8)
    for extra, name in ((["--split", "test"], "--split"), (["--subset-seed", "1"], "--subset-seed")):
        assert nvae_main(official + extra + ["--output", str(tmp_path / "x.npz")]) == 2
        assert f"{name} is not taken under --protocol official" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_processes_give_the_one_process_fid(weights, nvae_main, tmp_path, capsys):
    """`torchrun -m nvae fid` over two gloo processes: the same images, the same pooled statistics and FID."""
    import os
    import subprocess
    import sys
    stats = tmp_path / "s.npz"
    assert nvae_main(["fid-stats", "--dataset", "digits", "--split", "test", "--max-images", "8", "--dims", "64",
                      "--inception-weights", str(weights), "--output", str(stats), "--no-progress"]) == 0
    (tmp_path / "run").mkdir()
    save_model(_tiny_model(), tmp_path / "run" / "checkpoint.pt")
    args = ["fid", str(tmp_path / "run"), "--stats", str(stats), "--inception-weights", str(weights), "-n", "7",
            "--batch-size", "3", "--protocol", "official", "--readjust-bn", "--readjust-steps", "2",
            "--reduction", "pooled", "--no-progress"]
    assert nvae_main(args + ["--output", str(tmp_path / "one.json")]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "nvae",
           *args, "--output", str(tmp_path / "two.json")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one["world_size"] == 1 and two["world_size"] == 2 and two["bn_from_cache"] is True
    assert two["fid"] == pytest.approx(one["fid"], rel=1e-6)


def test_cli_fid_reads_the_checkpoint_once(weights, nvae_main, tmp_path, no_network, monkeypatch, capsys):
    """Protocol, weights and data come from one read of the checkpoint, the BN re-adjustment included."""
    stats = tmp_path / "digits.npz"
    assert nvae_main(["fid-stats", "--dataset", "digits", "--split", "test", "--max-images", "8", "--dims", "64",
                      "--inception-weights", str(weights), "--output", str(stats), "--no-progress"]) == 0
    ckpt = tmp_path / "run" / "checkpoint.pt"
    ckpt.parent.mkdir()
    save_model(_tiny_model(), ckpt)
    reads = count_reads(monkeypatch, ckpt)
    assert nvae_main(["fid", str(ckpt.parent), "--stats", str(stats), "--inception-weights", str(weights),
                      "-n", "4", "--batch-size", "2", "-t", "0.6", "--readjust-bn", "--readjust-steps", "2",
                      "--no-progress"]) == 0
    assert json.loads((ckpt.parent / "fid_ours_t0.6_bn_n4.json").read_text())["readjust_bn"] is True
    assert len(reads) == 1, reads
