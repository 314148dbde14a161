"""Sampling helpers: BN re-adjustment for low-temperature samples (NVAE.md section 4)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Union

import torch
import torch.nn as nn

from .checkpoint import CheckpointError, atomic_torch_save, safe_load
from .model import NVAE, Temperature


def decoder_bn_layers(model: NVAE) -> Dict[str, nn.modules.batchnorm._BatchNorm]:
    """The BN layers the generative path uses (decoder tower and post-process), by name."""
    return {name: m for part in ("decoder_stages", "postprocess")
            for name, m in getattr(model, part).named_modules(prefix=part)
            if isinstance(m, nn.modules.batchnorm._BatchNorm)}


@torch.no_grad()
def readjust_bn(model: NVAE, temperature: Temperature, steps: int = 500, batch_size: int = 36,
                generator: Optional[torch.Generator] = None, progress: bool = False) -> NVAE:
    """Re-estimate the decoder's BN running statistics from prior samples at ``temperature``.

    BN layers run in training mode for ``steps`` batches of ``batch_size`` prior samples
    (their batch statistics update the running averages with the usual momentum), then
    the model returns to eval mode. Only decoder BN statistics change; no weight does.
    The official code uses 500 steps of 36 samples.
    """
    from tqdm import tqdm
    model.train()
    try:
        for _ in tqdm(range(steps), desc="BN re-adjustment", disable=not progress):
            model.sample_logits(batch_size, temperature, generator)
    finally:
        model.eval()
    return model


def bn_cache_path(checkpoint: Union[str, Path], temperature: Temperature, steps: int) -> Path:
    """Where the re-adjusted statistics of ``checkpoint`` at ``temperature`` are cached."""
    t = temperature if isinstance(temperature, (int, float)) else "-".join(f"{v:g}" for v in temperature)
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}.bn_t{t:g}_s{steps}.pt" if isinstance(t, (int, float))
                                else f"{checkpoint.stem}.bn_t{t}_s{steps}.pt")


def readjust_bn_cached(model: NVAE, checkpoint: Union[str, Path], temperature: Temperature, steps: int = 500,
                       batch_size: int = 36, generator: Optional[torch.Generator] = None,
                       progress: bool = False) -> bool:
    """:func:`readjust_bn`, reusing statistics cached beside ``checkpoint``; True if the cache was used."""
    path = bn_cache_path(checkpoint, temperature, steps)
    layers = decoder_bn_layers(model)
    if path.exists():
        try:
            cached = safe_load(path)
            for name, m in layers.items():
                m.running_mean.copy_(cached[f"{name}.running_mean"])
                m.running_var.copy_(cached[f"{name}.running_var"])
            model.eval()
            return True
        except (CheckpointError, KeyError, RuntimeError):
            pass   # a stale or damaged cache is recomputed and overwritten
    readjust_bn(model, temperature, steps, batch_size, generator, progress)
    state = {}
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
