"""The training objective: KL warm-up, KL balancing, lambda annealing, the learning-rate schedule."""
import math

import pytest
import torch

from nvae.config import TrainConfig
from nvae.training.objective import balanced_kl, kl_balance_alpha, kl_coefficient, regularization_coefficient
from nvae.training.step import learning_rate


def test_kl_warmup_follows_the_official_formula():
    T = 10_000
    assert kl_coefficient(0, T) == pytest.approx(1e-4)                      # floor
    assert kl_coefficient(1, T) == pytest.approx(1e-4)                      # still in the constant phase
    assert kl_coefficient(int(0.15 * T), T) == pytest.approx((0.15 * T - 1) / (0.3 * T))
    assert kl_coefficient(int(0.3 * T) + 1, T) == 1.0
    assert kl_coefficient(T, T) == 1.0
    steps = [kl_coefficient(s, T) for s in range(0, T, 97)]
    assert all(b >= a for a, b in zip(steps, steps[1:]))                    # monotone


def test_alpha_is_4_to_the_scale_over_groups_coarsest_first():
    # mnist: groups (10, 5) finest-first -> decoder order: 5 coarse groups then 10 fine ones
    alpha = kl_balance_alpha((10, 5))
    expected = torch.tensor([1 / 5] * 5 + [4 / 10] * 10)
    assert torch.allclose(alpha, expected / expected.min())
    assert alpha.min() == 1.0
    alpha = kl_balance_alpha((16, 8, 4, 4, 4))
    raw = [4.0 ** i / n for i, n in enumerate((4, 4, 4, 8, 16)) for _ in range(n)]
    assert torch.allclose(alpha, torch.tensor(raw) / min(raw))


def test_balanced_kl_weights_groups_by_their_kl_over_alpha():
    kl = torch.tensor([[1.0, 3.0, 0.0], [3.0, 5.0, 0.0]], requires_grad=True)
    alpha = torch.tensor([1.0, 2.0, 1.0])
    out, coeff = balanced_kl(kl, beta=0.5, alpha=alpha)
    raw = (torch.tensor([2.0, 4.0, 0.0]) + 0.01) / alpha
    expected_coeff = raw / raw.mean()
    assert torch.allclose(coeff, expected_coeff)
    assert torch.allclose(out, 0.5 * (kl.detach() * expected_coeff).sum(1))
    out.sum().backward()
    # the coefficients are constants for the gradient
    assert torch.allclose(kl.grad, 0.5 * expected_coeff.expand(2, 3))


def test_balancing_stops_at_beta_one_and_can_be_switched_off():
    kl = torch.rand(4, 3)
    alpha = torch.ones(3)
    for beta, balance in [(1.0, True), (0.3, False)]:
        out, coeff = balanced_kl(kl, beta=beta, alpha=alpha, balance=balance)
        assert torch.allclose(out, beta * kl.sum(1))
        assert torch.all(coeff == 1)


def test_lambda_annealing_is_log_linear_in_beta():
    assert regularization_coefficient(0.3, 1e-2) == 1e-2
    assert regularization_coefficient(0.0, 1e-2, 1.0, anneal=True) == pytest.approx(1.0)
    assert regularization_coefficient(1.0, 1e-2, 1.0, anneal=True) == pytest.approx(1e-2)
    assert regularization_coefficient(0.5, 1e-2, 1.0, anneal=True) == pytest.approx(1e-1)
    assert regularization_coefficient(0.5, 0.0, 1.0, anneal=True) == 0.0   # off stays off, annealed or not
    with pytest.raises(ValueError):
        regularization_coefficient(0.5, 1e-2, 0.0, anneal=True)


def test_regularisation_off_skips_the_power_iteration():
    from nvae import NVAE, NVAEConfig
    from nvae.training.objective import nvae_loss
    model = NVAE(NVAEConfig.preset("digits", num_channels_enc=4, num_channels_dec=4)).train()
    x = (torch.rand(4, 1, 8, 8) > 0.5).float()
    before = {k: v.clone() for k, v in model.named_buffers() if k.startswith("spectral.")}
    out = nvae_loss(model, x, beta=1.0, lam=0.0, alpha=kl_balance_alpha(model.config.groups_per_scale))
    assert out.spectral.item() == 0 and out.batchnorm.item() == 0
    assert out.loss.item() == pytest.approx(out.nelbo.mean().item(), rel=1e-6)
    for k, v in model.named_buffers():
        if k in before:
            assert torch.equal(v, before[k]), k   # power-iteration vectors untouched
    assert before, "the model should have power-iteration buffers"


def test_learning_rate_warms_up_linearly_then_cosine_to_the_minimum():
    cfg = TrainConfig(epochs=20, warmup_epochs=5, learning_rate=1e-2, learning_rate_min=1e-4)
    spe = 10
    assert learning_rate(0, spe, cfg) == 0.0
    assert learning_rate(25, spe, cfg) == pytest.approx(0.5e-2)
    assert learning_rate(50, spe, cfg) == pytest.approx(1e-2)
    span = 20 - 5 - 1
    mid = (5 + span // 2) * spe
    expected = 1e-4 + (1e-2 - 1e-4) * (1 + math.cos(math.pi * (span // 2) / span)) / 2
    assert learning_rate(mid, spe, cfg) == pytest.approx(expected)
    assert learning_rate(19 * spe, spe, cfg) == pytest.approx(1e-4)
    lrs = [learning_rate(s, spe, cfg) for s in range(50, 200)]
    assert all(b <= a + 1e-12 for a, b in zip(lrs, lrs[1:]))
