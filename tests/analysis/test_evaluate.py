"""The importance-weighted estimator, against a model whose log-likelihood is known exactly,
and evaluation over a split."""
import math

import pytest
import torch
from torch.distributions import Normal
from torch.utils.data import TensorDataset

from nvae import NVAE, NVAEConfig
from nvae.analysis.likelihood import EvalConfig, evaluate
from nvae.model.network import iw_bound

from conftest import REFERENCE, needs_shared

# Linear-Gaussian latent model: z ~ N(0, 1), x | z ~ N(a z, s^2)  =>  p(x) = N(0, a^2 + s^2).
A, S = 2.0, 0.5


def log_weights(x, k, gen, q_shift=0.3, q_scale=1.3):
    """log p(x, z_k) - log q(z_k | x) under a deliberately imperfect Gaussian q."""
    post_var = 1 / (1 + A * A / S ** 2)
    post_mean = post_var * A * x / S ** 2
    q = Normal(post_mean + q_shift, math.sqrt(post_var) * q_scale)
    z = q.mean + q.stddev * torch.randn((k,) + x.shape, generator=gen, dtype=torch.float64)
    return Normal(0.0, 1.0).log_prob(z) + Normal(A * z, S).log_prob(x) - q.log_prob(z)


def test_iw_bound_converges_to_the_exact_log_likelihood():
    x = torch.tensor([-1.5, 0.2, 2.5], dtype=torch.float64)
    truth = Normal(0.0, math.sqrt(A * A + S * S)).log_prob(x)
    gen = torch.Generator().manual_seed(0)
    gaps = []
    for k in (1, 10, 10_000):
        # many independent repetitions estimate the bound's expectation and its standard error
        reps = torch.stack([iw_bound(log_weights(x, k, gen)) for _ in range(400 if k < 10_000 else 20)])
        est, se = reps.mean(0), reps.std(0) / math.sqrt(len(reps))
        assert torch.all(est <= truth + 4 * se + 1e-9), (k, est, truth)   # a lower bound in expectation
        gaps.append((truth - est).max().item())
    assert gaps[0] > gaps[1] > 0.01                                     # tighter with more samples
    assert abs(gaps[2]) < 5e-3                                          # and converges to the truth


def test_k_equal_one_is_the_elbo_in_expectation():
    x = torch.tensor([0.7], dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    one = torch.stack([iw_bound(log_weights(x, 1, gen)) for _ in range(20_000)])
    # ELBO in closed form for Gaussians: E_q[log p(x|z)] + E_q[log p(z)] + H[q]
    post_var = 1 / (1 + A * A / S ** 2)
    m, v = post_var * A * 0.7 / S ** 2 + 0.3, post_var * 1.3 ** 2
    elbo = (-0.5 * math.log(2 * math.pi * S ** 2) - ((0.7 - A * m) ** 2 + A * A * v) / (2 * S ** 2)
            - 0.5 * math.log(2 * math.pi) - (m * m + v) / 2 + 0.5 * math.log(2 * math.pi * math.e * v))
    assert one.mean().item() == pytest.approx(elbo, abs=4 * one.std().item() / math.sqrt(len(one)))


def test_evaluate_reports_consistent_units():
    cfg = NVAEConfig.preset("mnist_small", num_channels_enc=4, num_channels_dec=4, num_groups_per_scale=2)
    model = NVAE(cfg).eval()
    data = TensorDataset(torch.rand(5, 1, 32, 32))
    r = evaluate(model, data, EvalConfig(num_samples=4, batch_size=2), generator=torch.Generator().manual_seed(0),
                 progress=False)
    assert r.num_images == 5 and r.data_dims == 28 * 28
    assert r.nll <= r.nelbo + 1e-6 * abs(r.nelbo) or r.nll < r.nelbo + 5.0
    assert r.bpd == pytest.approx(r.nll / (math.log(2) * 784))
    assert r.to_dict()["units"]["nll"] == "nats/image"


@needs_shared("reference", "mnist_tiny")
def test_evaluate_on_official_fixture_agrees_with_official_runs():
    model = NVAE.from_official(REFERENCE / "mnist_tiny" / "checkpoint.pt")
    ref = torch.load(REFERENCE / "mnist_tiny" / "reference.pt", weights_only=True)
    # the fixture batch is already binary: Bernoulli re-binarisation leaves 0/1 unchanged
    r = evaluate(model, TensorDataset(ref["x"]), EvalConfig(num_samples=100, batch_size=8),
                 generator=torch.Generator().manual_seed(3), progress=False)
    runs = ref["iw_nll_K100_runs"].double()
    spread = (runs.max(0).values - runs.min(0).values).mean().item()
    assert abs(r.nll - runs.mean().item()) < max(4 * spread, 5.0)
