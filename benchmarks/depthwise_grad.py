"""The depthwise convolutions' weight gradient: oneDNN against sums by kernel offset, at every shape of a model.

    python benchmarks/depthwise_grad.py --preset mnist_small --batch 32 --threads 2
    ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/depthwise_grad.py ...

For each distinct depthwise convolution one training forward pass of the preset
applies (channels-last, as ``--channels-last`` trains), prints the median time of
its weight gradient by oneDNN (``aten.convolution_backward``, weight only) and by
:func:`nvae.speedups.depthwise.depthwise_weight_grad`, their ratio, the same gradient as one
grouped convolution (:func:`as_grouped_conv`, another formulation that was tried),
the largest difference from oneDNN, and which one training uses
(:data:`nvae.speedups.depthwise.SMALL_MAP`).
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from _common import describe_cpu, median_ms, model_conv_shapes, shape_benchmark_args

from nvae.speedups.depthwise import SMALL_MAP, depthwise_weight_grad


def as_grouped_conv(grad_out: torch.Tensor, x: torch.Tensor, padding) -> torch.Tensor:
    """The same gradient as one grouped convolution: channel c's group takes the padded input's N
    images of channel c as its input channels and grad_out's as its (H x W) kernel; a k x k output."""
    n, c = x.shape[:2]
    ph, pw = padding
    xp = F.pad(x, (pw, pw, ph, ph)).transpose(0, 1).reshape(1, c * n, x.shape[2] + 2 * ph, x.shape[3] + 2 * pw)
    out = F.conv2d(xp, grad_out.transpose(0, 1), None, 1, 0, 1, c)
    return out.view(c, 1, *out.shape[-2:])


def main(argv=None) -> None:
    a, cfg = shape_benchmark_args(argv, __doc__, repeats=10)
    shapes = [s for s in model_conv_shapes(cfg, a.batch) if s.groups == s.c_in == s.c_out and s.groups > 1
              and s.stride == (1, 1) and s.dilation == (1, 1)]
    print(f"# {describe_cpu()}")
    print(f"preset={a.preset} batch={a.batch} channels-last: depthwise weight gradient, median of {a.repeats}")
    print(f"{'shape':>34s} {'oneDNN ms':>10s} {'offsets ms':>10s} {'ratio':>6s} {'grouped ms':>10s} {'max diff':>9s}"
          "  training uses")
    for s in shapes:
        x = torch.randn(s.batch, s.c_in, *s.size).contiguous(memory_format=torch.channels_last)
        w = torch.randn(s.c_out, 1, *s.kernel).contiguous(memory_format=torch.channels_last)
        g = torch.randn(s.batch, s.c_out, *s.size).contiguous(memory_format=torch.channels_last)

        def onednn():
            return torch.ops.aten.convolution_backward(g, x, w, None, [1, 1], list(s.padding), [1, 1], False,
                                                       [0, 0], s.groups, [False, True, False])[1]

        def offsets():
            return depthwise_weight_grad(g, x, s.kernel, s.padding)

        def grouped():
            return as_grouped_conv(g, x, s.padding)

        reference = onednn()
        diff = max((reference - offsets()).abs().max().item(), (reference - grouped()).abs().max().item())
        t_dnn, t_off, t_grp = (median_ms(f, a.repeats) for f in (onednn, offsets, grouped))
        uses = "offsets" if s.size[0] * s.size[1] <= SMALL_MAP else "oneDNN"
        print(f"{s.label():>34s} {t_dnn:10.2f} {t_off:10.2f} {t_dnn / t_off:5.2f}x {t_grp:10.2f} {diff:9.1e}  {uses}")


if __name__ == "__main__":
    sys.exit(main())
