"""Evaluation with BN folded into the separable cells' convolutions computes what the plain cells compute."""
import pytest
import torch

import nvae.speedups.folded_eval as inference
from nvae import NVAE, NVAEConfig, speedups
from nvae.model.cells import OPS, InvertedResidual
from nvae.speedups.switches import SeparableCell


def _randomise_bn(module: torch.nn.Module, seed: int = 0) -> None:
    """BN layers with running statistics and affine parameters far from their defaults."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g))
            m.running_var.copy_(torch.rand(c, generator=g) * 3 + 0.1)
            m.weight.data.copy_(torch.randn(c, generator=g))
            m.bias.data.copy_(torch.randn(c, generator=g))


def _cell(op: str, stride: int, c: int = 8) -> InvertedResidual:
    torch.manual_seed(0)
    cell = OPS[op](c, c if stride == 1 else (c // 2 if stride == -1 else 2 * c), stride)
    _randomise_bn(cell)
    return cell.eval()


@pytest.mark.parametrize("pointwise", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("op,stride", [("mconv_e6k5g0", 1), ("mconv_e3k5g8", 1), ("mconv_e6k11g0", 1),
                                       ("mconv_e6k5g0", -1), ("mconv_e3k5g0", 2)])
def test_folded_cell_matches_the_plain_cell(op, stride, channels_last, pointwise, monkeypatch):
    if pointwise and not inference._HAS_POINTWISE:
        pytest.skip("this PyTorch build has no oneDNN fused convolution")
    monkeypatch.setattr(inference, "_HAS_POINTWISE", pointwise)
    cell = _cell(op, stride)
    x = torch.randn(4, 8, 8, 8)
    if channels_last:
        cell = cell.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        plain = cell(x)
        speedups.apply(cell)
        assert type(cell) is SeparableCell
        folded = cell(x)
    speedups.remove(cell)
    assert type(cell) is InvertedResidual
    assert folded.shape == plain.shape
    torch.testing.assert_close(folded, plain, rtol=1e-4, atol=1e-4)


def test_folded_weights_follow_parameter_and_statistics_updates():
    cell = _cell("mconv_e6k5g0", 1)
    x = torch.randn(4, 8, 8, 8)
    with torch.no_grad():
        speedups.apply(cell)
        before = cell(x)
        cell.depthwise.weight.mul_(2)          # as an optimiser step would (in place)
        cell.bn_out.running_var.add_(1.0)      # as a BN re-adjustment would
        after = cell(x)
        plain_after = speedups.remove(cell)(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, plain_after, rtol=1e-4, atol=1e-4)


def test_training_and_autograd_take_the_plain_path():
    cell = _cell("mconv_e6k5g0", 1)
    x = torch.randn(4, 8, 8, 8)
    reference = InvertedResidual.forward(cell, x).detach()
    speedups.apply(cell)
    out_grad = cell(x)                     # grad mode: plain modules, differentiable
    assert out_grad.requires_grad
    torch.testing.assert_close(out_grad.detach(), reference, rtol=0, atol=0)
    cell.train()
    count = int(cell.bn_in.num_batches_tracked)
    with torch.no_grad():
        cell(x)
    assert int(cell.bn_in.num_batches_tracked) == count + 1   # training BN still counts the batch


def test_a_lean_cell_is_folded_in_evaluation_and_lean_with_autograd():
    cell = _cell("mconv_e6k5g0", 1)
    x = torch.randn(4, 8, 8, 8)
    with torch.no_grad():
        plain = cell(x)
        folded = speedups.apply(cell, folded_eval=True)(x)
        lean_and_folded = speedups.apply(cell, recompute_bn=True)(x)
    assert speedups.enabled(cell).recompute_bn and speedups.enabled(cell).folded_eval
    torch.testing.assert_close(lean_and_folded, folded, rtol=0, atol=0)     # evaluation without autograd: folded
    lean = cell(x)                                                          # with autograd: the lean chain
    assert lean.requires_grad
    torch.testing.assert_close(lean.detach(), plain, rtol=1e-6, atol=1e-6)
    assert not torch.equal(folded, plain)    # folding sums in another order: the two paths really differ
    speedups.remove(cell)
    assert type(cell) is InvertedResidual and not hasattr(cell, "_folded_cache")


def test_log_likelihood_matches_the_unfolded_model():
    """The importance weights of the folded model equal those of the plain modules, same draws."""
    torch.manual_seed(0)
    cfg = NVAEConfig.preset("digits")
    model = speedups.apply(NVAE(cfg))
    _randomise_bn(model, seed=1)
    model.eval()
    x = (torch.rand(3, cfg.in_channels, cfg.image_size, cfg.image_size) > 0.5).float()
    log_w = model.log_importance_weights(x, 4, generator=torch.Generator().manual_seed(3))

    # The same computation by hand with the plain modules (autograd on: nothing is folded),
    # encoder once, K = 4 draws folded into the batch.
    bottom_up = model.encode(x)
    out = model(x.repeat(4, 1, 1, 1), generator=torch.Generator().manual_seed(3), bottom_up=bottom_up.repeat(4))
    plain = (-out.recon - out.log_q + out.log_p).view(4, 3).detach()
    torch.testing.assert_close(log_w, plain, rtol=1e-5, atol=1e-3)
    # Switched off, the evaluation runs op by op: the plain numbers exactly.
    speedups.apply(model, folded_eval=False)
    unfolded = model.log_importance_weights(x, 4, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(unfolded, plain, rtol=0, atol=0)
