"""Check every convolution shape of a model against float64: does this CPU's kernel give the right gradients?

oneDNN chooses a convolution kernel per ISA (AVX2, AVX-512, ...), layout and shape;
on AVX2 its stride-2 1x1 weight-gradient kernel returned wrong weight gradients for
narrow channel counts in channels-last (and corrupted the heap). This script runs one
forward pass of each model, records the shape of every convolution it applies (input,
channels, kernel, stride, padding, dilation, groups), and for each distinct one
compares the float32 forward output and input / weight / bias gradients in the given
layout with float64 in NCHW (not oneDNN), ``--tries`` times with fresh inputs. It
prints the largest relative error per shape and the CPU it ran on.

    python benchmarks/conv_kernels.py                                  # mnist_small and a 4-channel model
    ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/conv_kernels.py          # AVX2 kernels on an AVX-512 CPU
    python benchmarks/conv_kernels.py --preset cifar10 --batch 8 --model num_channels_enc=32 --model num_channels_dec=32
    python benchmarks/conv_kernels.py --raw-stride2-1x1                 # the official FactorizedReduce form too

Exit status 1 when any shape exceeds ``--tolerance``.
"""
from __future__ import annotations

import argparse
import sys
from typing import List

import torch
import torch.nn.functional as F

from _common import ConvShape, describe_cpu, model_conv_shapes

from nvae import NVAEConfig
from nvae.config import parse_overrides


def stride2_1x1_official(shapes: List[ConvShape]) -> List[ConvShape]:
    """The official FactorizedReduce form of our sub-grid 1x1 convs: stride 2 on the full input."""
    out = []
    for s in shapes:
        if s.input_strided and s.kernel == (1, 1):
            out.append(s._replace(size=(2 * s.size[0], 2 * s.size[1]), stride=(2, 2), input_strided=False))
    return out


def max_relative_errors(shape: ConvShape, channels_last: bool, tries: int) -> List[float]:
    """Largest relative error (output, input grad, weight grad, bias grad) of float32 against float64."""
    worst = [0.0] * 4
    for _ in range(tries):
        x = torch.randn(shape.batch, shape.c_in, *shape.size, dtype=torch.float64)
        w = torch.randn(shape.c_out, shape.c_in // shape.groups, *shape.kernel, dtype=torch.float64)
        b = torch.randn(shape.c_out, dtype=torch.float64) if shape.bias else None
        results = []
        for dtype, layout in ((torch.float64, torch.contiguous_format),
                              (torch.float32, torch.channels_last if channels_last else torch.contiguous_format)):
            xs = x.to(dtype).contiguous(memory_format=layout).detach().requires_grad_()
            ws = w.to(dtype).detach().requires_grad_()
            bs = b.to(dtype).detach().requires_grad_() if b is not None else None
            inp = xs
            if shape.input_strided:   # as FactorizedReduce does: a sub-grid view of a larger input
                big = torch.zeros(shape.batch, shape.c_in, 2 * shape.size[0], 2 * shape.size[1], dtype=dtype)
                big = big.contiguous(memory_format=layout)
                big[:, :, ::2, ::2] = xs
                inp = big[:, :, ::2, ::2]
            y = F.conv2d(inp, ws, bs, shape.stride, shape.padding, shape.dilation, shape.groups)
            g = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
            y.backward(g.to(dtype).contiguous(memory_format=layout))
            results.append([y.detach(), xs.grad, ws.grad, bs.grad if bs is not None else None])
        for i, (ref, got) in enumerate(zip(*results)):
            if ref is not None:
                err = ((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
                worst[i] = max(worst[i], err)
    return worst


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", action="append", default=None,
                   help="presets to check (default: mnist_small, and mnist_small at 4 channels)")
    p.add_argument("--model", action="append", default=[], metavar="KEY=VALUE", help="override an NVAEConfig field")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tries", type=int, default=3, help="fresh inputs per shape (a bad kernel may fail sometimes)")
    p.add_argument("--nchw", action="store_true", help="check float32 in NCHW instead of channels-last")
    p.add_argument("--raw-stride2-1x1", action="store_true",
                   help="also check the official FactorizedReduce form (stride-2 1x1 convs on the full input)")
    p.add_argument("--tolerance", type=float, default=1e-4)
    a = p.parse_args(argv)
    overrides = parse_overrides(a.model, NVAEConfig)
    configs = [(name, NVAEConfig.preset(name, **overrides)) for name in (a.preset or [])]
    if not configs:
        configs = [("mnist_small", NVAEConfig.preset("mnist_small", **overrides)),
                   ("mnist_small 4ch", NVAEConfig.preset("mnist_small", num_channels_enc=4, num_channels_dec=4,
                                                         **overrides))]
    layout = "NCHW" if a.nchw else "channels-last"
    print(f"# {describe_cpu()}; float32 {layout} against float64 NCHW, {a.tries} tries per shape")
    bad = 0
    for name, cfg in configs:
        shapes = model_conv_shapes(cfg, a.batch)
        if a.raw_stride2_1x1:
            shapes += stride2_1x1_official(shapes)
        print(f"\n{name}: {len(shapes)} distinct convolutions")
        print(f"{'shape':58s} {'output':>9s} {'grad x':>9s} {'grad w':>9s} {'grad b':>9s}")
        for shape in shapes:
            errs = max_relative_errors(shape, not a.nchw, a.tries)
            flag = "  WRONG" if max(errs) > a.tolerance else ""
            bad += bool(flag)
            print(f"{shape.label():58s} " + " ".join(f"{e:9.1e}" for e in errs) + flag, flush=True)
    print(f"\n{bad} shape(s) above tolerance {a.tolerance:g}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
