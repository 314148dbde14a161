"""Training: the official recipe (NVAE.md sections 2-3) as a readable loop.

``train(model_config, train_config, run_dir)`` writes a run directory: both
configs as JSON, ``checkpoint.pt``, TensorBoard ``events.*``, sample and
reconstruction grids, and ``log.txt``.

Started by ``torchrun --nproc_per_node N -m nvae train ...`` every process runs
the same loop on its own ``batch_size`` images (the official per-GPU batch)
with DistributedDataParallel and synchronised BN (:mod:`nvae.distributed`);
only rank 0 writes the run directory.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from .checkpoint import save_png
from .config import NVAEConfig
from .data import build_dataset, prepare_batch
from .distributed import DistributedContext, init_distributed, wrap_model
from .model import NVAE
from .objective import Loss, kl_balance_alpha, kl_coefficient, nvae_loss, regularization_coefficient

log = logging.getLogger("nvae.train")


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation recipe. Defaults are the official ``train.py`` defaults."""

    dataset: str = "digits"
    epochs: int = 200
    batch_size: int = 200
    learning_rate: float = 1e-2
    learning_rate_min: float = 1e-4
    weight_decay: float = 3e-4
    warmup_epochs: int = 5
    weight_decay_norm: float = 1e-2
    weight_decay_norm_init: float = 10.0
    weight_decay_norm_anneal: bool = False
    kl_anneal_portion: float = 0.3
    kl_const_portion: float = 1e-4
    kl_const_coeff: float = 1e-4
    kl_balance: bool = True
    seed: int = 1
    max_steps: Optional[int] = None      #: stop early (the schedules still follow ``epochs``)
    max_minutes: Optional[float] = None  #: stop after this much wall-clock training time
    flip: Optional[bool] = None          #: horizontal flips of training images (None: the data set's default)
    precision: str = "fp32"
    channels_last: bool = False
    checkpointing: bool = False
    log_every: int = 50
    image_every: int = 500
    checkpoint_every: int = 1000

    def __post_init__(self):
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.batch_size < 1 or self.epochs < 1:
            raise ValueError("batch_size and epochs must be >= 1")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        return cls(**data)

    @classmethod
    def preset(cls, name: str, **overrides) -> "TrainConfig":
        if name not in TRAIN_PRESETS:
            raise ValueError(f"no training preset {name!r}; choose one of {sorted(TRAIN_PRESETS)}")
        return dataclasses.replace(TRAIN_PRESETS[name], **overrides)


#: Official per-data-set recipes (NVAE.md section 5; per-GPU batch sizes).
TRAIN_PRESETS = {
    "digits": TrainConfig(dataset="digits", epochs=60, batch_size=64, warmup_epochs=2, image_every=250),
    "mnist": TrainConfig(dataset="mnist", epochs=400, batch_size=200, weight_decay_norm=1e-2),
    "mnist_small": TrainConfig(dataset="mnist", epochs=400, batch_size=200, weight_decay_norm=1e-2),
    "cifar10": TrainConfig(dataset="cifar10", epochs=400, batch_size=32, weight_decay_norm=1e-2),
    "celeba64": TrainConfig(dataset="celeba64", epochs=90, batch_size=16, weight_decay_norm=1e-1),
    "imagenet32": TrainConfig(dataset="imagenet32", epochs=45, batch_size=24, weight_decay_norm=1e-2,
                              weight_decay_norm_init=1.0, weight_decay_norm_anneal=True),
    "celebahq256": TrainConfig(dataset="celebahq256", epochs=300, batch_size=4, weight_decay_norm=1e-2,
                               weight_decay_norm_init=1.0, weight_decay_norm_anneal=True),
    "ffhq256": TrainConfig(dataset="ffhq256", epochs=200, batch_size=4, learning_rate=8e-3,
                           weight_decay_norm=1e-1, weight_decay_norm_init=1.0, weight_decay_norm_anneal=True),
}


def learning_rate(step: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup_epochs``, then per-epoch cosine decay to ``learning_rate_min``."""
    warmup = cfg.warmup_epochs * steps_per_epoch
    if step < warmup:
        return cfg.learning_rate * step / warmup
    span = max(cfg.epochs - cfg.warmup_epochs - 1, 1)
    done = min(max(step // steps_per_epoch - cfg.warmup_epochs, 0), span)
    return cfg.learning_rate_min + (cfg.learning_rate - cfg.learning_rate_min) * (1 + math.cos(math.pi * done / span)) / 2


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _save_grid(images: torch.Tensor, path: Path, min_side: int = 128) -> None:
    """A PNG grid, scaled up (nearest) so small images stay visible; written atomically."""
    scale = max(1, min_side // (images.shape[-1] * 8))
    if scale > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
    save_png(images, path, nrow=int(math.sqrt(images.shape[0])), padding=1)


def _rank_seed(seed: int, rank: int) -> int:
    """A seed of its own for each process, derived from the run's seed."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def train_step(net, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, x: torch.Tensor, beta: float,
               lam: float, alpha: Optional[torch.Tensor], balance: bool = True, dtype: Optional[torch.dtype] = None,
               dist_ctx: Optional[DistributedContext] = None):
    """One optimisation step: loss, backward, gradient norm, and the update unless something is non-finite.

    ``net`` is what :func:`~nvae.objective.nvae_loss` takes: the model, or its
    DDP wrapper (:func:`~nvae.distributed.wrap_model`). Returns the loss terms
    (of this process's images), the gradient norm (of the gradients averaged
    over the processes) and whether the optimiser stepped. A step whose loss or
    gradient norm is non-finite on *any* process is skipped on all of them, so
    the replicas never drift apart.
    """
    opt.zero_grad(set_to_none=True)
    amp = torch.autocast(x.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    with amp:
        out = nvae_loss(net, x, beta, lam, alpha, balance)
    scaler.scale(out.loss).backward()
    scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), float("inf"))
    bad = not (torch.isfinite(out.loss) and torch.isfinite(grad_norm))
    if dist_ctx is not None:
        bad = dist_ctx.any(bad)
    if not bad:
        scaler.step(opt)
    scaler.update()
    return out, grad_norm, not bad


def train(model_config: NVAEConfig, train_config: TrainConfig, run_dir: str | Path, data_root: Optional[str] = None,
          device: str | torch.device = "cpu", progress: bool = True) -> NVAE:
    """Train a model as the official code does and return it (in eval mode).

    Under torchrun (``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set) every process
    calls this: each trains on ``batch_size`` images per step from its share of
    the data set (the global batch is ``batch_size`` x processes), CUDA processes
    on ``cuda:LOCAL_RANK``, and only rank 0 writes ``run_dir``.
    """
    dist_ctx = init_distributed(device)
    try:
        return _train(model_config, train_config, Path(run_dir), data_root, dist_ctx, progress)
    finally:
        dist_ctx.close()


def _train(model_config: NVAEConfig, cfg: TrainConfig, run_dir: Path, data_root: Optional[str],
           dist_ctx: DistributedContext, progress: bool) -> NVAE:
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    device, main, world = dist_ctx.device, dist_ctx.is_main, dist_ctx.world_size
    # Seeded identically on every process, so all build the same initial model.
    gen = seed_everything(cfg.seed)
    # Data problems are reported before anything is written.
    opts = dict(image_size=model_config.image_size, channels=model_config.in_channels, flip=cfg.flip)
    data = build_dataset(cfg.dataset, "train", data_root, **opts)
    test_data = build_dataset(cfg.dataset, "test", data_root, **opts)
    if len(data) // world < cfg.batch_size:
        share = f" ({len(data) // world} per process for {world} processes)" if world > 1 else ""
        raise ValueError(f"the training set has {len(data)} images{share}, fewer than batch_size {cfg.batch_size}")
    shape = tuple(data[0][0].shape)
    expected = (model_config.in_channels, model_config.image_size, model_config.image_size)
    if shape != expected:
        raise ValueError(f"data set {cfg.dataset!r} yields images of shape {shape} but the model expects "
                         f"{expected}; pick the matching preset or override in_channels / image_size")

    handler = None
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        model_config.to_json(run_dir / "model_config.json")
        (run_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        handler = logging.FileHandler(run_dir / "log.txt")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    sampler = None
    if dist_ctx.enabled:
        # Same permutation on every process (seed + epoch), each taking its own slice;
        # each binarises its images with a stream of its own.
        sampler = DistributedSampler(data, num_replicas=world, rank=dist_ctx.rank, shuffle=True, seed=cfg.seed,
                                     drop_last=True)
        gen = torch.Generator().manual_seed(_rank_seed(cfg.seed, dist_ctx.rank))
        loader = DataLoader(data, batch_size=cfg.batch_size, sampler=sampler, drop_last=True, generator=gen)
    else:
        loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=True, drop_last=True, generator=gen)
    steps_per_epoch = len(loader)
    total_steps = steps_per_epoch * cfg.epochs
    last_step = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps

    model = NVAE(model_config).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.set_checkpointing(cfg.checkpointing)
    net = wrap_model(model, dist_ctx)
    opt = torch.optim.Adamax(model.parameters(), lr=cfg.learning_rate, eps=1e-3, weight_decay=cfg.weight_decay)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    alpha = kl_balance_alpha(model_config.groups_per_scale).to(device)
    writer = SummaryWriter(str(run_dir)) if main else None
    fixed = next(iter(DataLoader(test_data, batch_size=16)))[0]
    if dist_ctx.enabled:
        # Posterior noise: independent across processes (their images differ too).
        torch.manual_seed(_rank_seed(cfg.seed, dist_ctx.rank))
    if main:
        log.info("model %s params, %s groups per scale, %d steps (%d per epoch)",
                 f"{sum(p.numel() for p in model.parameters()):,}", list(model_config.groups_per_scale), last_step,
                 steps_per_epoch)
        if dist_ctx.enabled:
            log.info("%d processes (%s), %d images per process, global batch %d", world, dist.get_backend(),
                     cfg.batch_size, world * cfg.batch_size)
    extra = {"world_size": world} if dist_ctx.enabled else {}

    step, skipped, epoch = 0, 0, 0
    bar = tqdm(total=last_step, desc="train", unit="step", disable=not (progress and main), dynamic_ncols=True)
    t_start = time.perf_counter()
    net.train()
    while step < last_step:
        if sampler is not None:
            sampler.set_epoch(epoch)
        epoch += 1
        for (x,) in loader:
            if step >= last_step:
                break
            x = prepare_batch(x, model_config.decoder, model_config.num_x_bits, gen).to(device)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            lr = learning_rate(step, steps_per_epoch, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            beta = kl_coefficient(step, total_steps, cfg.kl_anneal_portion, cfg.kl_const_portion, cfg.kl_const_coeff)
            lam = regularization_coefficient(beta, cfg.weight_decay_norm, cfg.weight_decay_norm_init,
                                             cfg.weight_decay_norm_anneal)
            out, grad_norm, stepped = train_step(net, opt, scaler, x, beta, lam, alpha, cfg.kl_balance, dtype,
                                                 dist_ctx)
            if not stepped:
                skipped += 1
            step += 1
            if cfg.max_minutes is not None:
                # every rank stops at the same step
                if dist_ctx.any(time.perf_counter() - t_start > 60 * cfg.max_minutes):
                    last_step = step
            stats = _batch_means(out, dist_ctx)
            nelbo = stats["nelbo"].item()
            bar.update(1)
            bar.set_postfix(nelbo=f"{nelbo:.2f}", kl=f"{stats['kl'].item():.2f}",
                            steps_s=f"{step / (time.perf_counter() - t_start):.1f}")
            if main and (step % cfg.log_every == 0 or step == last_step):
                _log_scalars(writer, step, out, stats, beta, lr, lam, grad_norm, skipped)
                log.info("step %d nelbo %.4f recon %.4f kl %.4f beta %.4f lr %.2e", step, nelbo,
                         stats["recon"].item(), stats["kl"].item(), beta, lr)
            if main and (step % cfg.image_every == 0 or step == last_step):
                _write_images(model, fixed.to(device), run_dir, writer, step)
                model.train()
            if main and (step % cfg.checkpoint_every == 0 or step == last_step):
                model.save(run_dir / "checkpoint.pt", train_config=cfg.to_dict(), step=step,
                           optimizer=opt.state_dict(), **extra)
    bar.close()
    if main:
        writer.close()
        log.removeHandler(handler)
        handler.close()
    return model.eval()


def _batch_means(out: Loss, dist_ctx: DistributedContext) -> dict:
    """Per-image averages of the loss terms over the whole batch (all processes; equal shares)."""
    parts = {"nelbo": out.nelbo.mean(), "recon": out.recon.mean(), "kl": out.kl.sum(1).mean(),
             "kl_groups": out.kl.mean(0), "kl_channels": out.kl_per_channel.mean(0)}
    if not dist_ctx.enabled:
        return {k: v.detach() for k, v in parts.items()}
    # One collective for all of them.
    flat = dist_ctx.mean(torch.cat([v.detach().float().reshape(-1) for v in parts.values()]))
    sizes = [v.numel() for v in parts.values()]
    return {k: chunk.view(v.shape) for (k, v), chunk in zip(parts.items(), flat.split(sizes))}


def _log_scalars(writer, step, out, stats, beta, lr, lam, grad_norm, skipped) -> None:
    writer.add_scalar("train/nelbo", stats["nelbo"].item(), step)
    writer.add_scalar("train/recon", stats["recon"].item(), step)
    writer.add_scalar("train/kl", stats["kl"].item(), step)
    writer.add_scalar("train/kl_coeff", beta, step)
    writer.add_scalar("train/lr", lr, step)
    writer.add_scalar("train/lambda", lam, step)
    writer.add_scalar("train/spectral_loss", out.spectral.item(), step)
    writer.add_scalar("train/bn_loss", out.batchnorm.item(), step)
    writer.add_scalar("train/grad_norm", grad_norm.item(), step)
    writer.add_scalar("train/skipped_steps", skipped, step)
    kl_groups = stats["kl_groups"]
    active = (stats["kl_channels"] > 0.1).sum(1)   # the official threshold, per latent channel
    for i in range(kl_groups.shape[0]):
        writer.add_scalar(f"kl/group_{i}", kl_groups[i].item(), step)
        writer.add_scalar(f"active/group_{i}", active[i].item(), step)
        writer.add_scalar(f"kl_balance/group_{i}", out.kl_coeffs[i].item(), step)


@torch.no_grad()
def _write_images(model: NVAE, fixed: torch.Tensor, run_dir: Path, writer, step: int) -> None:
    from torchvision.utils import make_grid
    model.eval()
    samples = model.sample(64, temperature=1.0, mean=True)
    _save_grid(samples, run_dir / "samples.png")
    writer.add_image("samples", make_grid(samples, nrow=8), step)
    x = prepare_batch(fixed, model.config.decoder, model.config.num_x_bits)
    recon = model.output_distribution(model(x, temperature=0.0).logits).mean()
    pairs = torch.stack([x, recon], dim=1).flatten(0, 1)
    _save_grid(pairs, run_dir / "reconstructions.png")
    writer.add_image("reconstructions", make_grid(pairs, nrow=8), step)
