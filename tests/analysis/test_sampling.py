"""BN re-adjustment and the eval / sample commands."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nvae import NVAE, NVAEConfig
from nvae.analysis.bulk_samples import chunk_generator
from nvae.cli import main
from nvae.analysis import sampling
from nvae.analysis.fid_protocol import FIDProtocol, bn_cache_checkpoint, prepare_bn
from nvae.analysis.sampling import bn_cache_path, decoder_bn_layers, readjust_bn, readjust_bn_cached

from conftest import DATA, REFERENCE, needs_shared


def tiny_model():
    torch.manual_seed(0)
    return NVAE(NVAEConfig.preset("mnist_small", num_channels_enc=4, num_channels_dec=4, num_groups_per_scale=2))


def test_readjust_bn_changes_only_decoder_bn_statistics():
    model = tiny_model().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    readjust_bn(model, temperature=0.6, steps=3, batch_size=4, generator=torch.Generator().manual_seed(0))
    assert not model.training
    decoder = decoder_bn_layers(model)
    assert decoder
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    allowed = {f"{name}.{buf}" for name in decoder for buf in ("running_mean", "running_var", "num_batches_tracked")}
    assert changed and changed <= allowed
    assert any(k.endswith("running_var") for k in changed)


def test_readjusted_statistics_are_cached_per_temperature(tmp_path):
    model = tiny_model()
    ckpt = tmp_path / "m.pt"
    model.save(ckpt)
    gen = torch.Generator().manual_seed(0)
    assert readjust_bn_cached(model, ckpt, 0.7, steps=2, batch_size=4, generator=gen) is False
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    assert bn_cache_path(ckpt, 0.7, 2).is_file()
    fresh = NVAE.from_checkpoint(ckpt)
    assert readjust_bn_cached(fresh, ckpt, 0.7, steps=2) is True
    assert all(torch.equal(stats[k], v) for k, v in fresh.state_dict().items() if "running" in k)
    assert bn_cache_path(ckpt, 0.8, 2) != bn_cache_path(ckpt, 0.7, 2)


def _running_stats(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k}


def test_official_fid_readjusts_500_steps_of_2_under_autocast_and_ours_36_in_float32(monkeypatch):
    """The official ``evaluate.py`` re-adjusts before its FID (mode ``evaluate_fid``) with 500 steps of 2 prior
    samples, all under autocast; ours: ``nvae sample``'s 500 x 36 in float32."""
    official, ours = FIDProtocol("official", 0.6, readjust_bn=True), FIDProtocol("ours", 0.6, readjust_bn=True)
    assert (official.readjust_steps, official.bn_batch, official.readjust_autocast) == (500, 2, True)
    assert (ours.readjust_steps, ours.bn_batch, ours.readjust_autocast) == (500, 36, False)

    asked, calls = [], []
    real = sampling.bn_autocast
    monkeypatch.setattr(sampling, "bn_autocast", lambda model, enabled: asked.append(enabled) or real(model, enabled))
    model = tiny_model().eval()
    inner = model.sample_logits
    model.sample_logits = lambda n, t=1.0, g=None: calls.append(n) or inner(n, t, g)
    for protocol in (FIDProtocol("official", 0.6, readjust_bn=True, readjust_steps=3),
                     FIDProtocol("ours", 0.6, readjust_bn=True, readjust_steps=1)):
        prepare_bn(model, protocol)
    assert asked == [True, False] and calls == [2, 2, 2, 36]
    # on CPU the official autocast is not applied: float32, and the same statistics as without it
    assert isinstance(real(model, True), type(real(model, False)))
    assert sampling.readjust_precision(model, True) == "float32"
    assert FIDProtocol("official", readjust_bn=True).describe(model)["readjust_precision"] == "float32"
    a, b = tiny_model(), tiny_model()
    readjust_bn(a, 0.7, 1, 2, torch.Generator().manual_seed(0), autocast=True)
    readjust_bn(b, 0.7, 1, 2, torch.Generator().manual_seed(0))
    assert all(torch.equal(v, _running_stats(b)[k]) for k, v in _running_stats(a).items())
    # statistics re-adjusted under float16 autocast are cached apart from float32 ones
    ckpt = Path("run/checkpoint.pt")
    assert bn_cache_checkpoint(ckpt, 2).name == "checkpoint.b2.pt"
    assert bn_cache_checkpoint(ckpt, 2, "float16 autocast").name == "checkpoint.b2.fp16.pt"
    assert bn_cache_checkpoint(ckpt, 36, "float16 autocast").name == "checkpoint.fp16.pt"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="float16 autocast is the official re-adjustment on CUDA")
def test_official_readjustment_runs_in_float16_on_cuda():
    model = tiny_model().cuda().eval()
    dtypes = []
    inner = model.sample_logits
    model.sample_logits = lambda n, t=1.0, g=None: dtypes.append(inner(n, t, g).dtype)
    readjust_bn(model, 0.7, 2, 2, torch.Generator("cuda").manual_seed(0), autocast=True)
    readjust_bn(model, 0.7, 1, 2, torch.Generator("cuda").manual_seed(0))
    assert dtypes == [torch.float16, torch.float16, torch.float32]
    assert sampling.readjust_precision(model, True) == "float16 autocast"


def test_sample_command_writes_grids_and_arrays(tmp_path):
    model = tiny_model()
    model.save(tmp_path / "checkpoint.pt")
    rc = main(["sample", str(tmp_path), "-n", "4", "--temperatures", "0.5,1", "--out", str(tmp_path / "s")])
    assert rc == 0
    for t in ("0.5", "1"):
        assert (tmp_path / "s" / f"samples_t{t}.png").is_file()
        arr = np.load(tmp_path / "s" / f"samples_t{t}.npz")["images"]
        assert arr.shape == (4, 1, 32, 32) and arr.min() >= 0 and arr.max() <= 1
    assert not list((tmp_path / "s").glob(".*"))          # no temporary files left behind


def test_sample_command_at_temperature_zero_takes_the_prior_means(tmp_path):
    model = tiny_model().eval()
    model.save(tmp_path / "checkpoint.pt")
    assert main(["sample", str(tmp_path), "-n", "2", "-t", "0", "--out", str(tmp_path / "s")]) == 0
    arr = np.load(tmp_path / "s" / "samples_t0.npz")["images"]
    expected = model.sample(2, 0.0).numpy()        # deterministic: every z at its prior mean
    assert not (tmp_path / "s" / "samples_t1.npz").exists()
    np.testing.assert_allclose(arr, expected, rtol=1e-6, atol=1e-6)


def test_sample_command_at_temperature_zero_gives_one_image_for_every_seed_in_colour_too(tmp_path):
    torch.manual_seed(0)
    model = NVAE(NVAEConfig.preset("cifar10", num_channels_enc=4, num_channels_dec=4, num_groups_per_scale=2,
                                   image_size=8)).eval()
    model.save(tmp_path / "checkpoint.pt")
    images = {}
    for t, seed in (("0", "1"), ("0", "2"), ("0.5", "1"), ("0.5", "2")):
        out = tmp_path / f"t{t}_seed{seed}"
        assert main(["sample", str(tmp_path), "-n", "2", "-t", t, "--seed", seed, "--out", str(out)]) == 0
        images[t, seed] = np.load(out / f"samples_t{t}.npz")["images"]
    assert np.array_equal(images["0", "1"], images["0", "2"])         # no pixel noise at 0 either
    assert not np.array_equal(images["0.5", "1"], images["0.5", "2"])


def test_sample_grids_of_small_images_are_enlarged_and_say_whether_they_are_draws_or_means(tmp_path, capsys):
    from PIL import Image
    torch.manual_seed(0)
    model = NVAE(NVAEConfig.preset("cifar10", num_channels_enc=4, num_channels_dec=4, num_groups_per_scale=2,
                                   image_size=8)).eval()
    model.save(tmp_path / "checkpoint.pt")
    assert main(["sample", str(tmp_path), "-n", "4", "-t", "0.8", "--out", str(tmp_path / "s")]) == 0
    assert "draws of p(x|z)" in capsys.readouterr().out
    with Image.open(tmp_path / "s" / "samples_t0.8.png") as grid:   # 2 x 2 images of 8 px, each shown at 32
        assert grid.size[0] >= 2 * 32 and grid.size[1] >= 2 * 32
    assert main(["sample", str(tmp_path), "-n", "4", "-t", "0.8", "--means", "--out", str(tmp_path / "s")]) == 0
    assert "p(x|z)'s means" in capsys.readouterr().out
    means = np.load(tmp_path / "s" / "samples_t0.8_means.npz")["images"]
    expected = model.output_distribution(model.sample_logits(4, 0.8, chunk_generator(0, 0))).mean()
    np.testing.assert_allclose(means, expected.numpy(), rtol=1e-6, atol=1e-6)


def test_sample_command_rejects_bad_temperatures(tmp_path, capsys):
    tiny_model().save(tmp_path / "checkpoint.pt")
    assert main(["sample", str(tmp_path), "--temperatures", "0.5,hot"]) == 2
    assert "temperatures" in capsys.readouterr().err


def test_eval_command_needs_a_checkpoint(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nothing")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


@needs_shared("reference", "mnist_tiny")
@needs_shared("data", "MNIST")
def test_eval_command_on_an_official_checkpoint(tmp_path):
    out = tmp_path / "eval.json"
    rc = main(["eval", str(REFERENCE / "mnist_tiny" / "checkpoint.pt"), "--data", str(DATA), "-k", "2",
               "--max-images", "8", "--output", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["dataset"] == "mnist" and result["num_images"] == 8 and result["data_dims"] == 784
    assert 20 < result["nll"] < 400 and result["nll"] <= result["nelbo"] + 5


def test_kl_statistics_match_the_forward_pass(tmp_path):
    from torch.utils.data import TensorDataset

    from nvae.analysis.likelihood import kl_statistics, plot_kl_stats
    model = tiny_model().eval()
    x = (torch.rand(6, 1, 32, 32) > 0.5).float()
    stats = kl_statistics(model, TensorDataset(x), batch_size=4, generator=torch.Generator().manual_seed(1),
                          progress=False)
    # the same draws, by hand: binarisation then the forward pass, in the same batches
    gen = torch.Generator().manual_seed(1)
    per_channel = []
    for part in (x[:4], x[4:]):
        xb = torch.bernoulli(part, generator=gen)
        per_channel.append(model(xb, generator=gen).kl_per_channel.double())
    mean = torch.cat(per_channel).mean(0)
    assert stats.num_images == 6 and stats.units_per_group == 20
    assert torch.allclose(torch.tensor(stats.kl_per_group, dtype=torch.float64), mean.sum(1))
    assert stats.active_units == (mean > 0.1).sum(1).tolist()
    plot_kl_stats(stats, tmp_path / "kl.png")
    assert (tmp_path / "kl.png").read_bytes()[:4] == b"\x89PNG"


def test_reconstruct_and_kl_stats_commands(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), "--max-steps", "2", "--batch-size", "16",
                 "--model", "num_channels_enc=4", "--model", "num_channels_dec=4"]) == 0
    assert main(["reconstruct", str(run), "-n", "4"]) == 0
    assert (run / "reconstructions_test_t0.png").is_file()
    assert main(["kl-stats", str(run), "--max-images", "20"]) == 0
    result = json.loads((run / "kl_stats_test.json").read_text())
    assert result["dataset"] == "digits" and result["num_images"] == 20
    assert len(result["kl_per_group"]) == len(result["active_units"]) == 6
    assert (run / "kl_stats_test.png").is_file()


def test_interpolation_ends_at_both_inputs_and_moves_only_chosen_groups():
    from nvae.analysis.sampling import interpolate_latents
    model = tiny_model().eval()
    x = (torch.rand(2, 1, 32, 32) > 0.5).float()
    with torch.no_grad():
        z = model(x, temperature=0.0).latents
    za, zb = [t[:1] for t in z], [t[1:] for t in z]
    path = interpolate_latents(za, zb, torch.linspace(0, 1, 3))
    assert all(torch.equal(p[0], a[0]) and torch.allclose(p[-1], b[0]) for p, a, b in zip(path, za, zb))
    assert all(torch.allclose(p[1], (a[0] + b[0]) / 2) for p, a, b in zip(path, za, zb))
    logits = model.decode_logits(path)
    with torch.no_grad():
        assert torch.allclose(logits[0], model.decode_logits(za)[0], atol=1e-5)
    only_first = interpolate_latents(za, zb, [1.0], groups=[0])
    assert torch.allclose(only_first[0][0], zb[0][0]) and torch.equal(only_first[1][0], za[1][0])
    with pytest.raises(ValueError, match="do not exist"):
        interpolate_latents(za, zb, [0.5], groups=[99])


def test_interpolate_command(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), "--max-steps", "1", "--batch-size", "16",
                 "--model", "num_channels_enc=4", "--model", "num_channels_dec=4"]) == 0
    assert main(["interpolate", str(run), "--a", "0", "--b", "5", "--steps", "4", "--groups", "0,1"]) == 0
    assert (run / "interpolation_0_5.png").is_file()
    assert main(["interpolate", str(run), "--a", "100000"]) == 2
