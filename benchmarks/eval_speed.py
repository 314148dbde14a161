"""Images per second of importance-weighted evaluation: K samples folded into the batch
(``NVAE.log_likelihood``) with and without BN folded into the separable cells (:mod:`nvae.speedups.folded_eval`),
against the official code's loop of K forward passes op by op; same model, one run.

    python benchmarks/eval_speed.py --preset mnist_small --num-samples 100 --batch 16
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from _common import describe_cpu

from nvae import NVAE, NVAEConfig, speedups
from nvae.speedups.cpu import tune_cpu_allocator


@torch.no_grad()
def looped(model: NVAE, x: torch.Tensor, k: int) -> torch.Tensor:
    """The official estimator's structure: one forward pass of the batch per sample."""
    log_w = []
    for _ in range(k):
        out = model(x)
        log_w.append(-out.recon - out.log_q + out.log_p)
    return torch.logsumexp(torch.stack(log_w), dim=0) - math.log(k)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mnist_small")
    p.add_argument("--num-samples", type=int, default=100)
    p.add_argument("--batch", type=int, default=16, help="images per evaluation batch (the official test batch)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="images per folded forward pass (default: the library's, 64 on CPU)")
    p.add_argument("--channels-last", action="store_true")
    a = p.parse_args(argv)
    tune_cpu_allocator()
    torch.manual_seed(0)
    cfg = NVAEConfig.preset(a.preset)
    model = speedups.apply(NVAE(cfg)).eval()   # as every command runs it
    x = torch.rand(a.batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    x = (x > 0.5).float() if cfg.decoder == "bernoulli" else torch.floor(x * 255) / 255
    if a.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    model.log_likelihood(x[:2], num_samples=2)          # warm up kernels and allocator
    t_fold = _timed(lambda: model.log_likelihood(x, num_samples=a.num_samples, max_batch=a.max_batch))
    speedups.apply(model, folded_eval=False)
    t_ours = _timed(lambda: model.log_likelihood(x, num_samples=a.num_samples, max_batch=a.max_batch))
    t_loop = _timed(lambda: looped(model, x, a.num_samples))
    print(f"# {describe_cpu()}")
    print(f"preset={a.preset} K={a.num_samples} batch={a.batch} max_batch={a.max_batch}"
          f"{' channels-last' if a.channels_last else ''}")
    print(f"batched K, BN folded : {a.batch / t_fold:8.2f} images/s   ({t_fold:.1f} s)")
    print(f"batched K, op by op  : {a.batch / t_ours:8.2f} images/s   ({t_ours:.1f} s)")
    print(f"looped K, op by op   : {a.batch / t_loop:8.2f} images/s   ({t_loop:.1f} s; the official structure)")
    print(f"speed-up over looped : {t_loop / t_fold:.2f}x folded, {t_loop / t_ours:.2f}x op by op")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    sys.exit(main())
