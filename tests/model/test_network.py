"""The NVAE network: parameter counts of the paper's models, forward pass, sampling, likelihood, training
step, every cell table, save/load."""
import math

import pytest
import torch
import torch.distributions as D

from nvae import NVAE, NVAEConfig
from nvae.config import ARCH_INSTANCES
from nvae.model.distributions import DiscMixLogistic

# Parameters of the models built by the official code (counted with NVlabs/NVAE); mnist_small is ours.
PARAMETER_COUNTS = {
    "mnist": 33_363_134,
    "cifar10": 130_852_480,
    "celeba64": 153_281_364,
    "imagenet32": 268_509_444,
    "celebahq256": 330_798_664,
    "ffhq256": 330_798_664,
    "mnist_small": 3_936_590,
}


def tiny_config(**kw):
    """8x8 images, two scales of two groups (L = 4), 4 channels: milliseconds per pass."""
    base = dict(image_size=8, in_channels=1, decoder="bernoulli", num_channels_enc=4, num_channels_dec=4,
                num_latent_scales=2, num_groups_per_scale=2, ada_groups=False, num_preprocess_blocks=1,
                num_preprocess_cells=2, num_postprocess_blocks=1, num_postprocess_cells=2,
                num_cell_per_cond_enc=1, num_cell_per_cond_dec=1, num_latent_per_group=20, num_nf=0)
    base.update(kw)
    return NVAEConfig(**base)


RGB = dict(in_channels=3, decoder="mixture", num_mixture_dec=3, num_nf=1)


def binary_batch(b=3, size=8):
    return (torch.rand(b, 1, size, size) < 0.4).float()


def rgb_batch(b=3, size=8, bits=8):
    top = 2 ** bits - 1
    return torch.randint(0, top + 1, (b, 3, size, size)).float() / top


def assert_outputs_equal(a, b):
    """Every field of two NVAEOutputs is identical (the latents field holds one tensor per group)."""
    for ta, tb in zip(a, b):
        pairs = zip(ta, tb) if isinstance(ta, tuple) else [(ta, tb)]
        assert all(torch.equal(u, v) for u, v in pairs)


def batch_for(cfg, b=3):
    return binary_batch(b, cfg.image_size) if cfg.in_channels == 1 else rgb_batch(b, cfg.image_size, cfg.num_x_bits)


# ---------------------------------------------------------------- parameter counts
@pytest.mark.parametrize("name", sorted(PARAMETER_COUNTS))
def test_parameter_count_matches_official(name):
    # Built on the meta device: shapes only, no memory and no initialisation cost.
    with torch.device("meta"):
        model = NVAE(NVAEConfig.preset(name))
    assert sum(p.numel() for p in model.parameters()) == PARAMETER_COUNTS[name]


# ---------------------------------------------------------------- forward
@pytest.mark.parametrize("kw", [{}, RGB], ids=["bernoulli", "mixture-flows"])
def test_forward_output_shapes(kw):
    cfg = tiny_config(**kw)
    model = NVAE(cfg)
    b = 3
    out = model(batch_for(cfg, b))
    L = cfg.num_groups
    assert L == 4
    assert out.logits.shape == (b, cfg.num_output_channels, 8, 8)
    assert out.recon.shape == (b,)
    assert out.kl.shape == (b, L)
    assert out.log_q.shape == (b,) and out.log_p.shape == (b,)
    assert out.kl_per_channel.shape == (b, L, 20)
    assert torch.allclose(out.kl_per_channel.sum(2), out.kl)
    assert torch.allclose(out.elbo, -out.recon - out.kl.sum(1))
    assert model.latent_shapes == [(20, 2, 2)] * 2 + [(20, 4, 4)] * 2
    for t in out[:-1]:
        assert torch.isfinite(t).all()
    assert [tuple(z.shape) for z in out.latents] == [(b,) + shape for shape in model.latent_shapes]


def test_recon_is_the_cropped_likelihood_of_the_logits():
    cfg = tiny_config(crop_output=1)
    model = NVAE(cfg).eval()
    x = binary_batch()
    with torch.no_grad():
        out = model(x)
    expected = -D.Bernoulli(logits=out.logits).log_prob(x)[..., 1:-1, 1:-1].sum(dim=(1, 2, 3))
    assert torch.allclose(out.recon, expected, rtol=1e-5)
    assert cfg.num_data_dims == 36

    cfg = tiny_config(**RGB)
    model = NVAE(cfg).eval()
    x = rgb_batch()
    with torch.no_grad():
        out = model(x)
    expected = -DiscMixLogistic(out.logits, 3, 8).log_prob(x).sum(dim=(1, 2))
    assert torch.allclose(out.recon, expected, rtol=1e-5)


@pytest.mark.parametrize("kw", [{}, RGB], ids=["bernoulli", "mixture-flows"])
def test_temperature_zero_is_deterministic(kw):
    cfg = tiny_config(**kw)
    model = NVAE(cfg).eval()
    x = batch_for(cfg)
    with torch.no_grad():
        a, b = model(x, temperature=0.0), model(x, temperature=0.0)
        c = model(x)
    assert_outputs_equal(a, b)
    assert not torch.allclose(a.logits, c.logits)


def test_generator_makes_the_pass_reproducible():
    cfg = tiny_config(**RGB)
    model = NVAE(cfg).eval()
    x = batch_for(cfg)
    with torch.no_grad():
        a = model(x, generator=torch.Generator().manual_seed(7))
        torch.manual_seed(999)           # the global RNG plays no part
        b = model(x, generator=torch.Generator().manual_seed(7))
        c = model(x, generator=torch.Generator().manual_seed(8))
    assert_outputs_equal(a, b)
    assert not torch.allclose(a.log_q, c.log_q)


def test_kl_without_flows_is_analytic():
    """Per image the analytic KL is not log q - log p; in expectation over z ~ q it is."""
    cfg = tiny_config()
    model = NVAE(cfg).eval()
    n = 4000
    x = binary_batch(1).expand(n, -1, -1, -1)
    with torch.no_grad():
        out = model(x, generator=torch.Generator().manual_seed(0))
    mc = out.log_q - out.log_p
    kl = out.kl.sum(1)
    assert not torch.allclose(mc, kl, rtol=1e-3)
    assert (out.kl >= 0).all()
    # E[sum_l KL_l(z_<l)] = E[log q(z) - log p(z)]: compare the means within 5 standard errors
    diff = mc - kl
    stderr = diff.std() / math.sqrt(n)
    assert abs(diff.mean()) < 5 * stderr, (diff.mean(), stderr)
    assert stderr < 0.02 * kl.mean()     # the check has power: KL is large compared to the noise


def _record_latents(model):
    """Forward hooks that record, per group in decoder order: the raw head outputs, the sample
    before the flows and the sample the decoder takes in."""
    rec = {"post": [], "prior": [], "z0": [], "z": []}
    handles = []
    for group in model.groups:
        handles.append(group.posterior_head.register_forward_hook(lambda m, i, o: rec["post"].append(o)))
        if group.prior_head is not None:
            handles.append(group.prior_head.register_forward_hook(lambda m, i, o: rec["prior"].append(o)))
        if group.flows:
            handles.append(group.flows[0].register_forward_pre_hook(lambda m, i: rec["z0"].append(i[0])))
        handles.append(group.dec_combiner.register_forward_hook(lambda m, i, o: rec["z"].append(i[1])))
    return rec, handles


def _clamped(mu, log_sigma):
    return D.Normal(5 * torch.tanh(mu / 5), torch.exp(5 * torch.tanh(log_sigma / 5)) + 0.01)


@pytest.mark.parametrize("kw", [{}, dict(res_dist=False), RGB, dict(RGB, num_nf=2, res_dist=False)],
                         ids=["residual", "plain", "residual-flows", "plain-2flows"])
@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_scores_match_the_distributions_of_each_group(kw, temperature):
    """Rebuild q(z_l|.) and p(z_l|.) of every group from the heads' raw outputs (torch.distributions,
    the official soft clamps, the residual parameterisation) and score the recorded samples."""
    cfg = tiny_config(**kw)
    model = NVAE(cfg).eval()
    rec, handles = _record_latents(model)
    with torch.no_grad():
        out = model(batch_for(cfg), temperature=temperature, generator=torch.Generator().manual_seed(0))
    for h in handles:
        h.remove()
    L = cfg.num_groups
    assert len(rec["post"]) == L and len(rec["prior"]) == L - 1 and len(rec["z"]) == L
    log_q = log_p = 0
    for g in range(L):
        mu_q, ls_q = rec["post"][g].chunk(2, dim=1)
        if g == 0:
            mu_p = ls_p = torch.zeros_like(mu_q)        # p(z_1): mu 0, log sigma 0 (sigma 1.01)
        else:
            mu_p, ls_p = rec["prior"][g - 1].chunk(2, dim=1)
            if cfg.res_dist:
                mu_q, ls_q = mu_p + mu_q, ls_p + ls_q
        q, p = _clamped(mu_q, ls_q), _clamped(mu_p, ls_p)
        z = rec["z"][g]
        z0 = rec["z0"][g] if cfg.num_nf else z
        if temperature == 0:
            assert torch.allclose(z0, q.mean)
        lq = q.log_prob(z0).sum(dim=(1, 2, 3))      # volume-preserving flows: log q(z) = log q0(z0)
        lp = p.log_prob(z).sum(dim=(1, 2, 3))
        kl = lq - lp if cfg.num_nf else D.kl_divergence(q, p).sum(dim=(1, 2, 3))
        assert torch.allclose(out.kl[:, g], kl, rtol=1e-4, atol=1e-3), g
        log_q, log_p = log_q + lq, log_p + lp
    assert torch.allclose(out.log_q, log_q, rtol=1e-5, atol=1e-3)
    assert torch.allclose(out.log_p, log_p, rtol=1e-5, atol=1e-3)
    if cfg.num_nf:
        assert not torch.allclose(rec["z0"][1], rec["z"][1])     # the flows did move the samples


def test_kl_with_flows_is_log_q_minus_log_p():
    cfg = tiny_config(**RGB)
    model = NVAE(cfg).eval()
    with torch.no_grad():
        out = model(batch_for(cfg))
    assert torch.allclose(out.kl.sum(1), out.log_q - out.log_p, rtol=1e-5, atol=1e-3)


# ---------------------------------------------------------------- sampling
@pytest.mark.parametrize("kw", [{}, RGB], ids=["bernoulli", "mixture-flows"])
def test_sample_logits_shape_and_temperature(kw):
    cfg = tiny_config(**kw)
    model = NVAE(cfg).eval()
    logits = model.sample_logits(5, 0.7, generator=torch.Generator().manual_seed(0))
    assert logits.shape == (5, cfg.num_output_channels, 8, 8)
    # temperature 0: every z at its prior mean, so every sample is the same
    t0 = model.sample_logits(3, 0.0)
    assert torch.equal(t0, model.sample_logits(3, 0.0))
    assert torch.allclose(t0[0], t0[1]) and torch.allclose(t0[0], t0[2])
    # one temperature per group, in decoder order
    assert torch.equal(model.sample_logits(3, [0.0] * cfg.num_groups), t0)
    for hot in range(cfg.num_groups):     # noise in any single group changes the samples
        temps = [0.0] * cfg.num_groups
        temps[hot] = 1.0
        per_group = model.sample_logits(3, temps, generator=torch.Generator().manual_seed(4))
        assert not torch.allclose(per_group, t0) and not torch.allclose(per_group[0], per_group[1])
    for bad in ([1.0] * (cfg.num_groups - 1), [1.0] * (cfg.num_groups + 1)):
        with pytest.raises(ValueError, match="per-group temperatures"):
            model.sample_logits(2, bad)


@pytest.mark.parametrize("decoder", ["mixture", "normal"])
def test_temperature_0_draws_nothing_not_even_pixel_noise(decoder):
    cfg = tiny_config(**{**RGB, "decoder": decoder})
    model = NVAE(cfg).eval()
    seed = lambda s: torch.Generator().manual_seed(s)   # noqa: E731
    cold = model.sample(3, 0.0, seed(1))
    assert torch.equal(cold, model.sample(3, 0.0, seed(2)))               # two seeds, one image
    assert torch.equal(cold, model.sample(3, [0.0] * cfg.num_groups, seed(3)))
    assert torch.equal(cold, model.output_distribution(model.sample_logits(3, 0.0)).mean())
    # any temperature above 0 keeps the pixel noise of p(x|z), and forcing draws at 0 brings it back
    assert not torch.equal(model.sample(3, 1e-3, seed(1)), model.sample(3, 1e-3, seed(2)))
    assert not torch.equal(model.sample(3, 0.0, seed(1), mean=False), model.sample(3, 0.0, seed(2), mean=False))


@pytest.mark.parametrize("kw", [{}, RGB], ids=["bernoulli", "mixture-flows"])
def test_sample_images_in_unit_interval(kw):
    cfg = tiny_config(**kw)
    model = NVAE(cfg).eval()
    g = torch.Generator().manual_seed(1)
    for t in (1.0, 0.6, 0.0):
        images = model.sample(4, t, generator=g)
        assert images.shape == (4, cfg.in_channels, 8, 8)
        assert images.min() >= 0 and images.max() <= 1
    means = model.sample(4, 1.0, generator=g, mean=True)
    assert means.min() >= 0 and means.max() <= 1


# ---------------------------------------------------------------- likelihood
@pytest.mark.parametrize("kw", [{}, RGB], ids=["bernoulli", "mixture-flows"])
def test_log_likelihood_with_one_sample_is_the_one_sample_elbo(kw):
    cfg = tiny_config(**kw)
    model = NVAE(cfg).train()
    x = batch_for(cfg)
    ll = model.log_likelihood(x, num_samples=1, generator=torch.Generator().manual_seed(3))
    assert model.training           # the eval-mode switch is undone
    model.eval()
    with torch.no_grad():
        out = model(x, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(ll, -out.recon - out.log_q + out.log_p, rtol=1e-5)
    if cfg.num_nf:   # with flows the KL is the one-sample estimate, so this is the ELBO itself
        assert torch.allclose(ll, out.elbo, rtol=1e-5)


def test_log_likelihood_is_logmeanexp_of_importance_weights():
    cfg = tiny_config()
    model = NVAE(cfg)
    x = batch_for(cfg)
    log_w = model.log_importance_weights(x, 6, generator=torch.Generator().manual_seed(2))
    ll = model.log_likelihood(x, 6, generator=torch.Generator().manual_seed(2))
    assert log_w.shape == (6, 3)
    assert torch.allclose(ll, torch.logsumexp(log_w, 0) - math.log(6))
    assert (ll >= log_w.mean(0) - 1e-4).all()     # Jensen: the IW bound is above the average ELBO term


def test_importance_weight_chunks():
    """One chunk is one forward of the repeated batch; K chunks are K forwards, the generator
    advancing between them; the (K, B) layout is sample-major in both cases."""
    cfg = tiny_config(**RGB)
    model = NVAE(cfg).train()
    x = batch_for(cfg)
    b, k = x.shape[0], 4
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    running = bn.running_mean.clone()

    one_chunk = model.log_importance_weights(x, k, max_batch=b * k, generator=torch.Generator().manual_seed(5))
    again = model.log_importance_weights(x, k, max_batch=b * k, generator=torch.Generator().manual_seed(5))
    chunked = model.log_importance_weights(x, k, max_batch=b, generator=torch.Generator().manual_seed(5))
    assert torch.equal(one_chunk, again)
    assert model.training and torch.equal(bn.running_mean, running)    # eval mode inside, undone after

    model.eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        big = model(x.repeat(k, 1, 1, 1), generator=g)
        expected_one = (-big.recon - big.log_q + big.log_p).view(k, b)
        g = torch.Generator().manual_seed(5)
        rows = []
        for _ in range(k):
            o = model(x, generator=g)
            rows.append(-o.recon - o.log_q + o.log_p)
        expected_chunked = torch.stack(rows)
    assert torch.allclose(one_chunk, expected_one, rtol=1e-5)
    assert torch.allclose(chunked, expected_chunked, rtol=1e-5)
    # the random numbers are drawn in a different layout, so the draws differ
    assert not torch.allclose(one_chunk, chunked)


# ---------------------------------------------------------------- training step
@pytest.mark.parametrize("kw", [{}, RGB], ids=["bernoulli", "mixture-flows"])
def test_training_step_gradients_are_finite(kw):
    cfg = tiny_config(**kw)
    model = NVAE(cfg).train()
    out = model(batch_for(cfg, 4))
    loss = out.recon.mean() + out.kl.sum(1).mean() + model.spectral_loss() + model.batchnorm_loss()
    loss.backward()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in params if p.grad is None]
    assert not missing, missing
    for n, p in params:
        assert torch.isfinite(p.grad).all(), n
    assert sum(p.grad.abs().sum() for _, p in params) > 0


# ---------------------------------------------------------------- every cell table
@pytest.mark.parametrize("arch", sorted(ARCH_INSTANCES))
def test_every_arch_instance_trains_and_round_trips(arch, tmp_path):
    # 8 channels: mbconv_den's grouped convs need channel counts divisible by 8
    cfg = tiny_config(arch_instance=arch, num_channels_enc=8, num_channels_dec=8)
    model = NVAE(cfg).train()
    x = batch_for(cfg, 2)
    out = model(x)
    (out.recon.mean() + out.kl.sum(1).mean()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    model.eval()
    path = tmp_path / f"{arch}.pt"
    model.save(path)
    loaded = NVAE.from_checkpoint(path).eval()
    with torch.no_grad():
        a, b = model(x, temperature=0.0), loaded(x, temperature=0.0)
        sa, sb = model.sample_logits(2, 0.0), loaded.sample_logits(2, 0.0)
    assert_outputs_equal(a, b)
    assert torch.equal(sa, sb)


def test_res_elu_data_init_is_recorded_in_the_checkpoint(tmp_path):
    cfg = tiny_config(arch_instance="res_elu")
    model = NVAE(cfg).train()
    flags = [buf for name, buf in model.named_buffers() if name.endswith("init_done")]
    assert flags and not any(bool(f) for f in flags)
    x = binary_batch(4)
    with torch.no_grad():
        model(x)
    assert all(bool(f) for f in flags)
    path = tmp_path / "elu.pt"
    model.save(path)
    loaded = NVAE.from_checkpoint(path).train()
    assert all(bool(buf) for name, buf in loaded.named_buffers() if name.endswith("init_done"))
    # In training mode (where data init would fire) on a different batch, the loaded model still
    # computes exactly what the saved one does: no re-initialisation.
    other = 1 - binary_batch(4)
    state = {k: v.clone() for k, v in loaded.state_dict().items()}
    with torch.no_grad():
        a, b = model(other, temperature=0.0), loaded(other, temperature=0.0)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.kl, b.kl)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_decoding_the_posterior_latents_reproduces_the_logits():
    cfg = tiny_config()
    model = NVAE(cfg).eval()
    x = batch_for(cfg)
    with torch.no_grad():
        out = model(x, generator=torch.Generator().manual_seed(0))
    assert len(out.latents) == model.num_groups
    assert [tuple(z.shape[1:]) for z in out.latents] == model.latent_shapes
    assert torch.allclose(model.decode_logits(out.latents), out.logits, atol=1e-6)
    with pytest.raises(ValueError):
        model.decode_logits(out.latents[:-1])


# ---------------------------------------------------------------- partial posterior
@pytest.mark.parametrize("kw", [{}, RGB], ids=["binary", "rgb-flows"])
def test_partial_posterior_spans_reconstruction_to_prior_sample(kw):
    cfg = tiny_config(**kw)
    model = NVAE(cfg).eval()
    x = batch_for(cfg)
    with torch.no_grad():
        recon = model(x, temperature=0.0)
    # every group from q (at its means): the reconstruction
    assert torch.equal(model.partial_posterior_logits(x, keep=model.num_groups), recon.logits)
    # no group from q: a prior sample, draw for draw
    none = model.partial_posterior_logits(x, keep=0, temperature=0.8, generator=torch.Generator().manual_seed(4))
    assert torch.equal(none, model.sample_logits(x.shape[0], 0.8, generator=torch.Generator().manual_seed(4)))
    # the first group from q, the rest from p: the decoder takes q's z for group 0 only
    seen = []
    hooks = [g.dec_combiner.register_forward_hook(lambda m, i, o: seen.append(i[1])) for g in model.groups]
    model.partial_posterior_logits(x, keep=1, temperature=1.0, generator=torch.Generator().manual_seed(5))
    for h in hooks:
        h.remove()
    assert torch.equal(seen[0], recon.latents[0]) and not torch.allclose(seen[1], recon.latents[1])
    with pytest.raises(ValueError, match="keep must be in"):
        model.partial_posterior_logits(x, keep=model.num_groups + 1)
