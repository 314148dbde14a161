"""Training: the official recipe (NVAE.md sections 2-3) as a readable loop.

``train(model_config, train_config, run_dir)`` writes a run directory: both
configs as JSON, ``checkpoint.pt``, TensorBoard ``events.*``, sample and
reconstruction grids, and ``log.txt``.
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
from torch.utils.data import DataLoader

from .config import NVAEConfig
from .data import build_dataset, prepare_batch
from .model import NVAE
from .objective import kl_balance_alpha, kl_coefficient, nvae_loss, regularization_coefficient

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
    from torchvision.utils import save_image
    scale = max(1, min_side // (images.shape[-1] * 8))
    if scale > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
    tmp = path.with_name(f".{path.name}.tmp")
    save_image(images.float().clamp(0, 1), tmp, nrow=int(math.sqrt(images.shape[0])), padding=1, format="png")
    tmp.replace(path)


def train(model_config: NVAEConfig, train_config: TrainConfig, run_dir: str | Path, data_root: Optional[str] = None,
          device: str | torch.device = "cpu", progress: bool = True) -> NVAE:
    """Train a model as the official code does and return it (in eval mode)."""
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    cfg, device = train_config, torch.device(device)
    gen = seed_everything(cfg.seed)
    # Data problems are reported before anything is written.
    data = build_dataset(cfg.dataset, "train", data_root)
    test_data = build_dataset(cfg.dataset, "test", data_root)
    if len(data) < cfg.batch_size:
        raise ValueError(f"the training set has {len(data)} images, fewer than batch_size {cfg.batch_size}")
    shape = tuple(data[0][0].shape)
    expected = (model_config.in_channels, model_config.image_size, model_config.image_size)
    if shape != expected:
        raise ValueError(f"data set {cfg.dataset!r} yields images of shape {shape} but the model expects "
                         f"{expected}; pick the matching preset or override in_channels / image_size")

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model_config.to_json(run_dir / "model_config.json")
    (run_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    handler = logging.FileHandler(run_dir / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=True, drop_last=True, generator=gen)
    steps_per_epoch = len(loader)
    total_steps = steps_per_epoch * cfg.epochs
    last_step = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps

    model = NVAE(model_config).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.set_checkpointing(cfg.checkpointing)
    opt = torch.optim.Adamax(model.parameters(), lr=cfg.learning_rate, eps=1e-3, weight_decay=cfg.weight_decay)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    alpha = kl_balance_alpha(model_config.groups_per_scale).to(device)
    writer = SummaryWriter(str(run_dir))
    fixed = next(iter(DataLoader(test_data, batch_size=16)))[0]
    log.info("model %s params, %s groups per scale, %d steps (%d per epoch)",
             f"{sum(p.numel() for p in model.parameters()):,}", list(model_config.groups_per_scale), last_step,
             steps_per_epoch)

    step, skipped = 0, 0
    bar = tqdm(total=last_step, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    t_start = time.perf_counter()
    model.train()
    while step < last_step:
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
            opt.zero_grad(set_to_none=True)
            ctx = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
            with ctx:
                out = nvae_loss(model, x, beta, lam, alpha, cfg.kl_balance)
            scaler.scale(out.loss).backward()
            scaler.unscale_(opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
            if torch.isfinite(out.loss) and torch.isfinite(grad_norm):
                scaler.step(opt)
            else:
                skipped += 1
            scaler.update()
            step += 1
            nelbo = out.nelbo.mean().item()
            bar.update(1)
            bar.set_postfix(nelbo=f"{nelbo:.2f}", kl=f"{out.kl.sum(1).mean().item():.2f}",
                            steps_s=f"{step / (time.perf_counter() - t_start):.1f}")
            if step % cfg.log_every == 0 or step == last_step:
                _log_scalars(writer, step, out, beta, lr, lam, grad_norm, skipped)
                log.info("step %d nelbo %.4f recon %.4f kl %.4f beta %.4f lr %.2e", step, nelbo,
                         out.recon.mean().item(), out.kl.sum(1).mean().item(), beta, lr)
            if step % cfg.image_every == 0 or step == last_step:
                _write_images(model, fixed.to(device), run_dir, writer, step)
                model.train()
            if step % cfg.checkpoint_every == 0 or step == last_step:
                model.save(run_dir / "checkpoint.pt", train_config=cfg.to_dict(), step=step,
                           optimizer=opt.state_dict())
    bar.close()
    writer.close()
    log.removeHandler(handler)
    handler.close()
    return model.eval()


def _log_scalars(writer, step, out, beta, lr, lam, grad_norm, skipped) -> None:
    writer.add_scalar("train/nelbo", out.nelbo.mean().item(), step)
    writer.add_scalar("train/recon", out.recon.mean().item(), step)
    writer.add_scalar("train/kl", out.kl.sum(1).mean().item(), step)
    writer.add_scalar("train/kl_coeff", beta, step)
    writer.add_scalar("train/lr", lr, step)
    writer.add_scalar("train/lambda", lam, step)
    writer.add_scalar("train/spectral_loss", out.spectral.item(), step)
    writer.add_scalar("train/bn_loss", out.batchnorm.item(), step)
    writer.add_scalar("train/grad_norm", grad_norm.item(), step)
    writer.add_scalar("train/skipped_steps", skipped, step)
    kl_groups = out.kl.mean(0)
    active = (out.kl_per_channel.mean(0) > 0.1).sum(1)   # the official threshold, per latent channel
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
