"""Images per second of importance-weighted evaluation: K samples folded into the batch
(``NVAE.log_likelihood``) against the official code's loop of K forward passes, same model, one run.

    python benchmarks/eval_speed.py --preset mnist_small --num-samples 100 --batch 16
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from nvae import NVAE, NVAEConfig
from nvae.runtime import describe_cpu, tune_cpu_allocator


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
    model = NVAE(cfg).eval()
    x = torch.rand(a.batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    x = (x > 0.5).float() if cfg.decoder == "bernoulli" else torch.floor(x * 255) / 255
    if a.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    model.log_likelihood(x[:2], num_samples=2)          # warm up kernels and allocator
    t0 = time.perf_counter()
    ours = model.log_likelihood(x, num_samples=a.num_samples, max_batch=a.max_batch)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    theirs = looped(model, x, a.num_samples)
    t_loop = time.perf_counter() - t0
    print(f"# {describe_cpu()}")
    print(f"preset={a.preset} K={a.num_samples} batch={a.batch} max_batch={a.max_batch}")
    print(f"batched K: {a.batch / t_ours:8.2f} images/s   ({t_ours:.1f} s)")
    print(f"looped K : {a.batch / t_loop:8.2f} images/s   ({t_loop:.1f} s)")
    print(f"speed-up : {t_loop / t_ours:.2f}x   (mean NLL {-ours.mean():.2f} vs {-theirs.mean():.2f} nats: "
          "same estimator, independent draws)")


if __name__ == "__main__":
    sys.exit(main())
