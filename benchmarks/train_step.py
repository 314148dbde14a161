"""Median seconds per NVAE training step and peak RSS.

A step is what training does every iteration: forward, the objective with KL
balancing, spectral and BN regularisation, backward, Adamax update.

    python benchmarks/train_step.py --preset mnist_small --batch 32
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time

import torch


def _rss_gb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024 ** 2


# The interpreter and torch: what every code pays, the official one too (before nvae is imported).
RSS_AFTER_TORCH = _rss_gb()

from _common import describe_cpu, peak_rss_gb, setup  # noqa: E402  (imports nvae)

from nvae import speedups  # noqa: E402
from nvae.speedups.compile import compile_loss  # noqa: E402
from nvae.speedups.cpu import tune_cpu_allocator  # noqa: E402
from nvae.training.objective import nvae_loss  # noqa: E402


def saved_for_backward(forward) -> int:
    """Bytes of the tensors autograd keeps for backward while ``forward`` runs (each storage once, no parameters)."""
    seen, total = set(), [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if not isinstance(t, torch.nn.Parameter) and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total[0] += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return total[0]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mnist_small")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--checkpointing", nargs="?", const="all", default=None,
                   help="recompute cells in backward: 'all' or comma-separated cell roles")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--recompute-bn", action="store_true",
                   help="store only BN inputs; recompute BN and Swish in backward (nvae.speedups.recompute_bn)")
    p.add_argument("--no-tune-allocator", action="store_true",
                   help="leave glibc's malloc thresholds alone (see nvae.speedups.cpu.tune_cpu_allocator)")
    a = p.parse_args(argv)
    tuned = False if a.no_tune_allocator else tune_cpu_allocator()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    cfg, model, opt, alpha, x = setup(a.preset, a.batch, device, a.channels_last)
    checkpointing = (True if a.checkpointing == "all" else tuple(a.checkpointing.split(","))) if a.checkpointing \
        else False
    speedups.apply(model, recompute_bn=a.recompute_bn, checkpointing=checkpointing)
    # --compile: nvae train --compile's loss, the forward pass and objective as one graph (the first step eager)
    loss_fn = compile_loss(model, nvae_loss) if a.compile else nvae_loss
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(a.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=a.precision == "fp16")

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        ctx = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        with ctx:
            out = loss_fn(model, x, beta=0.5, lam=1e-2, alpha=alpha)
        scaler.scale(out.loss).backward()
        scaler.step(opt)
        scaler.update()
        return out.loss.item()

    for _ in range(a.warmup):
        step()
    times = []
    for _ in range(a.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak_gb = peak_rss_gb()
    # (torch.compile traces its own saved tensors, which these hooks would not see)
    saved_mb = None if a.compile else saved_for_backward(
        lambda: nvae_loss(model, x, beta=0.5, lam=1e-2, alpha=alpha).loss) / 2 ** 20
    flags = " ".join(f for f, on in [("channels-last", a.channels_last), ("compile", a.compile),
                                     (f"checkpointing={a.checkpointing}", a.checkpointing),
                                     ("tuned-allocator", tuned), ("recompute-bn", a.recompute_bn)] if on)
    print(f"# {describe_cpu()}")
    print(f"preset={a.preset} batch={a.batch} device={device} precision={a.precision} {flags}".rstrip())
    print(f"median step: {statistics.median(times):.3f} s  "
          f"(min {min(times):.3f}, max {max(times):.3f}, n={len(times)})")
    print(f"peak RSS: {peak_gb:.2f} GB; working memory (peak RSS - RSS after import torch): "
          f"{peak_gb - RSS_AFTER_TORCH:.2f} GB")
    if saved_mb is not None:
        print(f"activations saved for backward: {saved_mb:.0f} MB")
    if device.type == "cuda":
        print(f"peak CUDA memory: {torch.cuda.max_memory_allocated() / 1024 ** 3:.2f} GB")


if __name__ == "__main__":
    sys.exit(main())
