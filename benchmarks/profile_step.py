"""Where a training step's time goes: torch.profiler's self CPU time, by kind of operator.

    python benchmarks/profile_step.py --preset mnist_small --batch 32 --threads 1 --channels-last
    ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/profile_step.py ...   # the same on oneDNN's AVX2 kernels

Prints the CPU and ISA, the share of each kind (convolution forward and backward,
batch norm, element-wise, the spectral power iteration's matrix products, the
optimiser, the rest) and the operators that take the most time. Self time: an
operator's own time, without the operators it calls, so the shares add up to the
step.
"""
from __future__ import annotations

import argparse
import collections
import re
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from _common import describe_cpu, setup

from nvae import speedups
from nvae.speedups.cpu import tune_cpu_allocator
from nvae.training.objective import nvae_loss

# First match wins: the order puts the specific names before the generic ones.
KINDS = [
    ("convolution", r"conv|mkldnn_convolution"),
    ("batch norm", r"batch_norm"),
    ("matrix products and norms (power iteration)", r"bmm|\bmm\b|addmm|matmul|linalg"),
    ("optimiser", r"optimizer|adamax|_foreach|lerp"),
    ("element-wise", r"\b(mul|div|add|sub|neg|exp|log|sqrt|rsqrt|pow|sigmoid|silu|elu|tanh|softplus|clamp|"
                     r"where|abs|reciprocal|copy|fill|zero|masked_fill|maximum|minimum|lt|gt|le|ge|eq|ne)_?\b"),
    ("reductions", r"sum|mean|norm|logsumexp|max|min|var|std"),
    ("layout and memory", r"empty|clone|contiguous|cat|stack|slice|select|view|reshape|permute|transpose|"
                          r"as_strided|expand|unsqueeze|squeeze|index|to\b|_to_copy|pad"),
]


def kind_of(name: str) -> str:
    """The kind of an operator named ``name`` (e.g. 'aten::mul_'); 'other' when none of :data:`KINDS` matches."""
    op = name.split("::")[-1]
    for kind, pattern in KINDS:
        if re.search(pattern, op, re.IGNORECASE):
            return kind
    return "other"


def profile_steps(step, steps: int):
    """The profiler's key averages over ``steps`` calls of ``step``."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return prof.key_averages()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mnist_small")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="profiled steps (after 2 warm-up steps)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--recompute-bn", action="store_true")
    p.add_argument("--top", type=int, default=15, help="operators listed")
    a = p.parse_args(argv)
    tune_cpu_allocator()
    torch.set_num_threads(a.threads)
    cfg, model, opt, alpha, x = setup(a.preset, a.batch, torch.device("cpu"), a.channels_last)
    speedups.apply(model, recompute_bn=a.recompute_bn)

    def step():
        opt.zero_grad(set_to_none=True)
        nvae_loss(model, x, beta=0.5, lam=1e-2, alpha=alpha).loss.backward()
        opt.step()

    for _ in range(2):
        step()
    events = [e for e in profile_steps(step, a.steps) if not e.key.startswith(("ProfilerStep", "autograd::"))]
    total = sum(e.self_cpu_time_total for e in events)
    by_kind = collections.Counter()
    for e in events:
        by_kind[kind_of(e.key)] += e.self_cpu_time_total
    print(f"# {describe_cpu()}")
    flags = " ".join(f for f, on in [("channels-last", a.channels_last), ("recompute-bn", a.recompute_bn)] if on)
    print(f"preset={a.preset} batch={a.batch} threads={a.threads} {flags}: "
          f"{total / 1e6 / a.steps:.3f} s of operator time per step")
    print(f"{'kind':44s} {'s/step':>8s} {'share':>7s}")
    for kind, us in by_kind.most_common():
        print(f"{kind:44s} {us / 1e6 / a.steps:8.3f} {us / total:7.1%}")
    print(f"\n{'operator':44s} {'kind':22s} {'s/step':>8s} {'share':>7s} {'calls':>7s}")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:a.top]:
        print(f"{e.key[:44]:44s} {kind_of(e.key)[:22]:22s} {e.self_cpu_time_total / 1e6 / a.steps:8.3f} "
              f"{e.self_cpu_time_total / total:7.1%} {e.count // a.steps:7d}")


if __name__ == "__main__":
    sys.exit(main())
