"""Does fusing the element-wise chains pay on this CPU? BN -> Swish, eager against ``torch.compile``.

    python benchmarks/fusion.py --preset mnist_small --batch 32 --threads 1
    ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/fusion.py ...

Outside the convolutions, most of a training step's element-wise work is the
BN -> Swish chains of the cells (batch statistics, normalisation, Swish, and their
backward passes). This runs one training step of the preset with hooks to find
every BN that feeds a Swish and its input shape, then times that chain's forward
and backward pass at each shape, op by op (eager) and as one ``torch.compile``d
function (Inductor fuses it into one loop per pass), and prints the per-shape
times, the compile time, and the total over one step (each shape weighted by the
number of such chains in the model). The gradients of both are checked against
each other. Compiled code is cached by Inductor on disk, so a second run
measures without compiling.
"""
from __future__ import annotations

import argparse
import collections
import sys
import time

import torch
import torch.nn.functional as F

from _common import describe_cpu, median_ms, setup

from nvae.model.cells import InvertedResidual, ResConv
from nvae.speedups.cpu import tune_cpu_allocator


def bn_swish(x, weight, bias, running_mean, running_var):
    """Training-mode BN with NVAE's momentum and eps, then Swish."""
    return F.silu(F.batch_norm(x, running_mean, running_var, weight, bias, True, 0.05, 1e-5))


def chain_shapes(preset: str, batch: int, channels_last: bool) -> collections.Counter:
    """Input shapes of the model's BN -> Swish chains, with how often each occurs in one forward pass."""
    _, model, _, _, x = setup(preset, batch, torch.device("cpu"), channels_last)
    shapes: collections.Counter = collections.Counter()

    def record(bn):
        return lambda module, inputs: shapes.update([tuple(inputs[0].shape)])

    for m in model.modules():
        if isinstance(m, InvertedResidual):
            for bn in (m.bn_expand, m.bn_depthwise):
                bn.register_forward_pre_hook(record(bn))
        elif isinstance(m, ResConv) and m.bn is not None and m.activation is F.silu:
            m.bn.register_forward_pre_hook(record(m.bn))
    with torch.no_grad():
        model(x)
    return shapes


def time_shape(shape, channels_last: bool, compiled, repeats: int):
    """``(eager ms, compiled ms, compile s, max gradient difference)`` of one chain's forward + backward."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    c = shape[1]
    x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_()
    weight, bias = torch.rand(c, requires_grad=True), torch.randn(c, requires_grad=True)
    grad_out = torch.randn(shape).contiguous(memory_format=fmt)

    def step(fn):
        return torch.autograd.grad(fn(x, weight, bias, torch.zeros(c), torch.ones(c)), (x, weight, bias), grad_out)

    t0 = time.perf_counter()
    got = step(compiled)
    compile_s = time.perf_counter() - t0
    want = step(bn_swish)
    diff = max((a - b).abs().max().item() for a, b in zip(got, want))
    return median_ms(lambda: step(bn_swish), repeats), median_ms(lambda: step(compiled), repeats), compile_s, diff


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mnist_small")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--nchw", action="store_true", help="NCHW instead of channels-last")
    a = p.parse_args(argv)
    tune_cpu_allocator()
    torch.set_num_threads(a.threads)
    shapes = chain_shapes(a.preset, a.batch, not a.nchw)
    # One compiled graph per shape, as a model compiled for fixed shapes would have: more than
    # dynamo's default limit of recompilations of one function.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(shapes))
    compiled = torch.compile(bn_swish, dynamic=False)
    print(f"# {describe_cpu()}")
    print(f"preset={a.preset} batch={a.batch} {'NCHW' if a.nchw else 'channels-last'}: "
          f"BN -> Swish forward + backward, eager vs torch.compile")
    print(f"{'shape':>22s} {'chains':>6s} {'eager ms':>9s} {'compiled':>9s} {'ratio':>6s} {'compile s':>9s} "
          f"{'grad diff':>9s}")
    total_eager = total_compiled = 0.0
    for shape, n in sorted(shapes.items(), key=lambda kv: -kv[1] * torch.Size(kv[0]).numel()):
        eager, comp, compile_s, diff = time_shape(shape, not a.nchw, compiled, a.repeats)
        total_eager += n * eager
        total_compiled += n * comp
        print(f"{str(list(shape)):>22s} {n:6d} {eager:9.2f} {comp:9.2f} {eager / comp:5.2f}x {compile_s:9.1f} "
              f"{diff:9.1e}")
    print(f"one step's chains: eager {total_eager:.0f} ms, compiled {total_compiled:.0f} ms "
          f"(compiled is {total_eager / total_compiled:.2f}x the eager speed)")


if __name__ == "__main__":
    sys.exit(main())
