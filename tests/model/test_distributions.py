"""Latent Normals (soft clamps, analytic and residual KL) and the output likelihoods p(x|z)."""
import math

import pytest
import torch
import torch.distributions as D

from nvae.model.distributions import (Bernoulli, DiscMixLogistic, Normal, NormalDecoder, ResidualNormal,
                                output_distribution, sum_log_prob)


def _wide(*shape, scale=4.0):
    """Random values spanning the clamp's linear and saturated regimes (|x| up to ~20)."""
    return scale * torch.randn(*shape, dtype=torch.float64)


# ---------------------------------------------------------------- Normal
def test_normal_soft_clamp_formulas():
    mu, ls = _wide(1000), _wide(1000)
    t = 0.7
    n = Normal(mu, ls, temperature=t)
    assert torch.allclose(n.mu, 5 * torch.tanh(mu / 5))
    assert torch.allclose(n.sigma, (torch.exp(5 * torch.tanh(ls / 5)) + 0.01) * t)
    # The clamps are really active on these inputs, and bound the parameters.
    assert n.mu.abs().max() < 5 and (mu.abs() > 5).any()
    assert (n.sigma > 0.01 * t).all() and (n.sigma < (math.exp(5) + 0.01) * t).all()
    assert torch.allclose(Normal(mu, ls).sigma * t, n.sigma)


def test_normal_kl_matches_torch_distributions():
    p = Normal(_wide(500), _wide(500))
    q = Normal(_wide(500), _wide(500))
    expected = D.kl_divergence(D.Normal(p.mu, p.sigma), D.Normal(q.mu, q.sigma))
    assert torch.allclose(p.kl(q), expected, rtol=1e-10, atol=1e-10)
    assert torch.allclose(p.kl(p), torch.zeros(500, dtype=torch.float64), atol=1e-12)


def test_normal_log_prob_matches_torch_distributions():
    n = Normal(_wide(500), _wide(500, scale=1.0))
    z = _wide(500)
    expected = D.Normal(n.mu, n.sigma).log_prob(z)
    assert torch.allclose(n.log_prob(z), expected, rtol=1e-10, atol=1e-10)


def test_normal_sample_moments_and_temperature():
    mu, ls = torch.tensor([1.0, -2.0]).double(), torch.tensor([-1.0, 0.5]).double()
    n = Normal(mu.expand(200_000, 2), ls.expand(200_000, 2))
    g = torch.Generator().manual_seed(3)
    for t in (1.0, 0.5):
        z = n.sample(t, g)
        assert torch.allclose(z.mean(0), n.mu[0], atol=0.02)
        assert torch.allclose(z.std(0), t * n.sigma[0], rtol=0.01)
    assert torch.equal(n.sample(0.0, g), n.mu)


def test_residual_normal_kl_equals_plain_kl():
    shape = (4, 20, 6, 6)
    prior_mu, prior_ls = _wide(*shape, scale=6.0), _wide(*shape, scale=6.0)
    dmu, dls = _wide(*shape, scale=6.0), _wide(*shape, scale=6.0)
    prior = Normal(prior_mu, prior_ls)
    q = ResidualNormal(prior_mu, prior_ls, dmu, dls, prior)
    # The correction is added to the raw parameters, before the clamp.
    assert torch.allclose(q.mu, 5 * torch.tanh((prior_mu + dmu) / 5))
    assert torch.allclose(q.sigma, torch.exp(5 * torch.tanh((prior_ls + dls) / 5)) + 0.01)
    residual, plain = q.kl_to_prior(), q.kl(prior)
    assert torch.allclose(residual, plain, rtol=1e-9, atol=1e-9)
    assert plain.max() > 1e3   # large values really were exercised


# ---------------------------------------------------------------- Bernoulli
def test_bernoulli_log_prob_matches_torch_distributions():
    logits = _wide(3, 1, 5, 5, scale=10.0)
    x = (torch.rand(3, 1, 5, 5) < 0.5).double()
    expected = D.Bernoulli(logits=logits).log_prob(x)
    assert torch.allclose(Bernoulli(logits).log_prob(x), expected, rtol=1e-10, atol=1e-10)
    assert torch.allclose(Bernoulli(logits).mean(), torch.sigmoid(logits))


def test_normal_decoder_is_normal_on_minus_one_one():
    params = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    n = Normal(params[:, :3], params[:, 3:])
    expected = D.Normal(n.mu, n.sigma).log_prob(2 * x - 1)
    assert torch.allclose(NormalDecoder(params).log_prob(x), expected)


def test_sum_log_prob_crops_borders():
    lp = torch.randn(3, 2, 8, 8)
    assert torch.allclose(sum_log_prob(lp), lp.sum(dim=(1, 2, 3)))
    assert torch.allclose(sum_log_prob(lp, crop=2), lp[:, :, 2:6, 2:6].sum(dim=(1, 2, 3)))
    lp3 = torch.randn(3, 32, 32)   # the mixture's (B, H, W) maps, MNIST-style crop 32 -> 28
    assert torch.allclose(sum_log_prob(lp3, crop=2), lp3[:, 2:30, 2:30].sum(dim=(1, 2)))


# ---------------------------------------------------------- discretised mixture
def _grid(bits):
    return torch.arange(2 ** bits, dtype=torch.float32) / (2 ** bits - 1)


def _mixture_params(channels, m, h, w, ls_low=-7.0, ls_high=0.5):
    """Random mixture parameters: logits, means over (and a bit beyond) [-1, 1],
    log-scales down to the clamp, strong RGB coupling coefficients."""
    logits = 2 * torch.randn(1, m, h, w)
    per_channel = []
    for _ in range(channels):
        means = 2.4 * torch.rand(1, m, h, w) - 1.2
        log_scales = ls_low + (ls_high - ls_low) * torch.rand(1, m, h, w)
        block = [means, log_scales] + ([3 * torch.randn(1, m, h, w)] if channels == 3 else [])
        per_channel.append(torch.cat(block, 1))
    return torch.cat([logits] + per_channel, 1)


@pytest.mark.parametrize("bits", [8, 5])
def test_disc_mix_logistic_grey_sums_to_one(bits):
    m, h, w = 10, 4, 4
    params = _mixture_params(1, m, h, w)
    assert params.shape[1] == 3 * m
    values = _grid(bits)
    x = values.view(-1, 1, 1, 1).expand(-1, 1, h, w)
    dist = DiscMixLogistic(params.expand(len(values), -1, -1, -1), m, bits)
    total = dist.log_prob(x).double().exp().sum(0)            # (H, W)
    assert torch.allclose(total, torch.ones_like(total), atol=1e-5), total


def test_disc_mix_logistic_rgb_5bit_sums_to_one_over_full_grid():
    m, h, w = 10, 1, 3   # three independent random pixels
    params = _mixture_params(3, m, h, w)
    assert params.shape[1] == 10 * m
    v = _grid(5)
    r, g, b = torch.meshgrid(v, v, v, indexing="ij")
    x = torch.stack([r, g, b], -1).reshape(-1, 3, 1, 1).expand(-1, 3, h, w)
    dist = DiscMixLogistic(params.expand(x.shape[0], -1, -1, -1), m, 5)
    total = dist.log_prob(x).double().exp().sum(0)
    assert torch.allclose(total, torch.ones_like(total), atol=1e-5), total


def test_disc_mix_logistic_rgb_8bit_sums_to_one():
    """The full 256^3 grid is too slow, so red is pinned: two components put all of red's mass on
    the open tails (values 0 and 255), one on a narrow interior window; green and blue are broad,
    strongly coupled to red (and blue to green) and summed over all 256 x 256 values."""
    m = 3
    logits = torch.tensor([0.3, -0.5, 0.8]).view(1, m, 1, 1)
    red = torch.cat([torch.tensor([-1.5, 1.5, 2 * 100 / 255 - 1]),        # means
                     torch.tensor([-5.0, -5.0, -6.0]),                      # log-scales
                     torch.tensor([1.5, -2.0, 0.7])]).view(1, 3 * m, 1, 1)  # g <- r coefficient
    green = torch.cat([torch.tensor([0.9, -0.3, -1.1]), torch.tensor([-2.0, -1.0, -3.0]),
                       torch.tensor([-1.0, 2.0, 0.5])]).view(1, 3 * m, 1, 1)  # b <- r coefficient
    blue = torch.cat([torch.tensor([0.2, 1.0, -0.9]), torch.tensor([-1.5, -2.5, -0.5]),
                      torch.tensor([1.2, -0.8, -2.5])]).view(1, 3 * m, 1, 1)  # b <- g coefficient
    params = torch.cat([logits, red, green, blue], 1)
    # Red mass outside these values is below 1e-7 for every component.
    reds = torch.tensor([0] + list(range(94, 107)) + [255], dtype=torch.float32) / 255
    v = _grid(8)
    g, b = torch.meshgrid(v, v, indexing="ij")
    total = 0.0
    for r in reds:
        x = torch.stack([torch.full_like(g, r), g, b], -1).reshape(-1, 3, 1, 1)
        dist = DiscMixLogistic(params.expand(x.shape[0], -1, -1, -1), m, 8)
        total += dist.log_prob(x).double().exp().sum().item()
    assert abs(total - 1) < 1e-5, total


def _reference_log_prob(params, x, m, bits):
    """Straightforward float64 PixelCNN++ likelihood, one pixel, component and channel at a time.

    As in PixelCNN++, a bin whose mass is below 1e-5 is scored by the density at its centre
    times the bin width.
    """
    params, x = params.double(), 2 * x.double() - 1
    top = 2 ** bits - 1
    half = 1.0 / top
    channels = 3 if params.shape[1] == 10 * m else 1
    b, _, h, w = x.shape
    out = torch.empty(b, h, w, dtype=torch.float64)
    for n in range(b):
        for i in range(h):
            for j in range(w):
                p = params[n, :, i, j]
                log_mix = torch.log_softmax(p[:m], 0)
                terms = []
                for k in range(m):
                    total = log_mix[k]
                    for c in range(channels):
                        base = m + c * 3 * m
                        mean, ls = p[base + k], p[base + m + k].clamp(min=-7)
                        xc = x[n, c, i, j]
                        if channels == 3 and c == 1:
                            mean = mean + torch.tanh(p[m + 2 * m + k]) * x[n, 0, i, j]
                        if channels == 3 and c == 2:
                            mean = (mean + torch.tanh(p[m + 3 * m + 2 * m + k]) * x[n, 0, i, j]
                                    + torch.tanh(p[m + 6 * m + 2 * m + k]) * x[n, 1, i, j])
                        s = torch.exp(ls)
                        upper = torch.sigmoid((xc + half - mean) / s)
                        lower = torch.sigmoid((xc - half - mean) / s)
                        if xc < -1 + half / 2:
                            log_p = torch.log(upper)
                        elif xc > 1 - half / 2:
                            log_p = torch.log(torch.sigmoid((mean - xc + half) / s))   # 1 - lower
                        elif upper - lower > 1e-5:
                            log_p = torch.log(upper - lower)
                        else:   # logistic density at the centre, times the bin width 2 * half
                            zc = (xc - mean) / s
                            log_p = torch.log(torch.sigmoid(zc) * torch.sigmoid(-zc) / s * 2 * half)
                        total = total + log_p
                    terms.append(total)
                out[n, i, j] = torch.logsumexp(torch.stack(terms), 0)
    return out


@pytest.mark.parametrize("channels,bits", [(3, 8), (1, 8), (3, 5), (1, 5)])
def test_disc_mix_logistic_matches_reference_formula(channels, bits):
    m, h, w = 4, 3, 3
    params = _mixture_params(channels, m, h, w, ls_low=-5.0, ls_high=0.0).expand(4, -1, -1, -1).clone()
    top = 2 ** bits - 1
    x = torch.randint(0, top + 1, (4, channels, h, w)).float()
    x[0, :, 0, 0], x[1, :, 0, 0] = 0, top      # both edges
    x = x / top
    expected = _reference_log_prob(params, x, m, bits)
    got64 = DiscMixLogistic(params.double(), m, bits).log_prob(x.double())
    assert torch.allclose(got64, expected, rtol=1e-8, atol=1e-8)
    # float32 loses a little to cancellation in the narrow 8-bit bins
    got32 = DiscMixLogistic(params, m, bits).log_prob(x)
    assert torch.allclose(got32.double(), expected, rtol=1e-3, atol=1e-2)


def test_official_edge_is_not_normalised_at_8_bits():
    """The official ``x > 0.99`` test also gives value 254 the open upper tail, so the total mass
    is 1 + P(255)."""
    m, h, w = 5, 2, 2
    params = _mixture_params(1, m, h, w)
    params[:, 0] = 5.0                 # a dominant component ...
    params[:, m] = 0.97                # ... with its mean near the top
    params[:, 2 * m] = -2.0            # ... and a scale that leaves mass on 255
    x = _grid(8).view(-1, 1, 1, 1).expand(-1, 1, h, w)
    ours = DiscMixLogistic(params.expand(256, -1, -1, -1), m, 8).log_prob(x).double().exp()
    official = DiscMixLogistic(params.expand(256, -1, -1, -1), m, 8, official_edge=True).log_prob(x).double().exp()
    total = official.sum(0)
    assert (total > 1 + 1e-2).all(), total
    assert torch.allclose(total - 1, ours[255], atol=1e-5)
    assert torch.allclose(official[:254], ours[:254]) and torch.allclose(official[255], ours[255])


@pytest.mark.parametrize("channels", [1, 3])
def test_official_edge_is_normalised_at_5_bits(channels):
    m, h, w = 10, 1, 2
    params = _mixture_params(channels, m, h, w)
    v = _grid(5)
    grids = torch.meshgrid(*([v] * channels), indexing="ij")
    x = torch.stack(grids, -1).reshape(-1, channels, 1, 1).expand(-1, channels, h, w)
    p = params.expand(x.shape[0], -1, -1, -1)
    official = DiscMixLogistic(p, m, 5, official_edge=True).log_prob(x)
    assert torch.equal(official, DiscMixLogistic(p, m, 5).log_prob(x))
    total = official.double().exp().sum(0)
    assert torch.allclose(total, torch.ones_like(total), atol=1e-5)


@pytest.mark.parametrize("channels", [1, 3])
def test_disc_mix_logistic_sample_and_mean_in_unit_interval(channels):
    m = 10
    params = 3 * torch.randn(6, (10 if channels == 3 else 3) * m, 5, 5)
    dist = output_distribution(params, "mixture", m, 8)
    g = torch.Generator().manual_seed(0)
    for t in (1.0, 0.6):
        s = dist.sample(t, g)
        assert s.shape == (6, channels, 5, 5)
        assert s.min() >= 0 and s.max() <= 1
    mean = dist.mean()
    assert mean.shape == (6, channels, 5, 5) and mean.min() >= 0 and mean.max() <= 1


# Temperature sharpens pixel noise: it multiplies the logistic scale (the official code divides
# by it, which makes low-temperature samples noisier; we do not copy that).
@pytest.mark.parametrize("temperature", [1.0, 0.5, 0.25])
def test_disc_mix_logistic_sample_temperature_scales_the_logistic(temperature):
    """One grey component, mean 0, scale s: samples on [-1, 1] have std t * s * pi / sqrt(3)."""
    log_scale = -3.0
    params = torch.tensor([0.0, 0.0, log_scale]).view(1, 3, 1, 1).expand(100_000, -1, -1, -1)
    x = 2 * DiscMixLogistic(params, num_mix=1).sample(temperature, torch.Generator().manual_seed(0)) - 1
    expected = temperature * math.exp(log_scale) * math.pi / math.sqrt(3)
    assert abs(x.mean()) < 0.01
    assert x.std().item() == pytest.approx(expected, rel=0.03)
