"""Sampling helpers: BN re-adjustment for low-temperature samples (paper, Section 5; the official ``evaluate.py``).

The official ``evaluate.py`` (``set_bn``) re-adjusts with the model in training mode under
``torch.cuda.amp.autocast`` (float16 on CUDA) for 500 steps: batches of 16 prior samples in its
``sample`` mode and of 2 in its ``evaluate_fid`` mode. (Its first release, which had no FID mode,
used batches of 36 in ``sample`` mode.) :func:`readjust_bn` defaults to 500 steps of 36 in float32,
which is ours (``nvae sample --readjust-bn``); ``autocast=True`` asks for the official float16
autocast where the model is on CUDA, and runs in float32 elsewhere (autocast in float16 exists only
on CUDA in the official code; nothing is emulated on CPU).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn as nn

from ..formats.checkpoint import (VIEWING_SIDE, CheckpointError, atomic_torch_save, atomic_write, model_fingerprint,
                                  safe_load, save_png)
from ..model.network import NVAE, Temperature, training_mode


def decoder_bn_layers(model: NVAE) -> Dict[str, nn.modules.batchnorm._BatchNorm]:
    """The BN layers the generative path uses (decoder tower and post-process), by name."""
    return {name: m for part in ("decoder_stages", "postprocess")
            for name, m in getattr(model, part).named_modules(prefix=part)
            if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def bn_autocast(model: NVAE, enabled: bool):
    """The context BN re-adjustment runs in: float16 autocast when ``enabled`` and ``model`` is on CUDA
    (the official ``set_bn``), else nothing (float32)."""
    if enabled and next(model.parameters()).device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def readjust_precision(model: NVAE, autocast: bool) -> str:
    """``"float16 autocast"`` or ``"float32"``: what :func:`readjust_bn` with ``autocast`` runs in for ``model``."""
    return "float16 autocast" if autocast and next(model.parameters()).device.type == "cuda" else "float32"


@torch.no_grad()
def readjust_bn(model: NVAE, temperature: Temperature, steps: int = 500, batch_size: int = 36,
                generator: Optional[torch.Generator] = None, progress: bool = False, autocast: bool = False) -> NVAE:
    """Re-estimate the decoder's BN running statistics from prior samples at ``temperature``.

    BN layers run in training mode for ``steps`` batches of ``batch_size`` prior samples
    (their batch statistics update the running averages with the usual momentum), then
    the model returns to eval mode. Only decoder BN statistics change; no weight does.
    The defaults (500 x 36, float32) are ours; the official numbers are in the module
    docstring. ``autocast``: float16 autocast on CUDA, as the official code (:func:`bn_autocast`).
    """
    from tqdm import tqdm
    with training_mode(model, True), bn_autocast(model, autocast):
        for _ in tqdm(range(steps), desc="BN re-adjustment", disable=not progress):
            model.sample_logits(batch_size, temperature, generator)
    return model.eval()


def bn_cache_path(checkpoint: Union[str, Path], temperature: Temperature, steps: int) -> Path:
    """Where the re-adjusted statistics of ``checkpoint`` at ``temperature`` are cached."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}.bn_{temperature_name(temperature)}_s{steps}.pt")


def readjust_bn_cached(model: NVAE, checkpoint: Union[str, Path], temperature: Temperature, steps: int = 500,
                       batch_size: int = 36, generator: Optional[torch.Generator] = None,
                       progress: bool = False, autocast: bool = False) -> bool:
    """:func:`readjust_bn`, reusing statistics cached beside ``checkpoint``; True if the cache was used.

    The cache records the SHA-256 of the weights and statistics it was computed from
    (``model`` as given, before re-adjustment): after more training the checkpoint's
    weights change, and the stale statistics are recomputed rather than reused. The cache's
    name holds the temperature and the steps only: statistics of another batch size or precision
    need a ``checkpoint`` name of their own (:func:`nvae.analysis.fid_protocol.bn_cache_checkpoint`).
    """
    path = bn_cache_path(checkpoint, temperature, steps)
    layers = decoder_bn_layers(model)
    weights = model_fingerprint(model)
    if path.exists():
        try:
            cached = safe_load(path)
            if cached.get("weights_sha256") == weights:
                for name, m in layers.items():
                    m.running_mean.copy_(cached[f"{name}.running_mean"])
                    m.running_var.copy_(cached[f"{name}.running_var"])
                model.eval()
                return True
        except (CheckpointError, KeyError, RuntimeError, AttributeError):
            pass   # a stale or damaged cache is recomputed and overwritten
    readjust_bn(model, temperature, steps, batch_size, generator, progress, autocast)
    state = {"weights_sha256": weights}
    for name, m in layers.items():
        state[f"{name}.running_mean"] = m.running_mean.clone()
        state[f"{name}.running_var"] = m.running_var.clone()
    atomic_torch_save(state, path)
    return False


def interpolate_latents(za, zb, alphas, groups=None):
    """Latents on the line from ``za`` to ``zb`` (one tensor per group, batch 1 each).

    Only the groups listed in ``groups`` move (all when None); the others keep ``za``'s
    values. Returns one latent list per alpha, batched: group g is (len(alphas), C, H, W).
    """
    moving = set(range(len(za))) if groups is None else set(groups)
    bad = sorted(g for g in moving if not 0 <= g < len(za))
    if bad:
        raise ValueError(f"latent groups {bad} do not exist; the model has groups 0..{len(za) - 1}")
    a = torch.as_tensor(alphas, dtype=za[0].dtype, device=za[0].device).view(-1, 1, 1, 1)
    return [((1 - a) * u + a * v) if g in moving else u.expand(len(a), -1, -1, -1)
            for g, (u, v) in enumerate(zip(za, zb))]


@torch.no_grad()
def reconstructions(model: NVAE, x: torch.Tensor, temperature: float = 0.0,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Each image of ``x`` followed by its reconstruction, (2B, C, H, W) in [0, 1].

    Temperature 0 decodes the posterior means and shows the mean of p(x|z); above 0
    the latents are posterior samples and colour images a sample of p(x|z) (binary
    ones always show the Bernoulli means).
    """
    dist = model.output_distribution(model(x, temperature=temperature, generator=generator).logits)
    recon = dist.mean() if temperature == 0 or model.config.decoder == "bernoulli" else dist.sample(1.0, generator)
    return torch.stack([x, recon], dim=1).flatten(0, 1)


@torch.no_grad()
def interpolation(model: NVAE, xa: torch.Tensor, xb: torch.Tensor, steps: int,
                  groups=None) -> torch.Tensor:
    """``xa``, ``steps`` images decoded along the line between the posterior means of ``xa`` and
    ``xb`` (only ``groups`` move; all when None), then ``xb``: (steps + 2, C, H, W)."""
    latents = model(torch.cat([xa, xb]), temperature=0.0).latents
    path = interpolate_latents([z[:1] for z in latents], [z[1:] for z in latents], torch.linspace(0, 1, steps),
                               groups)
    return torch.cat([xa, model.output_distribution(model.decode_logits(path)).mean(), xb])


def save_samples(images: torch.Tensor, out_dir: Union[str, Path], name: str) -> Tuple[Path, Path]:
    """``images`` as a PNG grid and an ``.npz`` (array ``images``) named ``name`` in ``out_dir``, atomically."""
    import numpy as np
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png, npz = out_dir / f"{name}.png", out_dir / f"{name}.npz"
    images = images.float().cpu()
    save_png(images, png, nrow=int(images.shape[0] ** 0.5), min_side=VIEWING_SIDE)
    atomic_write(npz, lambda f: np.savez_compressed(f, images=images.numpy()))
    return png, npz


def temperature_name(temperature: Temperature) -> str:
    """``t0.8``, ``t1-0.9-0.8`` for one temperature per group, or a schedule's own name (``tlin0.6-0.9``):
    how output files and the BN cache name a temperature (the whole schedule, not its first value)."""
    if hasattr(temperature, "name"):
        return temperature.name
    if isinstance(temperature, (int, float)):
        return f"t{temperature:g}"
    return "t" + "-".join(f"{v:g}" for v in temperature)
