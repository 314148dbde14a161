"""A depthwise convolution's weight gradient summed by kernel offset equals the convolution's own."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nvae import NVAE, NVAEConfig, speedups
from nvae.speedups.depthwise import DepthwiseConv2d, depthwise_weight_grad


def _reference_weight_grad(g, x, weight, padding):
    """float64, NCHW, through autograd of F.conv2d."""
    x64 = x.double().contiguous()
    w64 = weight.double().contiguous().requires_grad_()
    out = F.conv2d(x64, w64, None, 1, padding, 1, x.shape[1])
    return torch.autograd.grad(out, w64, g.double().contiguous())[0]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("size,kernel,padding", [((4, 4), 5, 2), ((2, 2), 5, 2), ((1, 1), 5, 2), ((4, 3), 3, 1),
                                                 ((4, 4), 11, 5), ((3, 5), 3, 0), ((8, 8), 5, 2)])
def test_offset_sums_equal_the_weight_gradient(size, kernel, padding, channels_last):
    torch.manual_seed(0)
    c = 6
    x = torch.randn(3, c, *size)
    w = torch.randn(c, 1, kernel, kernel)
    out_size = [s + 2 * padding - kernel + 1 for s in size]
    g = torch.randn(3, c, *out_size)
    if channels_last:
        x, w, g = (t.contiguous(memory_format=torch.channels_last) for t in (x, w, g))
    got = depthwise_weight_grad(g, x, (kernel, kernel), (padding, padding))
    assert got.shape == w.shape
    torch.testing.assert_close(got.double(), _reference_weight_grad(g, x, w, padding), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [4, 8])   # 4x4 takes the offset sums, 8x8 oneDNN's kernel
@pytest.mark.parametrize("bias", [False, True])
def test_module_matches_conv2d(size, bias):
    torch.manual_seed(0)
    plain = nn.Conv2d(8, 8, 5, padding=2, groups=8, bias=bias)
    ours = DepthwiseConv2d(8, 8, 5, padding=2, groups=8, bias=bias)
    ours.load_state_dict(plain.state_dict())
    x = (torch.randn(2, 8, size, size)).contiguous(memory_format=torch.channels_last)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out1, out2 = plain(x1), ours(x2)
    torch.testing.assert_close(out2, out1, rtol=0, atol=0)      # the same forward kernel
    g = torch.randn_like(out1)
    out1.backward(g)
    out2.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=0, atol=0)  # the same input-gradient kernel
    torch.testing.assert_close(ours.weight.grad, plain.weight.grad, rtol=1e-5, atol=1e-5)
    if bias:
        torch.testing.assert_close(ours.bias.grad, plain.bias.grad, rtol=1e-5, atol=1e-5)


def test_model_depthwise_convs_are_swapped_in_place():
    model = speedups.apply(NVAE(NVAEConfig.preset("digits")))
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1
                 and m.groups == m.in_channels == m.out_channels]
    assert depthwise and all(type(m) is DepthwiseConv2d for m in depthwise)
    fresh = nn.Conv2d(4, 4, 5, groups=4, bias=False)
    assert set(fresh.state_dict()) == set(depthwise[0].state_dict())
    speedups.remove(model)                      # and back: the plain network's nn.Conv2d
    assert all(type(m) is nn.Conv2d for m in depthwise)


def test_benchmark_lists_every_depthwise_shape_and_its_choice(capsys):
    """benchmarks/depthwise_grad.py on a tiny model: one row per depthwise shape, each saying which path trains."""
    from conftest import load_benchmark
    bench = load_benchmark("depthwise_grad")
    bench.main(["--preset", "digits", "--batch", "2", "--repeats", "1"])
    cpu, header, columns, *rows = capsys.readouterr().out.splitlines()
    assert cpu.startswith("# ") and "thread(s)" in cpu
    assert rows and all(row.rstrip().endswith(("offsets", "oneDNN")) for row in rows)
    # Maps of at most SMALL_MAP (16) pixels take the offset sums, larger ones oneDNN.
    for row in rows:
        size = int(row.split("->")[0].split("x")[-1])
        assert row.rstrip().endswith("offsets" if size * size <= 16 else "oneDNN")
