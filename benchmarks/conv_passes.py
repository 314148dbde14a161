"""Where a training step's convolution time goes: forward, input gradient and weight gradient of every shape.

    python benchmarks/conv_passes.py --preset mnist_small --batch 32 --threads 2
    ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/conv_passes.py ...      # oneDNN's AVX2 kernels on any x86 CPU

For each distinct convolution one training forward pass of the preset applies
(channels-last, as ``--channels-last`` trains), prints how many times a step runs
it and the median time of its three passes: the forward (``F.conv2d``), the input
gradient and the weight gradient (``aten.convolution_backward``, one at a time),
with the weight gradient computed the way training computes it (the offset sums
of :mod:`nvae.speedups.depthwise` on small depthwise maps, oneDNN elsewhere). Then the
step's totals (time x count) by kind of convolution and pass. The forward and
the input gradient cost the same multiply-adds as the weight gradient, so the
ratio of the weight gradient to the forward says how far a kernel is from its
fair share.
"""
from __future__ import annotations

import collections
import sys
from typing import Dict, Tuple

import torch
import torch.nn.functional as F

from _common import ConvShape, describe_cpu, median_ms, model_conv_counts, shape_benchmark_args

from nvae.speedups.depthwise import depthwise_weight_grad, takes_offset_sums

PASSES = ("forward", "input grad", "weight grad")


def kind(s: ConvShape) -> str:
    """'depthwise', '1x1' or 'KxK' (the kernel size of a dense or grouped convolution)."""
    if s.groups > 1 and s.groups == s.c_in == s.c_out:
        return "depthwise"
    return "1x1" if s.kernel == (1, 1) else f"{s.kernel[0]}x{s.kernel[1]}"


def time_passes(s: ConvShape, repeats: int) -> Tuple[float, float, float]:
    """Median ms of the forward, input gradient and weight gradient of one convolution of shape ``s``."""
    cl = torch.channels_last
    x = torch.randn(s.batch, s.c_in, *s.size).contiguous(memory_format=cl)
    w = torch.randn(s.c_out, s.c_in // s.groups, *s.kernel).contiguous(memory_format=cl)
    geometry = (list(s.stride), list(s.padding), list(s.dilation))
    g = torch.randn_like(F.conv2d(x, w, None, *geometry, s.groups)).contiguous(memory_format=cl)

    def grad(which: int):
        mask = [which == 0, which == 1, False]
        return torch.ops.aten.convolution_backward(g, x, w, None, *geometry, False, [0, 0], s.groups, mask)[which]

    if takes_offset_sums(x, w, s.stride, s.padding, s.dilation, s.groups):
        def weight_grad():
            return depthwise_weight_grad(g, x, s.kernel, s.padding)
    else:
        def weight_grad():
            return grad(1)
    return (median_ms(lambda: F.conv2d(x, w, None, *geometry, s.groups), repeats),
            median_ms(lambda: grad(0), repeats), median_ms(weight_grad, repeats))


def totals(rows: Dict[ConvShape, Tuple[int, Tuple[float, float, float]]]) -> Dict[str, list]:
    """Per kind of convolution, the step's ms in each pass (time x count)."""
    out: Dict[str, list] = collections.defaultdict(lambda: [0.0, 0.0, 0.0])
    for s, (count, times) in rows.items():
        for i, t in enumerate(times):
            out[kind(s)][i] += count * t
    return dict(out)


def main(argv=None) -> None:
    a, cfg = shape_benchmark_args(argv, __doc__, repeats=5)
    counts = model_conv_counts(cfg, a.batch)
    print(f"# {describe_cpu()}")
    print(f"preset={a.preset} batch={a.batch} channels-last: median ms of {a.repeats}, per convolution")
    print(f"{'count':>5s} {'shape':>42s} {'forward':>8s} {'in grad':>8s} {'w grad':>8s} {'w/fwd':>6s}")
    rows = {}
    for s, count in sorted(counts.items(), key=lambda kv: -kv[1]):
        times = time_passes(s, a.repeats)
        rows[s] = (count, times)
        print(f"{count:5d} {s.label():>42s} {times[0]:8.2f} {times[1]:8.2f} {times[2]:8.2f} "
              f"{times[2] / times[0]:5.1f}x")
    per_kind = totals(rows)
    print(f"step totals, ms (time x count): {'  '.join(f'{name:>11s}' for name in PASSES)}  {'all':>8s}")
    for name, ms in sorted(per_kind.items(), key=lambda kv: -sum(kv[1])):
        print(f"{name:>30s}: {'  '.join(f'{t:11.1f}' for t in ms)}  {sum(ms):8.1f}")
    overall = [sum(ms[i] for ms in per_kind.values()) for i in range(3)]
    print(f"{'all':>30s}: {'  '.join(f'{t:11.1f}' for t in overall)}  {sum(overall):8.1f}")


if __name__ == "__main__":
    sys.exit(main())
