"""Evaluation over a data split: NELBO and the importance-weighted NLL (NVAE.md section 4)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch.utils.data import DataLoader, Dataset

from .data import prepare_batch
from .model import NVAE
from .objective import iw_bound


@dataclass
class EvalResult:
    """Averages over the evaluated images. NLL and NELBO in nats per image; bits/dim over the
    sub-pixels that enter the likelihood (MNIST: 28x28, as the paper reports)."""

    nll: float
    nelbo: float
    bpd: float
    bpd_elbo: float
    num_images: int
    num_samples: int
    data_dims: int

    def to_dict(self) -> dict:
        return {**asdict(self), "units": {"nll": "nats/image", "nelbo": "nats/image", "bpd": "bits/dim",
                                          "bpd_elbo": "bits/dim"}}


@torch.no_grad()
def evaluate(model: NVAE, data: Dataset, num_samples: int = 1000, batch_size: int = 16, max_batch: Optional[int] = None,
             max_images: Optional[int] = None, device: str | torch.device = "cpu",
             generator: Optional[torch.Generator] = None, progress: bool = True) -> EvalResult:
    """Importance-weighted NLL with K = ``num_samples`` and the NELBO over ``data`` (in eval mode).

    Images are prepared as in training (binarised afresh for the Bernoulli decoder, as the
    official test does; quantised to ``num_x_bits`` otherwise).
    """
    from tqdm import tqdm

    cfg = model.config
    loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    total = len(data) if max_images is None else min(max_images, len(data))
    nll_sum = nelbo_sum = 0.0
    seen = 0
    bar = tqdm(total=total, desc=f"eval K={num_samples}", unit="img", disable=not progress, dynamic_ncols=True)
    for (x,) in loader:
        if seen >= total:
            break
        x = x[: total - seen]
        x = prepare_batch(x, cfg.decoder, cfg.num_x_bits, generator).to(device)
        log_w, nelbo = model.importance_sample(x, num_samples, max_batch, generator)
        log_px = iw_bound(log_w.double())
        nll_sum += -log_px.sum().item()
        nelbo_sum += nelbo.double().mean(0).sum().item()
        seen += x.shape[0]
        bar.update(x.shape[0])
        bar.set_postfix(nll=f"{nll_sum / seen:.3f}")
    bar.close()
    nll, nelbo = nll_sum / seen, nelbo_sum / seen
    per_dim = 1.0 / (math.log(2.0) * cfg.num_data_dims)
    return EvalResult(nll=nll, nelbo=nelbo, bpd=nll * per_dim, bpd_elbo=nelbo * per_dim, num_images=seen,
                      num_samples=num_samples, data_dims=cfg.num_data_dims)


@dataclass
class KLStats:
    """Average KL per latent group over a split (nats per image) and active units per group:
    latent channels whose average KL exceeds ``threshold`` (0.1 nats, the official threshold)."""

    kl_per_group: list
    active_units: list
    units_per_group: int
    threshold: float
    num_images: int

    def to_dict(self) -> dict:
        return {**asdict(self), "units": {"kl_per_group": "nats/image"}}


@torch.no_grad()
def kl_statistics(model: NVAE, data: Dataset, batch_size: int = 64, max_images: Optional[int] = None,
                  threshold: float = 0.1, device: str | torch.device = "cpu",
                  generator: Optional[torch.Generator] = None, progress: bool = True) -> KLStats:
    """Per-group KL and active units of ``model`` over ``data`` (paper, Figure 5b), in eval mode."""
    from tqdm import tqdm
    cfg = model.config
    model.eval()
    loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    total = len(data) if max_images is None else min(max_images, len(data))
    kl_channels, seen = None, 0
    for (x,) in tqdm(loader, desc="kl-stats", disable=not progress, total=math.ceil(total / batch_size)):
        if seen >= total:
            break
        x = prepare_batch(x[: total - seen], cfg.decoder, cfg.num_x_bits, generator).to(device)
        part = model(x, generator=generator).kl_per_channel.double().sum(0)
        kl_channels = part if kl_channels is None else kl_channels + part
        seen += x.shape[0]
    mean = kl_channels / seen                                   # (L, channels)
    return KLStats(kl_per_group=mean.sum(1).tolist(), active_units=(mean > threshold).sum(1).tolist(),
                   units_per_group=mean.shape[1], threshold=threshold, num_images=seen)


def plot_kl_stats(stats: KLStats, path) -> None:
    """Bar plot of the KL per group (decoder order, coarsest first), written atomically as PNG."""
    import os
    from pathlib import Path

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    path = Path(path)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.3 * len(stats.kl_per_group)), 3))
    ax.bar(range(len(stats.kl_per_group)), stats.kl_per_group)
    ax.set_xlabel("latent group (coarsest first)")
    ax.set_ylabel("KL (nats per image)")
    ax.set_title(f"KL per group over {stats.num_images} images")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
