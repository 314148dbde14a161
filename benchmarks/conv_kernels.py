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
from typing import Dict, List, NamedTuple, Tuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from nvae import NVAE, NVAEConfig
from nvae.config import parse_overrides
from nvae.speedups.cpu import describe_cpu


class ConvShape(NamedTuple):
    batch: int
    c_in: int
    c_out: int
    size: Tuple[int, int]
    kernel: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    groups: int
    bias: bool
    input_strided: bool     #: the input was a strided view (the sub-grids of FactorizedReduce)

    def label(self) -> str:
        k, s, p, d = self.kernel, self.stride, self.padding, self.dilation
        extra = f" d{d[0]}" if d != (1, 1) else ""
        extra += f" g{self.groups}" if self.groups > 1 else ""
        extra += " strided-view" if self.input_strided else ""
        return (f"{self.batch}x{self.c_in}x{self.size[0]}x{self.size[1]} -> {self.c_out}  k{k[0]} s{s[0]} p{p[0]}"
                f"{extra}{'' if self.bias else ' no-bias'}")


class _RecordConvs(TorchFunctionMode):
    """Records the shape of every 2-d convolution called while active (modules or functional)."""

    def __init__(self):
        super().__init__()
        self.seen: Dict[ConvShape, int] = {}    #: shape -> number of calls

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.conv2d, torch.conv2d):
            names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
            call = dict(zip(names, args), **kwargs)
            x, w = call["input"], call["weight"]
            pair = lambda v, d: tuple(v) if isinstance(v, (tuple, list)) else (v, v) if v is not None else d  # noqa: E731
            strided = not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
            groups = call.get("groups", 1)
            shape = ConvShape(x.shape[0], x.shape[1], w.shape[0], tuple(x.shape[-2:]), tuple(w.shape[-2:]),
                              pair(call.get("stride"), (1, 1)), pair(call.get("padding"), (0, 0)),
                              pair(call.get("dilation"), (1, 1)), groups, call.get("bias") is not None, strided)
            self.seen[shape] = self.seen.get(shape, 0) + 1
        return func(*args, **kwargs)


def model_conv_shapes(cfg: NVAEConfig, batch: int) -> List[ConvShape]:
    """The distinct convolutions one training forward pass of ``NVAE(cfg)`` applies."""
    return list(model_conv_counts(cfg, batch))


def model_conv_counts(cfg: NVAEConfig, batch: int) -> Dict[ConvShape, int]:
    """Each distinct convolution of one training forward pass of ``NVAE(cfg)``, and how often it runs."""
    torch.manual_seed(0)
    model = NVAE(cfg).train()
    x = torch.rand(batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    x = torch.bernoulli(x) if cfg.decoder == "bernoulli" else x
    with torch.no_grad(), _RecordConvs() as record:
        model(x)
    return dict(record.seen)


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
