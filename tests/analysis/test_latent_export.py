"""Latent export (nvae.analysis.latent_export, `nvae encode` / `nvae decode`) and the partial-posterior grid
(`nvae reconstruct --keep-groups`)."""
import json

import numpy as np
import pytest
import torch

from nvae import NVAE, NVAEConfig
from nvae.cli import main
from nvae.data import build_dataset, prepare_batch
from nvae.analysis.likelihood import kl_statistics
from nvae.analysis.latent_export import EncodeConfig, decode, encode_dataset, load_latents, partial_posterior_grid
from nvae.analysis.sampling import reconstructions
from nvae.seeds import LATENTS_KL, derived_seed

from gloo import WORLD, spawn

N = 10   # images encoded: more than one batch of 4


def _model():
    torch.manual_seed(0)
    return NVAE(NVAEConfig.preset("digits", num_channels_enc=4, num_channels_dec=4)).eval()


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def data():
    return build_dataset("digits", "test")


@pytest.fixture(scope="module")
def means(model, data, tmp_path_factory):
    """The posterior means of the first N test images, encoded in batches of 4."""
    path = encode_dataset(model, data, tmp_path_factory.mktemp("enc") / "lat.npz",
                          EncodeConfig(batch_size=4, max_images=N), progress=False, identity={"split": "test"})
    return load_latents(path)


def _inputs(model, data, n=N):
    # the digits preset quantises deterministically: what encode_dataset prepared
    return prepare_batch(torch.stack([data[i][0] for i in range(n)]), model.config)


def test_the_file_holds_one_array_per_group_with_the_indices(means, model):
    assert len(means.z) == model.num_groups == 6
    for z, k, (c, h, w) in zip(means.z, means.channels, model.latent_shapes):
        assert z.shape == (N, c, h, w) and z.dtype == np.float32
        assert k.tolist() == list(range(c))
    assert means.indices.tolist() == list(range(N))
    meta = means.meta
    assert meta["format"] == "nvae-latents" and meta["mode"] == "mean" and meta["split"] == "test"
    assert meta["latent_shapes"] == [list(s) for s in model.latent_shapes]


def test_decoding_the_posterior_means_is_the_temperature_zero_reconstruction(means, model, data):
    recon = reconstructions(model, _inputs(model, data), temperature=0.0)[1::2]
    assert torch.allclose(decode(model, means, batch_size=3), recon, atol=1e-6)


def test_batch_by_batch_equals_one_batch_and_the_walk_means(means, model, data, tmp_path):
    whole = load_latents(encode_dataset(model, data, tmp_path / "one.npz", EncodeConfig(batch_size=N, max_images=N),
                                        progress=False))
    with torch.no_grad():
        walk = model(_inputs(model, data), temperature=0.0).latents
    for a, b, z in zip(means.z, whole.z, walk):
        assert np.allclose(a, b, atol=1e-6) and np.allclose(a, z.numpy(), atol=1e-6)
    assert not list(tmp_path.glob(".*"))   # the temporary parts are gone


def test_active_only_keeps_the_channels_whose_kl_exceeds_the_threshold(means, model, data, tmp_path):
    # one batch: the active-channel pass is kl_statistics with the generator of that batch
    gen = torch.Generator().manual_seed(derived_seed(LATENTS_KL, 0, 0))
    stats = kl_statistics(model, torch.utils.data.Subset(data, range(N)), generator=gen, progress=False)
    per_channel = torch.tensor(stats.kl_per_channel)
    assert torch.allclose(per_channel.sum(1), torch.tensor(stats.kl_per_group, dtype=per_channel.dtype))
    v = per_channel.flatten().sort().values
    threshold = float(v[len(v) // 2] + v[len(v) // 2 + 1]) / 2   # some kept, some dropped, none on the edge
    active = load_latents(encode_dataset(model, data, tmp_path / "active.npz",
                                         EncodeConfig(batch_size=N, max_images=N, active_only=True,
                                                      kl_threshold=threshold), progress=False))
    kept = [torch.nonzero(row > threshold).flatten().tolist() for row in per_channel]
    assert [k.tolist() for k in active.channels] == kept
    assert 0 < sum(map(len, kept)) < per_channel.numel()
    for z_active, z_all, k in zip(active.z, means.z, kept):
        assert np.allclose(z_active, z_all[:, k], atol=1e-6)
    # decoding feeds the stored channels to the decoder and the prior mean to the others
    seen = []
    hooks = [g.dec_combiner.register_forward_hook(lambda m, i, o: seen.append(i[1])) for g in model.groups]
    try:
        images = decode(model, active)
    finally:
        for h in hooks:
            h.remove()
    assert images.shape == (N, 1, 8, 8) and 0 <= images.min() and images.max() <= 1
    for z_seen, z_active, k in zip(seen, active.z, kept):
        assert torch.equal(z_seen[:, k], torch.from_numpy(z_active))


def test_no_channel_kept_decodes_to_the_prior_means(model, data, tmp_path):
    none = load_latents(encode_dataset(model, data, tmp_path / "none.npz",
                                       EncodeConfig(max_images=3, active_only=True, kl_threshold=1e9), progress=False))
    assert all(z.shape[1] == 0 for z in none.z)
    prior_means = model.output_distribution(model.sample_logits(3, temperature=0.0)).mean()
    assert torch.allclose(decode(model, none), prior_means, atol=1e-6)


def test_the_active_channels_are_the_same_over_two_processes(tmp_path):
    """Sharded: each process encodes its batches (and KL-scores its share); rank 0 writes what one process writes."""
    def load(p):
        lat = load_latents(p)
        return [torch.from_numpy(z) for z in lat.z] + [torch.from_numpy(k) for k in lat.channels]
    single = load(encode_dataset(_model(), build_dataset("digits", "test"), tmp_path / "one.npz",
                                 EncodeConfig(batch_size=3, max_images=7, active_only=True, kl_threshold=0.05),
                                 progress=False))
    ranks = spawn(_sharded_worker, tmp_path, str(tmp_path / "two.npz"))
    assert ranks[1] is None
    for a, b in zip(single, ranks[0]):
        assert a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=1e-6)


def _sharded_worker(rank, out):
    from nvae.distributed import init_distributed
    ctx = init_distributed("cpu")
    assert ctx.world_size == WORLD
    path = encode_dataset(_model(), build_dataset("digits", "test"), out,
                          EncodeConfig(batch_size=3, max_images=7, active_only=True, kl_threshold=0.05),
                          dist_ctx=ctx, progress=False)
    if path is None:
        return None
    lat = load_latents(path)
    return [torch.from_numpy(z) for z in lat.z] + [torch.from_numpy(k) for k in lat.channels]


def test_other_weights_are_refused_unless_allowed(means, model):
    other = _model()
    with torch.no_grad():
        other.h0.add_(0.1)
    with pytest.raises(ValueError, match="other weights"):
        decode(other, means)
    assert decode(other, means, allow_other_model=True).shape == (N, 1, 8, 8)
    smaller = NVAE(NVAEConfig.preset("digits", num_channels_enc=4, num_channels_dec=4, num_latent_per_group=4))
    with pytest.raises(ValueError, match="shapes"):
        decode(smaller, means, allow_other_model=True)


def test_non_finite_latents_are_an_error_and_nothing_is_written(data, tmp_path):
    broken = _model()
    with torch.no_grad():
        broken.h0.fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite latents"):
        encode_dataset(broken, data, tmp_path / "lat.npz", EncodeConfig(max_images=2), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_file_that_is_not_a_latents_file_is_refused(tmp_path):
    np.savez(tmp_path / "x.npz", images=np.zeros(3))
    with pytest.raises(ValueError, match="not a readable nvae latents file"):
        load_latents(tmp_path / "x.npz")
    with pytest.raises(ValueError, match="does not exist"):
        load_latents(tmp_path / "missing.npz")
    (tmp_path / "cut.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="not a readable nvae latents file"):
        load_latents(tmp_path / "cut.npz")


def test_a_damaged_latents_file_is_refused(means, tmp_path):
    arrays = {f"z_{g}": z for g, z in enumerate(means.z)}
    arrays.update({f"channels_{g}": k for g, k in enumerate(means.channels)})
    arrays["z_1"] = arrays["z_1"][:, :3]   # fewer channels than its channel list says
    np.savez(tmp_path / "bad.npz", indices=means.indices, meta=np.array(json.dumps(means.meta)), **arrays)
    with pytest.raises(ValueError, match="group 1 holds"):
        load_latents(tmp_path / "bad.npz")


# ------------------------------------------------------------------------------- partial posteriors
def test_partial_posterior_grid_spans_reconstruction_to_prior_sample(model, data):
    x, L, t = _inputs(model, data, 4), model.num_groups, 0.8
    grid = partial_posterior_grid(model, x, [0, 2, L, 0], t, torch.Generator().manual_seed(7))
    assert grid.shape == (5, 4, 1, 8, 8)
    assert torch.equal(grid[0], x)
    sample = model.sample(4, t, generator=torch.Generator().manual_seed(7), mean=True)
    assert torch.equal(grid[1], sample) and torch.equal(grid[4], sample)   # every row from the same draws
    assert torch.allclose(grid[3], reconstructions(model, x, temperature=0.0)[1::2], atol=1e-6)
    assert not torch.equal(grid[2], grid[1]) and not torch.equal(grid[2], grid[3])
    with pytest.raises(ValueError, match=f"0..{L}"):
        partial_posterior_grid(model, x, [1, L + 1])


# ------------------------------------------------------------------------------- CLI
def test_encode_decode_and_keep_groups_commands(model, tmp_path, capsys):
    ckpt = tmp_path / "m.pt"
    model.save(ckpt)
    lat = tmp_path / "lat.npz"
    assert main(["encode", str(ckpt), "--dataset", "digits", "--max-images", "5", "--batch", "2", "--sample",
                 "-t", "0.5", "-o", str(lat), "--no-progress"]) == 0
    latents = load_latents(lat)
    assert latents.meta["mode"] == "sample" and latents.meta["temperature"] == 0.5
    assert latents.meta["checkpoint"] == str(ckpt.resolve()) and latents.meta["dataset"] == "digits"
    assert main(["decode", str(lat), "-o", str(tmp_path / "img.png"), "--grid", "4", "--no-progress"]) == 0
    with np.load(tmp_path / "img.npz") as f:
        images, meta = f["images"], json.loads(str(f["meta"]))
    assert images.shape == (5, 1, 8, 8) and meta["latents_meta"]["mode"] == "sample"
    assert np.allclose(images, decode(model, latents).numpy(), atol=1e-6)
    assert (tmp_path / "img.png").read_bytes()[:4] == b"\x89PNG"
    grid = tmp_path / "pp.png"
    assert main(["reconstruct", str(ckpt), "--dataset", "digits", "-n", "3", "--keep-groups", "0,1,6",
                 "-t", "0.8", "--output", str(grid)]) == 0
    from PIL import Image
    # 3 columns, inputs + 3 rows, 8x8 digits shown at 32x32, 2-pixel padding
    assert Image.open(grid).size == (3 * 34 + 2, 4 * 34 + 2)
    capsys.readouterr()


@pytest.mark.parametrize("argv, message", [
    (["encode", "{ckpt}", "-t", "0.5"], "add --sample"),
    (["encode", "{ckpt}", "--kl-threshold", "0.5"], "add --active-only"),
    (["encode", "{ckpt}", "-o", "{tmp}/lat.txt"], "should end in .npz"),
    (["decode", "{tmp}/missing.npz"], "does not exist"),
    (["reconstruct", "{ckpt}", "--keep-groups", "0,9"], "0..6"),
    (["reconstruct", "{ckpt}", "--keep-groups", "1,-1"], "comma-separated group counts"),
])
def test_bad_latent_commands_are_one_line_and_write_nothing(argv, message, model, tmp_path, capsys):
    ckpt = tmp_path / "m.pt"
    model.save(ckpt)
    argv = [a.format(ckpt=ckpt, tmp=tmp_path) for a in argv] + ["--dataset", "digits"] * (argv[0] != "decode")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("nvae: error:") and message in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_keep_groups_takes_a_per_group_schedule_for_the_groups_not_kept():
    """The prior groups of a partial-posterior row follow a schedule: temperature 0 in the groups not kept
    gives their prior means, so the row is deterministic whatever the generator."""
    from nvae.analysis.temperature_schedule import parse_temperature
    torch.manual_seed(0)
    model = NVAE(NVAEConfig.preset("digits", num_channels_enc=4, num_channels_dec=4)).eval()
    x = (torch.rand(2, 1, 8, 8) > 0.5).float()
    n = model.num_groups
    zero = parse_temperature(",".join(["0"] * n))
    a = partial_posterior_grid(model, x, [1], zero, torch.Generator().manual_seed(1))
    b = partial_posterior_grid(model, x, [1], zero, torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    ramp = partial_posterior_grid(model, x, [1], parse_temperature("linear:0:1"), torch.Generator().manual_seed(1))
    listed = partial_posterior_grid(model, x, [1], [i / (n - 1) for i in range(n)], torch.Generator().manual_seed(1))
    assert torch.equal(ramp, listed) and not torch.equal(ramp, a)


def test_non_finite_latents_in_memory_are_refused_before_decoding(means, model, tmp_path):
    """Latents built in memory (not read from a file) get the same check as a file's: no NaN images."""
    from nvae.analysis.latent_export import Latents, decode_to_file
    z = [a.copy() for a in means.z]
    z[0].flat[0] = float("inf")
    bad = Latents(z, means.channels, means.indices, means.meta)
    with pytest.raises(ValueError, match=r"group 0 holds 1 non-finite values \(NaN or inf\)"):
        decode(model, bad)
    with pytest.raises(ValueError, match="group 0 holds 1 non-finite values"):
        decode_to_file(model, bad, tmp_path / "out.npz", progress=False)
    assert list(tmp_path.iterdir()) == []
