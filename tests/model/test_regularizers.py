"""Spectral regularisation by batched power iteration, and the BN regulariser."""

import pytest
import torch
import torch.nn as nn

from nvae import NVAE, NVAEConfig, speedups
from nvae.model.layers import WNConv2d, effective_weight
from nvae.model.regularizers import SpectralRegularizer, batchnorm_loss


def tiny_model(**kw):
    base = dict(image_size=8, in_channels=3, decoder="mixture", num_mixture_dec=2, num_channels_enc=4,
                num_channels_dec=4, num_latent_scales=2, num_groups_per_scale=2, ada_groups=False,
                num_preprocess_blocks=1, num_preprocess_cells=2, num_postprocess_blocks=1,
                num_postprocess_cells=2, num_cell_per_cond_enc=1, num_cell_per_cond_dec=1, num_nf=1)
    base.update(kw)
    return NVAE(NVAEConfig(**base))


def true_sigma(conv):
    return torch.linalg.matrix_norm(effective_weight(conv).detach().flatten(1).double(), ord=2)


def test_power_iteration_converges_for_every_conv_of_a_model():
    model = tiny_model()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    groups = model.spectral._groups
    assert sum(len(g) for g in groups) == len(convs) > 50
    truth = [torch.stack([true_sigma(c) for c in members]) for members in groups]

    def worst_error():
        return max(((est.double() - t).abs() / t).max().item()
                   for est, t in zip(model.spectral.singular_values(), truth))

    # 4 iterations per call; some random matrices have sigma_2 / sigma_1 ~ 0.99, so allow a
    # few hundred calls (typically 20 to 100 suffice).
    for calls in range(1, 301):
        loss = model.spectral_loss()
        if calls % 10 == 0 and worst_error() < 1e-3:
            break
    assert worst_error() < 1e-3, calls
    estimates = model.spectral.singular_values()
    for est, t in zip(estimates, truth):
        assert (est.double() <= t * (1 + 1e-5)).all()     # u^T W v never exceeds sigma_max
    # the loss is the sum of the estimates, so of the spectral norms
    assert loss.item() == pytest.approx(sum(e.sum().item() for e in estimates), rel=1e-5)
    assert loss.item() == pytest.approx(sum(t.sum().item() for t in truth), rel=1e-3)


def test_convs_of_equal_matrix_shape_are_grouped():
    a = WNConv2d(8, 8, 3)        # 8 x 72
    b = nn.Conv2d(8, 8, 3)       # 8 x 72
    c = nn.Conv2d(72, 8, 1)      # 8 x 72 as well: same matrix, different kernel
    d = WNConv2d(8, 16, 1)       # 16 x 8
    e = nn.Conv2d(4, 8, 3)       # 8 x 36
    f = nn.Conv2d(8, 16, 1)      # 16 x 8
    reg = SpectralRegularizer([a, b, c, d, e, f])
    assert [[id(m) for m in g] for g in reg._groups] == [[id(a), id(b), id(c)], [id(d), id(f)], [id(e)]]
    state = reg.state_dict()
    assert state["u0"].shape == (3, 8) and state["v0"].shape == (3, 72)
    assert state["u1"].shape == (2, 16) and state["v1"].shape == (2, 8)
    assert state["u2"].shape == (1, 8) and state["v2"].shape == (1, 36)
    assert [s.shape for s in reg.singular_values()] == [(3,), (2,), (1,)]
    # no parameters of the convs are duplicated into the regulariser
    assert list(reg.parameters()) == []


def _slow_conv(gap=0.97):
    """A 1x1 conv whose two largest singular values are close: power iteration converges slowly,
    so the number of iterations run is visible in u and v."""
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    s = torch.tensor([2.0, 2.0 * gap, 1.0, 0.5, 0.1], dtype=torch.float64)
    w = u[:, :5] @ torch.diag(s) @ v.T
    conv = nn.Conv2d(5, 6, 1, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(w.view(6, 5, 1, 1))
    return conv


def _manual_iterations(w, u, v, steps):
    for _ in range(steps):
        v = w.T @ u
        v = v / v.norm()
        u = w @ v
        u = u / u.norm()
    return u, v


def test_first_call_runs_ten_times_the_iterations():
    conv = _slow_conv()
    reg = SpectralRegularizer([conv]).double()
    w = conv.weight.detach().flatten(1)
    u0, v0 = reg.u0[0].clone(), reg.v0[0].clone()
    assert not bool(reg.initialized)
    reg()
    assert bool(reg.initialized)
    u40, v40 = _manual_iterations(w, u0, v0, 40)
    assert torch.allclose(reg.u0[0], u40, atol=1e-10) and torch.allclose(reg.v0[0], v40, atol=1e-10)
    # the estimate after 4 iterations really is different, so this distinguishes 40 from 4
    u4, _ = _manual_iterations(w, u0, v0, 4)
    assert (u4 - u40).abs().max() > 1e-3
    reg()
    u44, v44 = _manual_iterations(w, u0, v0, 44)
    assert torch.allclose(reg.u0[0], u44, atol=1e-10) and torch.allclose(reg.v0[0], v44, atol=1e-10)


def test_state_dict_continues_the_estimate():
    conv = _slow_conv()
    reg = SpectralRegularizer([conv]).double()
    reg()
    state = {k: v.clone() for k, v in reg.state_dict().items()}
    assert set(state) == {"u0", "v0", "initialized"}
    expected = reg()                                      # a 4-iteration continuation
    torch.manual_seed(123)
    fresh = SpectralRegularizer([conv]).double()          # other random u, v
    assert not torch.allclose(fresh.u0, state["u0"])
    fresh.load_state_dict(state)
    assert bool(fresh.initialized)
    assert torch.equal(fresh(), expected)
    assert torch.equal(fresh.u0, reg.u0) and torch.equal(fresh.v0, reg.v0)


def test_spectral_loss_gradient_is_u_v_transpose():
    conv = nn.Conv2d(3, 5, 3, bias=False).double()
    wn = WNConv2d(3, 5, 3).double()
    reg = SpectralRegularizer([conv, wn]).double()
    for _ in range(5):
        reg()
    conv.zero_grad(), wn.zero_grad()
    loss = reg()
    loss.backward()
    u, v = reg.u0, reg.v0
    assert not u.requires_grad and not v.requires_grad and u.grad is None
    # d(u^T W v)/dW = u v^T, with u, v constants: no gradient through the power iteration
    assert torch.allclose(conv.weight.grad.flatten(1), torch.outer(u[0], v[0]))
    # the weight-normalised conv gets its gradient through its effective weight
    assert wn.weight.grad is not None and wn.log_weight_norm.grad is not None
    expected = torch.autograd.grad((u[1] @ wn.normalized_weight().flatten(1) @ v[1]), wn.log_weight_norm)[0]
    assert torch.allclose(wn.log_weight_norm.grad, expected)
    assert wn.log_weight_norm.grad.abs().max() > 0


def test_batchnorm_loss_is_sum_of_max_abs_gamma():
    layers = [nn.BatchNorm2d(c) for c in (3, 7, 4)]
    with torch.no_grad():
        for layer in layers:
            layer.weight.normal_()
        layers[1].weight[2] = -5.0            # max |gamma| from a negative gamma
    no_affine = nn.BatchNorm2d(4, affine=False)
    loss = batchnorm_loss(layers + [no_affine])
    expected = 5.0 + max(abs(x) for x in layers[0].weight.tolist()) + max(abs(x) for x in layers[2].weight.tolist())
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert layers[1].weight.grad[2] == -1 and layers[1].weight.grad.abs().sum() == 1
    assert batchnorm_loss([]).item() == 0


def test_model_batchnorm_loss_covers_every_bn_layer():
    model = tiny_model(arch_instance="res_bnswish")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(-2, 2)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) > 10
    expected = sum(m.weight.abs().max().item() for m in bns)
    assert model.batchnorm_loss().item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_spectral_loss_reuses_the_forward_weights_with_the_same_gradients(checkpointing):
    """L_SR on the forward pass's normalised weights (as the official code does) = on fresh ones."""
    torch.manual_seed(0)
    model = speedups.apply(tiny_model().train(), checkpointing=checkpointing)
    fresh = speedups.apply(tiny_model().train(), checkpointing=checkpointing)
    fresh.load_state_dict(model.state_dict())
    x = torch.rand(2, 3, 8, 8)
    grads = []
    for m, reuse in ((model, True), (fresh, False)):
        torch.manual_seed(1)
        out = m(x)
        if not reuse:
            for c in m.modules():
                if isinstance(c, WNConv2d):
                    c._forward_weight = None
        wn = [c for c in m.modules() if isinstance(c, WNConv2d)]
        taken = [c._forward_weight is not None for c in wn]
        assert all(taken) == reuse
        (out.recon.sum() + 3.0 * m.spectral_loss()).backward()
        if not checkpointing:   # (the backward pass's recomputation of a cell stores anew)
            assert all(c._forward_weight is None for c in wn)   # handed out once
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-6, msg=n)


def test_spectral_loss_after_backward_or_an_update_uses_fresh_weights():
    model = speedups.apply(tiny_model().train())
    x = torch.rand(2, 3, 8, 8)
    model(x).recon.sum().backward()            # the forward weights' graph is freed here
    model.spectral_loss().backward()           # so these must be computed anew: no error
    model.spectral_loss().backward()
    model(x)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    conv = next(c for c in model.modules() if isinstance(c, WNConv2d))
    torch.testing.assert_close(conv.take_forward_weight(), conv.normalized_weight())
