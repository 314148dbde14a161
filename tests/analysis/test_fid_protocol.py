"""FID by the official protocol and by ours: which images Inception sees, BN re-adjustment, sharding.

A fixed random projection stands in for Inception (no weights needed, and it records what it
is fed); tests/analysis/test_fid.py checks the real network and the command line.
"""
import argparse
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, DataLoader, Dataset, TensorDataset

from gloo import WORLD, spawn
from nvae import NVAE, NVAEConfig
from nvae.distributed import DistributedContext
from nvae.model.distributions import DiscMixLogistic
from nvae.analysis.fid import FeatureMoments, FIDError
from nvae.analysis.fid_protocol import (FIDProtocol, OfficialReference, bn_cache_checkpoint, default_output_name,
                               default_protocol, is_official_checkpoint, official_reference_dataset,
                               official_selection, protocol_statistics, sample_moments, stats_dataset,
                               stats_splits)
from nvae.formats.keymap import key_map
from nvae.analysis.sampling import decoder_bn_layers, readjust_bn
from nvae.seeds import EVAL_BATCH, derived_seed


class FakeFeatures:
    """``tanh`` of a fixed random projection of the flattened image; keeps every batch it is fed."""

    dims = 12
    quantize = True          # as InceptionFeatures: the protocol sets it while it draws

    def __init__(self, pixels: int):
        g = torch.Generator().manual_seed(7)
        self.weight = torch.randn(pixels, self.dims, generator=g, dtype=torch.float64) * 3 / pixels ** 0.5
        self.fed, self.quantized = [], []

    def __call__(self, x):
        self.fed.append(x.detach().clone())
        self.quantized.append(self.quantize)
        return torch.tanh(x.flatten(1).double() @ self.weight)


def _model(decoder="mixture", seed=0):
    torch.manual_seed(seed)
    extra = dict(in_channels=3) if decoder == "mixture" else dict(decoder="bernoulli")
    cfg = NVAEConfig.preset("digits", num_channels_enc=4, num_channels_dec=4, **extra)
    model = NVAE(cfg).eval()
    for name, buf in model.named_buffers():
        if name.endswith("init_done"):
            buf.fill_(True)
    return model


def _features(model):
    c = model.config
    return FakeFeatures(c.in_channels * c.image_size ** 2)


def _bn_state(model):
    return {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in decoder_bn_layers(model).items()}


class Recorder:
    """Wraps ``model.sample_logits``: (n, temperature, training) of every call (a per-group list of one
    value recorded as that value: ``NVAE.sample`` passes its temperatures per group)."""

    def __init__(self, model):
        self.calls, self.inner = [], model.sample_logits
        self.model = model
        model.sample_logits = self

    def __call__(self, n, temperature=1.0, generator=None):
        t = temperature
        if isinstance(t, (list, tuple)) and len(set(t)) == 1:
            t = t[0]
        self.calls.append((n, t, self.model.training))
        return self.inner(n, temperature, generator)


# ----------------------------------------------------------------------------- moments
def test_feature_moments_equal_numpy_whatever_the_chunks():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(50, 6)) * 3 + 5
    m = FeatureMoments(6)
    for chunk in np.array_split(f, [3, 4, 30]):
        m.add(chunk)
    mu, sigma = m.statistics()
    np.testing.assert_allclose(mu, f.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f, rowvar=False), rtol=1e-9, atol=1e-12)
    for reduction in ("pooled", "average"):       # one process: nothing to reduce
        np.testing.assert_array_equal(m.reduce(reduction=reduction)[1], sigma)
        np.testing.assert_array_equal(m.reduce(DistributedContext(), reduction)[1], sigma)
    with pytest.raises(FIDError, match="at least 2"):
        FeatureMoments(6).statistics()
    with pytest.raises(FIDError, match=r"shape \(N, 6\)"):
        m.add(np.zeros((2, 5)))


# ----------------------------------------------------------------------------- the official mean
def test_mixture_mean_is_the_official_one_and_the_red_expectation():
    """Softmax-weighted logistic means, then the RGB coupling with the weighted coefficients, clamped."""
    m, b, h, w = 3, 2, 2, 2
    g = torch.Generator().manual_seed(0)
    params = torch.randn(b, 10 * m, h, w, generator=g)
    role = torch.arange(9 * m) % (3 * m) // m                            # 0 means, 1 log-scales, 2 coefficients
    params[:, m:][:, role == 0] *= 0.3                                   # components inside [-1, 1] ...
    params[:, m:][:, role == 1] = -4.0                                   # ... and narrow: samples seldom clamp
    dist = DiscMixLogistic(params, num_mix=m)
    got = dist.mean()
    pi = torch.softmax(params[:, :m], 1)                                # B, M, H, W
    rest = params[:, m:].reshape(b, 3, 3 * m, h, w)
    loc, coef = rest[:, :, :m], torch.tanh(rest[:, :, 2 * m:])
    mean = [(pi * loc[:, c]).sum(1) for c in range(3)]
    cf = [(pi * coef[:, c]).sum(1) for c in range(3)]
    r = mean[0].clamp(-1, 1)
    gr = (mean[1] + cf[0] * r).clamp(-1, 1)
    bl = (mean[2] + cf[1] * r + cf[2] * gr).clamp(-1, 1)
    torch.testing.assert_close(got, (torch.stack([r, gr, bl], 1) + 1) / 2)
    # red has no coupling: its mean is the mixture's expectation, which samples estimate
    draws = DiscMixLogistic(params.repeat(4000, 1, 1, 1), num_mix=m).sample(1.0, g)[:, 0].view(4000, b, h, w)
    torch.testing.assert_close(draws.mean(0), got[:, 0], atol=0.01, rtol=0)


# ----------------------------------------------------------------------------- the official draw at t < 1
def _mixture_params(b=2, m=3, h=2, w=2, log_scale=-3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = torch.randn(b, 10 * m, h, w, generator=g)
    role = torch.arange(9 * m) % (3 * m) // m                            # 0 means, 1 log-scales, 2 coefficients
    params[:, m:][:, role == 0] *= 0.3
    params[:, m:][:, role == 1] = log_scale
    return params


@pytest.mark.parametrize("t", [0.5, 0.8])
def test_official_temperature_draw_is_the_official_formula_on_the_same_uniforms(t):
    """The official ``DiscMixLogistic.sample(t)``: argmax(logits / t + gumbel), then
    ``means + exp(log_scales) / t * (log u - log(1 - u))``, coupled and clamped; ours multiplies by t."""
    m = 3
    params = _mixture_params(m=m)
    dist = DiscMixLogistic(params, num_mix=m)
    got = dist.sample(t, torch.Generator().manual_seed(5), official_temperature=True)
    ours = dist.sample(t, torch.Generator().manual_seed(5))

    g = torch.Generator().manual_seed(5)                               # the same uniforms, drawn in the same order
    b, _, h, w = params.shape
    u = 1e-5 + (1 - 2e-5) * torch.rand(b, m, h, w, generator=g)
    sel = F.one_hot(torch.argmax(params[:, :m] / t - torch.log(-torch.log(u)), 1), m).permute(0, 3, 1, 2)
    rest = params[:, m:].reshape(b, 3, 3 * m, h, w)
    pick = [(rest[:, :, k * m:(k + 1) * m] * sel.unsqueeze(1)).sum(2) for k in range(3)]
    loc, log_s, coef = pick[0], pick[1].clamp(min=-7), torch.tanh(rest[:, :, 2 * m:]) * sel.unsqueeze(1)
    coef = coef.sum(2)
    u = 1e-5 + (1 - 2e-5) * torch.rand(b, 3, h, w, generator=g)
    logistic = torch.log(u) - torch.log(1 - u)
    for scale, drawn in ((torch.exp(log_s) / t, got), (torch.exp(log_s) * t, ours)):
        x = loc + scale * logistic
        r = x[:, 0].clamp(-1, 1)
        gr = (x[:, 1] + coef[:, 0] * r).clamp(-1, 1)
        bl = (x[:, 2] + coef[:, 1] * r + coef[:, 2] * gr).clamp(-1, 1)
        torch.testing.assert_close(drawn, (torch.stack([r, gr, bl], 1) + 1) / 2, rtol=0, atol=1e-6)
    assert not torch.allclose(got, ours)
    # at t = 1 both conventions are one draw
    one = [dist.sample(1.0, torch.Generator().manual_seed(5), official_temperature=o) for o in (True, False)]
    torch.testing.assert_close(one[0], one[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="t must be > 0"):
        dist.sample(0.0, official_temperature=True)


def test_official_temperature_draw_spreads_by_scale_over_t():
    """One grey logistic component of scale s: a draw at t has standard deviation s / t * pi / sqrt(3) on
    [-1, 1] (half that on [0, 1]) the official way, s * t * pi / sqrt(3) ours."""
    n, t, log_s = 200_000, 0.5, -3.0
    params = torch.zeros(1, 3, n, 1)                                     # grey, M = 1: logit, mean 0, log-scale
    params[:, 2] = log_s
    dist = DiscMixLogistic(params, num_mix=1)
    unit = math.exp(log_s) * math.pi / math.sqrt(3) / 2                  # on [0, 1]
    official = dist.sample(t, torch.Generator().manual_seed(0), official_temperature=True).std().item()
    ours = dist.sample(t, torch.Generator().manual_seed(0)).std().item()
    assert official == pytest.approx(unit / t, rel=0.02)
    assert ours == pytest.approx(unit * t, rel=0.02)


# ----------------------------------------------------------------------------- which images
def test_official_protocol_readjusts_bn_at_t_then_feeds_means_drawn_at_t1():
    model = _model("mixture")
    reference = copy.deepcopy(model)
    before = _bn_state(model)
    calls = Recorder(model).calls
    features = _features(model)
    protocol = FIDProtocol("official", temperature=0.6, readjust_bn=True, readjust_steps=2, num_samples=3,
                           batch_size=2, seed=4)
    (mu, sigma), info = protocol_statistics(model, protocol, features, progress=False)

    # 2 re-adjustment batches of 2 at t = 0.6 in training mode, then the images at t = 1 in eval mode
    assert calls == [(2, 0.6, True)] * 2 + [(2, 1.0, False), (1, 1.0, False)]
    readjust_bn(reference, 0.6, 2, 2, torch.Generator().manual_seed(4))
    after = _bn_state(model)
    for name, (m, v) in _bn_state(reference).items():
        torch.testing.assert_close(after[name][0], m, rtol=0, atol=0)
        torch.testing.assert_close(after[name][1], v, rtol=0, atol=0)
    assert any(not torch.equal(after[n][0], before[n][0]) for n in before)

    # what Inception saw: the mean of p(x|z) for latents drawn at t = 1 with batch b's generator
    for b, fed in enumerate(features.fed):
        g = torch.Generator().manual_seed(derived_seed(EVAL_BATCH, 4, b))
        dist = reference.output_distribution(reference.sample_logits(len(fed), 1.0, g))
        torch.testing.assert_close(fed, dist.mean().float(), rtol=0, atol=0)
        assert not torch.allclose(fed, dist.sample(1.0, g).float())
    assert [len(x) for x in features.fed] == [2, 1]
    feats = torch.cat([features(x) for x in features.fed[:2]]).numpy()
    np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-10)
    np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), rtol=1e-8, atol=1e-12)
    assert info["protocol"] == "official" and info["sampling_temperature"] == 1.0
    assert info["bn_temperature"] == 0.6 and info["readjust_batch"] == 2 and info["readjust_steps"] == 2
    assert info["images"].startswith("means") and info["num_samples"] == 3 and info["world_size"] == 1
    assert info["bn_from_cache"] is False
    # the official code gives Inception its float means: no rounding to 8 bits (the setting is restored after)
    assert features.quantized[:2] == [False, False] and features.quantize is True and not info["rounded_to_8_bits"]


def test_our_protocol_feeds_samples_drawn_at_t():
    model = _model("mixture")
    calls = Recorder(model).calls
    features = _features(model)
    protocol = FIDProtocol("ours", temperature=0.7, num_samples=3, batch_size=2)
    _, info = protocol_statistics(model, protocol, features, progress=False)
    assert calls == [(2, 0.7, False), (1, 0.7, False)]
    for b, fed in enumerate(features.fed):
        g = torch.Generator().manual_seed(derived_seed(EVAL_BATCH, 0, b))
        torch.testing.assert_close(fed, model.sample(len(fed), 0.7, g), rtol=0, atol=0)
    assert info["images"].startswith("samples") and info["sampling_temperature"] == 0.7
    assert info["readjust_bn"] is False and info["bn_temperature"] is None and info["bn_from_cache"] is None
    assert features.quantized == [True, True] and info["rounded_to_8_bits"]
    assert FIDProtocol("ours", readjust_bn=True).bn_batch == 36 and FIDProtocol("official").bn_batch == 2


@pytest.mark.parametrize("name", ["official", "ours"])
def test_binary_models_feed_bernoulli_means_under_both(name):
    model = _model("bernoulli")
    features = _features(model)
    sample_moments(model, FIDProtocol(name, temperature=0.8, num_samples=2, batch_size=2), features, progress=False)
    g = torch.Generator().manual_seed(derived_seed(EVAL_BATCH, 0, 0))
    logits = model.sample_logits(2, 1.0 if name == "official" else 0.8, g)
    torch.testing.assert_close(features.fed[0], torch.sigmoid(logits), rtol=0, atol=0)


def test_batches_are_shared_out_once_and_bad_settings_are_clear_errors():
    p = FIDProtocol(num_samples=1001, batch_size=100)
    for world in (1, 2, 3, 8):
        got = sorted(b for r in range(world) for b in p.shard(r, world))
        assert got == list(range(11))
    assert sum(p.batch_len(b) for b in range(11)) == 1001
    for kw, msg in [(dict(name="paper"), "protocol must be one of"), (dict(num_samples=1), "num_samples"),
                    (dict(temperature=-1.0), "non-negative"), (dict(reduction="max"), "reduction"),
                    (dict(readjust_batch=0), "readjust_batch")]:
        with pytest.raises(FIDError, match=msg):
            FIDProtocol(**kw)
    model = _model("bernoulli")
    tiny = FIDProtocol("ours", num_samples=3, batch_size=2, reduction="average")
    with pytest.raises(FIDError, match="needs 2 per process"):
        protocol_statistics(model, tiny, _features(model), dist_ctx=DistributedContext(0, 0, 2), progress=False)
    assert default_output_name(FIDProtocol("official", 0.6, True)) == "fid_official_t0.6_bn_n50000.json"


# ----------------------------------------------------------------------------- two processes
def _sharded_worker(rank: int) -> dict:
    torch.set_num_threads(1)
    model = _model("mixture")
    ctx = DistributedContext(rank=rank, local_rank=rank, world_size=WORLD)
    protocol = FIDProtocol("official", 0.5, readjust_bn=True, readjust_steps=2, num_samples=9, batch_size=2,
                           reduction="pooled")
    (mu, sigma), info = protocol_statistics(model, protocol, _features(model), dist_ctx=ctx, progress=False)
    bn = _bn_state(model)
    averaged = sample_moments(model, protocol, _features(model), ctx, progress=False).reduce(ctx, "average")
    # each protocol's default reduction, on the same images (BN as re-adjusted above)
    out = {"mu": torch.from_numpy(mu), "sigma": torch.from_numpy(sigma), "world": info["world_size"],
           "avg_mu": torch.from_numpy(averaged[0]), "avg_sigma": torch.from_numpy(averaged[1]),
           "bn": torch.cat([torch.cat([m, v]) for m, v in bn.values()])}
    for name in ("official", "ours"):
        default = FIDProtocol(name, num_samples=9, batch_size=2)
        (d_mu, d_sigma), d_info = protocol_statistics(model, default, _features(model), dist_ctx=ctx, progress=False)
        for how in ("pooled", "average"):
            r_mu, r_sigma = sample_moments(model, default, _features(model), ctx, progress=False).reduce(ctx, how)
            out[f"{name}_equals_{how}"] = torch.tensor(bool(np.array_equal(d_mu, r_mu) and
                                                            np.array_equal(d_sigma, r_sigma)))
        out[f"{name}_reduction_is_average"] = torch.tensor(d_info["reduction"] == "average")
    return out


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    return spawn(_sharded_worker, tmp_path_factory.mktemp("fid_gloo"))


def test_two_processes_pooled_equal_one_process_on_the_same_images(two_processes):
    model = _model("mixture")
    protocol = FIDProtocol("official", 0.5, readjust_bn=True, readjust_steps=2, num_samples=9, batch_size=2,
                           reduction="pooled")
    (mu, sigma), info = protocol_statistics(model, protocol, _features(model), progress=False)
    bn = torch.cat([torch.cat([m, v]) for m, v in _bn_state(model).values()])
    for out in two_processes:
        assert out["world"] == 2
        # rank 0's statistics everywhere; float32 sums in another thread count differ in the last bits
        torch.testing.assert_close(out["bn"], bn, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out["mu"].numpy(), mu, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(out["sigma"].numpy(), sigma, rtol=1e-4, atol=1e-7)


def test_two_processes_average_is_the_official_mean_of_per_process_statistics(two_processes):
    model = _model("mixture")
    protocol = FIDProtocol("official", 0.5, readjust_bn=True, readjust_steps=2, num_samples=9, batch_size=2)
    protocol_statistics(model, FIDProtocol("official", 0.5, readjust_bn=True, readjust_steps=2, num_samples=2),
                        _features(model), progress=False)   # the same BN re-adjustment as the workers
    shards = [sample_moments(model, protocol, _features(model), DistributedContext(r, r, WORLD), progress=False)
              for r in range(WORLD)]
    assert [s.count for s in shards] == [5, 4]                # batches 0, 2, 4 (2 + 2 + 1) and 1, 3
    stats = [s.statistics() for s in shards]
    pooled = FeatureMoments(shards[0].dims)
    for s in shards:
        pooled.count += s.count
        pooled.total += s.total
        pooled.outer += s.outer
    for out in two_processes:
        np.testing.assert_allclose(out["avg_mu"].numpy(), (stats[0][0] + stats[1][0]) / 2, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(out["avg_sigma"].numpy(), (stats[0][1] + stats[1][1]) / 2, rtol=1e-4,
                                   atol=1e-7)
        assert not np.allclose(out["avg_sigma"].numpy(), pooled.statistics()[1], rtol=1e-6)   # not pooled


def test_official_protocol_averages_over_processes_by_default_and_ours_pools(two_processes):
    """The official ``test_vae_fid`` averages each GPU's mu and sigma (``utils.average_tensor``): the
    official protocol's default; ours keeps pooling. An explicit reduction wins over either default."""
    for out in two_processes:
        assert out["official_equals_average"] and not out["official_equals_pooled"]
        assert out["ours_equals_pooled"] and not out["ours_equals_average"]
        assert out["official_reduction_is_average"] and not out["ours_reduction_is_average"]
    assert FIDProtocol("official").reduction == "average" and FIDProtocol("ours").reduction == "pooled"
    assert FIDProtocol("official", reduction="pooled").reduction == "pooled"
    assert FIDProtocol("ours", reduction="average").reduction == "average"


# ----------------------------------------------------------------------------- checkpoints and caches
def test_official_checkpoints_default_to_the_official_protocol(tmp_path):
    model = _model("mixture")
    ours = tmp_path / "ours" / "checkpoint.pt"
    ours.parent.mkdir()
    model.save(ours)
    names = key_map(model, "official")
    state = model.state_dict()
    official = tmp_path / "official.pt"
    torch.save({"state_dict": {t: state[o] for o, t in names.items()}, "epoch": 1,
                "args": argparse.Namespace(dataset="cifar10")}, official)
    assert is_official_checkpoint(official) and default_protocol(official) == "official"
    assert not is_official_checkpoint(ours.parent) and default_protocol(ours.parent) == "ours"
    assert not is_official_checkpoint(tmp_path / "missing.pt")
    assert bn_cache_checkpoint(ours, 36) == ours
    assert bn_cache_checkpoint(ours, 2).name == "checkpoint.b2.pt"


def test_readjusted_statistics_are_cached_per_batch_size(tmp_path):
    model = _model("mixture")
    ckpt = tmp_path / "checkpoint.pt"
    model.save(ckpt)
    protocol = FIDProtocol("official", 0.6, readjust_bn=True, readjust_steps=2, num_samples=2, batch_size=2)
    first, info = protocol_statistics(copy.deepcopy(model), protocol, _features(model), checkpoint=ckpt,
                                      progress=False)
    assert info["bn_from_cache"] is False
    assert (tmp_path / "checkpoint.b2.bn_t0.6_s2.pt").is_file()
    fresh = copy.deepcopy(model)
    calls = Recorder(fresh).calls
    again, info = protocol_statistics(fresh, protocol, _features(model), checkpoint=ckpt, progress=False)
    assert info["bn_from_cache"] is True and all(not training for _, _, training in calls)
    np.testing.assert_array_equal(first[0], again[0])


# ----------------------------------------------------------------------------- reference statistics
def test_reference_splits_follow_the_official_script():
    assert stats_splits("celebahq256") == ("train", "test") and stats_splits("omniglot") == ("train", "test")
    assert stats_splits("cifar10") == ("train",) and stats_splits("ffhq256") == ("train",)
    assert stats_splits("cifar10", "train,test") == ("train", "test") and stats_splits("x", "test") == ("test",)
    for bad in ("valid", "train,train", ","):
        with pytest.raises(FIDError, match="--split must be"):
            stats_splits("cifar10", bad)
    merged = stats_dataset("digits", ("train", "test"))
    train, test = stats_dataset("digits", ("train",)), stats_dataset("digits", ("test",))
    assert isinstance(merged, ConcatDataset) and len(merged) == len(train) + len(test)
    torch.testing.assert_close(merged[len(train)][0], test[0][0])      # train first, then test
    torch.testing.assert_close(merged[0][0], train[0][0])
    assert math.isfinite(float(merged[len(merged) - 1][0].sum()))


# ----------------------------------------------------------------------------- official reference images
def _loader_order(lengths, seed, batch):
    """What seeded torch DataLoaders yield (one generator; shuffled; the first one with drop_last)."""
    g = torch.Generator().manual_seed(seed)
    order = []
    for part, n in enumerate(lengths):
        for (idx,) in DataLoader(TensorDataset(torch.arange(n)), batch_size=batch, shuffle=True,
                                 drop_last=part == 0, generator=g):
            order += [(part, int(i)) for i in idx]
    return order


def test_official_selection_is_a_seeded_shuffled_drop_last_loader_then_the_validation_loader():
    expected = _loader_order([10, 5], seed=3, batch=4)
    assert len(expected) == 8 + 5
    assert official_selection([10, 5], 3, 4, None) == expected
    assert official_selection([10, 5], 3, 4, 6) == expected[:6]                 # the first max_images
    assert official_selection([10], 3, 4, None) == _loader_order([10], 3, 4)
    assert official_selection([10, 5], 4, 4, None) != expected                  # the seed matters
    assert sorted(i for p, i in expected if p == 0) != list(range(10))          # 8 of the 10: two dropped
    assert [i for p, i in expected if p == 1] != list(range(5))                 # the validation loader shuffles
    # the official script's numbers: CIFAR-10 loses its last 50000 - 781 * 64 = 16; MNIST gives 50,000 of
    # 59,968; Omniglot (24,345 + 8,070) and CelebA-HQ (27,000 + 3,000) give all but the dropped batch
    assert len(official_selection([50000])) == 49984
    assert len(official_selection([60000])) == 50000
    assert len(official_selection([24345, 8070])) == 24320 + 8070
    assert len(official_selection([27000, 3000])) == 26944 + 3000


class _Flipping(Dataset):
    """Images with a random horizontal flip drawn from torch's global generator (as torchvision's
    ``RandomHorizontalFlip`` in a training transform), and a label, as torchvision data sets give."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        x = self.images[i]
        return (x.flip(-1) if torch.rand(1).item() < 0.5 else x), 7


def test_official_reference_images_come_with_their_training_flips_reproducibly():
    g = torch.Generator().manual_seed(0)
    train, val = torch.rand(40, 3, 4, 4, generator=g), torch.rand(6, 3, 4, 4, generator=g)
    data = OfficialReference([_Flipping(train), TensorDataset(val)], seed=5, batch_size=8, max_images=None)
    order = _loader_order([40, 6], seed=5, batch=8)
    state = torch.get_rng_state()
    items = [data[k][0] for k in range(len(data))]
    assert torch.equal(torch.get_rng_state(), state)                     # torch's generator is left as it was
    assert len(items) == len(order) == 40 + 6
    flipped = 0
    for x, (part, i) in zip(items, order):
        if part == 0:
            assert torch.equal(x, train[i]) or torch.equal(x, train[i].flip(-1))
            flipped += torch.equal(x, train[i].flip(-1))
        else:
            assert torch.equal(x, val[i])                                # validation: no training transform
    assert 10 <= flipped <= 30                                           # about half of 40
    again = OfficialReference([_Flipping(train), TensorDataset(val)], seed=5, batch_size=8, max_images=None)
    for k in reversed(range(len(again))):                                # any access order: the same images
        assert torch.equal(again[k][0], items[k])
    other = OfficialReference([_Flipping(train), TensorDataset(val)], seed=6, batch_size=8, max_images=None)
    assert any(not torch.equal(other[k][0], items[k]) for k in range(len(other)))


def _write_omniglot(folder, train_ids, test_ids):
    """A chardata.mat of 28x28 characters: the top row holds the id in 5 black-or-white bits, a 20x20 block
    is grey (0.5). MATLAB keeps each image as a column, column-major."""
    from scipy.io import savemat

    def images(ids):
        x = np.zeros((len(ids), 28, 28), dtype=np.float64)
        for n, i in enumerate(ids):
            x[n, 0, :5] = [(i >> b) & 1 for b in range(5)]
            x[n, 4:24, 4:24] = 0.5
        return x.transpose(0, 2, 1).reshape(len(ids), 784).T

    savemat(str(folder / "chardata.mat"), {"data": images(train_ids), "testdata": images(test_ids)})


def test_official_reference_of_omniglot_is_binarised_with_validation_chained(tmp_path):
    pytest.importorskip("scipy")
    train_ids, test_ids = list(range(10)), list(range(16, 22))
    _write_omniglot(tmp_path, train_ids, test_ids)
    data = official_reference_dataset("omniglot", str(tmp_path), seed=2, batch_size=4)
    assert isinstance(data, OfficialReference) and data.binarise
    order = _loader_order([10, 6], seed=2, batch=4)
    items = torch.stack([data[k][0] for k in range(len(data))])
    assert items.shape == (8 + 6, 1, 32, 32)
    assert set(items.unique().tolist()) == {0.0, 1.0}                    # binarised, as the official Binarize
    ids = [int(sum(int(x[0, 2, 2 + b]) << b for b in range(5))) for x in items]   # black and white bits survive
    assert ids == [(train_ids if part == 0 else test_ids)[i] for part, i in order]
    grey = items[:, 0, 6:26, 6:26].mean().item()                         # 127/255 per pixel, 14 x 400 pixels
    assert grey == pytest.approx(127 / 255, abs=0.02)
    # ours: every image of both splits in order, grey levels kept
    ours = stats_dataset("omniglot", stats_splits("omniglot"), str(tmp_path))
    assert len(ours) == 16 and ours[0][0][0, 10, 10].item() == pytest.approx(127 / 255)


def test_official_reference_of_a_colour_set_flips_training_images_only(tmp_path):
    from PIL import Image
    g = torch.Generator().manual_seed(1)
    for split, n in (("train", 24), ("val", 4)):
        (tmp_path / split).mkdir()
        for i in range(n):
            pixels = (torch.rand(8, 8, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / split / f"{i:03d}.png")
    plain = [stats_dataset("celebahq256", (s,), str(tmp_path), image_size=8) for s in ("train", "test")]
    data = official_reference_dataset("celebahq256", str(tmp_path), image_size=8, seed=0, batch_size=8)
    order = _loader_order([24, 4], seed=0, batch=8)
    assert len(data) == 24 + 4
    flipped = 0
    for k, (part, i) in enumerate(order):
        x, original = data[k][0], plain[part][i][0]
        if part == 0:
            assert torch.equal(x, original) or torch.equal(x, original.flip(-1))
            flipped += torch.equal(x, original.flip(-1))
        else:
            assert torch.equal(x, original)
    assert 0 < flipped < 24
    assert not data.binarise
    with pytest.raises(FIDError, match=r"holds 0 image\(s\)"):              # 1,500 training digits < one batch
        official_reference_dataset("digits", batch_size=4096)
