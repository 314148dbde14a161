"""The NVAE training objective (paper, Section 3.2 and Appendix A; the official ``train.py``).

``loss = mean_batch[recon + beta * KL_balanced] + lambda * (L_SR + L_BN)``
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch


def kl_coefficient(step: int, total_steps: int, anneal_portion: float = 0.3, const_portion: float = 1e-4,
                   min_coeff: float = 1e-4) -> float:
    """KL warm-up beta: held at ``min_coeff`` for ``const_portion`` of training, then linear to 1
    over ``anneal_portion`` of it."""
    return max(min((step - const_portion * total_steps) / (anneal_portion * total_steps), 1.0), min_coeff)


def kl_balance_alpha(groups_per_scale: Sequence[int]) -> torch.Tensor:
    """Per-group alpha in decoder order: ``4^i / groups in scale i`` (i = 0 coarsest), min 1.

    ``groups_per_scale`` is finest-first, as :attr:`NVAEConfig.groups_per_scale`.
    """
    coarse_first = list(reversed(groups_per_scale))
    alpha = torch.cat([torch.full((n,), 4.0 ** i / n) for i, n in enumerate(coarse_first)])
    return alpha / alpha.min()


def balanced_kl(kl: torch.Tensor, beta: float, alpha: Optional[torch.Tensor], balance: bool = True):
    """``beta`` times the (balanced) KL per image, and the per-group coefficients used.

    While beta < 1 each group's KL is weighted by (batch-mean |KL_l| + 0.01) / alpha_l,
    renormalised to mean 1 and detached: groups that carry little information get
    a smaller push towards the prior, which keeps them from collapsing early.
    """
    if balance and beta < 1.0:
        coeff = kl.abs().mean(dim=0) + 0.01
        coeff = coeff / alpha.to(kl.device, kl.dtype)
        coeff = (coeff / coeff.mean()).detach()
        return beta * (kl * coeff).sum(dim=1), coeff
    return beta * kl.sum(dim=1), torch.ones(kl.shape[1], device=kl.device, dtype=kl.dtype)


def regularization_coefficient(beta: float, weight_decay_norm: float, weight_decay_norm_init: Optional[float] = None,
                               anneal: bool = False) -> float:
    """lambda of the SR and BN losses, annealed log-linearly from ``init`` to its final value with beta."""
    if not anneal or weight_decay_norm == 0:   # 0 turns SR and BN regularisation off
        return weight_decay_norm
    if weight_decay_norm <= 0 or not weight_decay_norm_init or weight_decay_norm_init <= 0:
        raise ValueError("lambda annealing needs positive weight_decay_norm and weight_decay_norm_init")
    return math.exp((1.0 - beta) * math.log(weight_decay_norm_init) + beta * math.log(weight_decay_norm))


class Loss(NamedTuple):
    loss: torch.Tensor          #: the scalar to minimise
    nelbo: torch.Tensor         #: (B,) recon + KL (unbalanced, beta = 1), nats
    recon: torch.Tensor         #: (B,)
    kl: torch.Tensor            #: (B, L)
    kl_per_channel: torch.Tensor
    kl_coeffs: torch.Tensor     #: (L,) balancing weights used
    spectral: torch.Tensor
    batchnorm: torch.Tensor


def nvae_loss(model, x: torch.Tensor, beta: float, lam: float, alpha: Optional[torch.Tensor],
              balance: bool = True, generator: Optional[torch.Generator] = None) -> Loss:
    """One forward pass and the full training objective."""
    out = model(x, generator=generator)
    kl_term, coeffs = balanced_kl(out.kl, beta, alpha, balance)
    loss = (out.recon + kl_term).mean()
    if lam:
        sr, bn = model.spectral_loss(), model.batchnorm_loss()
        loss = loss + lam * (sr + bn)
    else:   # regularisation off (the SR ablation): no power iteration at all
        sr = bn = loss.new_zeros(())
    return Loss(loss, out.recon + out.kl.sum(1), out.recon, out.kl, out.kl_per_channel, coeffs, sr, bn)
