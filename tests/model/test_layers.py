"""Weight-normalised convolution (and its data-dependent init), factorized reduce, squeeze-excitation."""
import copy

import pytest
import torch
import torch.nn.functional as F

from nvae.model.cells import OPS, ResConv
from nvae.model.layers import FactorizedReduce, SqueezeExcitation, UpsampleSkip, WNConv2d, batch_norm


def _out_norms(w):
    return w.flatten(1).norm(dim=1)


def test_wnconv_effective_weight_norm_is_exp_log_weight_norm():
    conv = WNConv2d(5, 7, 3, padding=1)
    with torch.no_grad():
        conv.log_weight_norm.normal_(0, 1)
    g = conv.log_weight_norm.flatten()
    w = conv.normalized_weight()
    v_norm = _out_norms(conv.weight)
    assert torch.allclose(_out_norms(w), torch.exp(g) * v_norm / (v_norm + 1e-5), rtol=1e-5)
    assert torch.allclose(_out_norms(w), torch.exp(g), rtol=1e-3)
    # the direction is v's
    assert torch.allclose(w / _out_norms(w).view(-1, 1, 1, 1), conv.weight / v_norm.view(-1, 1, 1, 1), atol=1e-6)
    # forward applies exactly that weight (and the bias)
    x = torch.randn(2, 5, 6, 6)
    assert torch.allclose(conv(x), F.conv2d(x, w, conv.bias, padding=1), atol=1e-6)


@pytest.mark.parametrize("c_in,c_out,k", [(3, 8, 3), (16, 4, 1), (8, 8, 5)])
def test_wnconv_initial_weight_norm_is_v_norm_plus_0_01(c_in, c_out, k):
    conv = WNConv2d(c_in, c_out, k)
    v_norm = _out_norms(conv.weight.detach())
    assert torch.allclose(conv.log_weight_norm.detach().flatten(), torch.log(v_norm + 0.01), atol=1e-6)
    assert torch.allclose(_out_norms(conv.normalized_weight().detach()), v_norm + 0.01, rtol=1e-4)


def test_wnconv_data_init_normalises_the_first_batch():
    conv = WNConv2d(6, 8, 3, padding=1, data_init=True)
    assert not bool(conv.init_done) and "init_done" in conv.state_dict()
    x = 3 * torch.randn(16, 6, 10, 10) + 2
    conv.train()
    out = conv(x)
    assert bool(conv.init_done)
    # per-channel pre-activation statistics of that batch: mean 0, std 1/5 (scale = 5 std)
    assert out.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    assert torch.allclose(out.std(dim=(0, 2, 3)), torch.full((8,), 0.2), rtol=1e-4)
    # the init does not run again: another batch leaves g and b alone and is not normalised
    g, b = conv.log_weight_norm.detach().clone(), conv.bias.detach().clone()
    out2 = conv(5 * torch.randn(16, 6, 10, 10) - 4)
    assert torch.equal(conv.log_weight_norm, g) and torch.equal(conv.bias, b)
    assert out2.std(dim=(0, 2, 3)).min() > 0.25


def test_wnconv_data_init_only_in_training_mode():
    conv = WNConv2d(4, 4, 1, data_init=True).eval()
    g = conv.log_weight_norm.detach().clone()
    conv(torch.randn(2, 4, 3, 3))
    assert not bool(conv.init_done) and torch.equal(conv.log_weight_norm, g)
    plain = WNConv2d(4, 4, 1)
    assert not hasattr(plain, "init_done")


def test_res_elu_cells_use_data_init():
    op = OPS["res_elu"](4, 4, 1)
    assert isinstance(op, ResConv) and op.bn is None and op.conv.data_init
    assert not OPS["res_bnswish"](4, 4, 1).conv.data_init


@pytest.mark.parametrize("c_out", [8, 10, 7, 5, 4])
def test_factorized_reduce_shape_and_coverage(c_out):
    fr = FactorizedReduce(3, c_out)
    convs = [fr.conv_1, fr.conv_2, fr.conv_3, fr.conv_4]
    assert sum(c.out_channels for c in convs) == c_out
    assert [c.out_channels for c in convs[:3]] == [c_out // 4] * 3
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    out = fr(x)
    assert out.shape == (2, c_out, 4, 4)
    # the four shifted stride-2 convs together see every input pixel
    out.sum().backward()
    assert (x.grad.abs().sum(dim=(0, 1)) > 0).all()


def test_factorized_reduce_branch_shifts():
    fr = FactorizedReduce(1, 4)    # one output channel per shift
    x = torch.zeros(1, 1, 4, 4, requires_grad=True)
    seen = []
    for ch in range(4):
        x.grad = None
        fr(x)[0, ch, 0, 0].backward()
        seen.append(tuple(x.grad[0, 0].nonzero()[0].tolist()))
    assert seen == [(0, 0), (1, 1), (0, 1), (1, 0)]


def test_factorized_reduce_equals_the_official_shifted_stride_2_convs():
    # The official form: stride-2 1x1 convs on the input shifted by (0,0), (1,1), (0,1), (1,0).
    fr = FactorizedReduce(3, 10).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    s = F.silu(x)
    shifted = [s, s[:, :, 1:, 1:], s[:, :, :, 1:], s[:, :, 1:, :]]
    convs = [fr.conv_1, fr.conv_2, fr.conv_3, fr.conv_4]
    official = torch.cat([F.conv2d(xs, c.normalized_weight(), c.bias, stride=2) for c, xs in zip(convs, shifted)], 1)
    assert torch.allclose(fr(x), official, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("c_in,c_out,size,batch", [(2, 8, 32, 4), (2, 8, 16, 32), (3, 4, 16, 32), (4, 8, 32, 4),
                                                   (16, 32, 16, 8)])
def test_factorized_reduce_channels_last_gradients_match_float64(c_in, c_out, size, batch):
    # On AVX2 CPUs oneDNN's stride-2 1x1 weight-gradient kernel gave wrong weight gradients
    # (and corrupted the heap) for these narrow shapes in channels-last, not on every call:
    # three tries each.
    ref = FactorizedReduce(c_in, c_out).double()
    fast = copy.deepcopy(ref).float().to(memory_format=torch.channels_last)
    for _ in range(3):
        x = torch.randn(batch, c_in, size, size, dtype=torch.float64)
        grad = torch.randn(batch, c_out, size // 2, size // 2, dtype=torch.float64)
        results = []
        for module, xs, gs in [(ref, x, grad), (fast, x.float().contiguous(memory_format=torch.channels_last),
                                                grad.float().contiguous(memory_format=torch.channels_last))]:
            module.zero_grad(set_to_none=True)
            xs = xs.detach().requires_grad_()
            module(xs).backward(gs)
            results.append([xs.grad.double()] + [p.grad.double() for p in module.parameters()])
        for a, b in zip(*results):
            assert torch.allclose(b, a, rtol=1e-4, atol=1e-4 * a.abs().max().item())


@pytest.mark.parametrize("channels,hidden", [(4, 4), (16, 4), (63, 4), (64, 4), (65, 4), (80, 5), (256, 16)])
def test_squeeze_excitation_hidden_size(channels, hidden):
    se = SqueezeExcitation(channels)
    assert se.se[0].in_features == channels and se.se[0].out_features == hidden == max(channels // 16, 4)
    assert se.se[2].in_features == hidden and se.se[2].out_features == channels


def test_squeeze_excitation_gates_channels():
    se = SqueezeExcitation(20)
    x = torch.randn(3, 20, 5, 5)
    lin1, lin2 = se.se[0], se.se[2]
    gate = torch.sigmoid(lin2(torch.relu(lin1(x.mean(dim=(2, 3))))))
    assert torch.allclose(se(x), x * gate[:, :, None, None], atol=1e-6)


def test_upsample_skip_is_bilinear_then_conv():
    up = UpsampleSkip(8, 4)
    x = torch.randn(2, 8, 3, 3)
    out = up(x)
    assert out.shape == (2, 4, 6, 6)
    big = F.interpolate(x, size=(6, 6), mode="bilinear", align_corners=True)
    assert torch.allclose(out, F.conv2d(big, up.conv.normalized_weight()), atol=1e-6)
    # align_corners=True keeps the corner pixels
    assert torch.allclose(big[..., 0, 0], x[..., 0, 0]) and torch.allclose(big[..., -1, -1], x[..., -1, -1])


def test_batch_norm_constants():
    bn = batch_norm(6)
    assert bn.momentum == 0.05 and bn.eps == 1e-5
