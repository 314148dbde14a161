"""A training step in its parts, at several batch sizes: what grows with the batch and what does not.

    python benchmarks/step_parts.py --preset mnist_small --batches 1,32 --channels-last --threads 2

Per batch size, the median ms of the model's forward pass (encoder, decoder, KL
terms), the spectral regulariser (its power iteration and norm), the BN
regulariser, the backward pass of the whole objective, and Adamax, timed
separately within each step; then the ratio of each part between the largest and
the smallest batch. A part that barely grows is per-operation overhead (the
Python and dispatch cost of tens of thousands of small operator calls), which a
larger batch amortises and a faster kernel does not touch.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Dict

import torch

from _common import describe_cpu, setup

from nvae.speedups.cpu import tune_cpu_allocator

PARTS = ("forward", "spectral", "BN loss", "backward", "Adamax")


def time_parts(preset: str, batch: int, channels_last: bool, steps: int, warmup: int = 2,
               foreach: bool = False) -> Dict[str, float]:
    """Median ms of each of :data:`PARTS` over ``steps`` training steps (after ``warmup``);
    ``foreach``: Adamax's multi-tensor implementation instead of its per-tensor loop."""
    cfg, model, opt, alpha, x = setup(preset, batch, torch.device("cpu"), channels_last)
    for group in opt.param_groups:
        group["foreach"] = foreach
    samples = {name: [] for name in PARTS}

    def step() -> list:
        opt.zero_grad(set_to_none=True)
        t = [time.perf_counter()]
        out = model(x)
        t.append(time.perf_counter())
        spectral = model.spectral_loss()
        t.append(time.perf_counter())
        bn = model.batchnorm_loss()
        t.append(time.perf_counter())
        # The objective's reductions are negligible next to these parts (the loss's weighting is not timed).
        (out.recon.mean() + (alpha * out.kl).sum(1).mean() + 1e-2 * (spectral + bn)).backward()
        t.append(time.perf_counter())
        opt.step()
        t.append(time.perf_counter())
        return [b - a for a, b in zip(t, t[1:])]

    for _ in range(warmup):
        step()
    for _ in range(steps):
        for name, seconds in zip(PARTS, step()):
            samples[name].append(seconds * 1e3)
    return {name: statistics.median(v) for name, v in samples.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mnist_small")
    p.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--adamax-foreach", action="store_true",
                   help="Adamax's multi-tensor implementation (torch's default on CPU is the per-tensor loop)")
    a = p.parse_args(argv)
    batches = sorted({int(b) for b in a.batches.split(",")})
    if not batches or batches[0] < 1:
        p.error("--batches takes positive batch sizes, e.g. 1,32")
    tune_cpu_allocator()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"# {describe_cpu()}")
    flags = "".join(f" {name}" for name, on in [("channels-last", a.channels_last),
                                                 ("adamax-foreach", a.adamax_foreach)] if on)
    print(f"preset={a.preset}{flags}: median ms of {a.steps} steps")
    print(f"{'batch':>5s} " + " ".join(f"{name:>9s}" for name in PARTS) + f" {'step':>9s}")
    rows = {}
    for b in batches:
        rows[b] = time_parts(a.preset, b, a.channels_last, a.steps, foreach=a.adamax_foreach)
        print(f"{b:5d} " + " ".join(f"{rows[b][name]:9.1f}" for name in PARTS) + f" {sum(rows[b].values()):9.1f}")
    if len(batches) > 1:
        lo, hi = rows[batches[0]], rows[batches[-1]]
        print(f"{'x' + str(batches[-1] // batches[0]):>5s} " + " ".join(f"{hi[n] / lo[n]:8.1f}x" for n in PARTS)
              + f" {sum(hi.values()) / sum(lo.values()):8.1f}x")


if __name__ == "__main__":
    sys.exit(main())
