"""One optimisation step of the official recipe, and the schedules that set its coefficients (paper, Appendix A; the official ``train.py``)."""
from __future__ import annotations

import contextlib
import math
from typing import NamedTuple, Optional

import torch

from ..config import TrainConfig
from .objective import Loss, kl_coefficient, regularization_coefficient
from .state import TrainState


class Coefficients(NamedTuple):
    """What the schedules set for one step."""

    beta: float                             #: KL warm-up coefficient
    lam: float                              #: weight of the spectral and BN regularisers
    alpha: Optional[torch.Tensor] = None    #: KL-balancing weight per group (decoder order)
    balance: bool = True                    #: KL balancing while beta < 1
    learning_rate: Optional[float] = None   #: set on the optimiser before the step (None: leave it)


class StepResult(NamedTuple):
    loss: Loss                  #: the loss terms of this process's images
    grad_norm: torch.Tensor     #: norm of the gradients averaged over the processes
    stepped: bool               #: whether the optimiser updated the weights


def learning_rate(step: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup_epochs``, then per-epoch cosine decay to ``learning_rate_min``."""
    warmup = cfg.warmup_epochs * steps_per_epoch
    if step < warmup:
        return cfg.learning_rate * step / warmup
    span = max(cfg.epochs - cfg.warmup_epochs - 1, 1)
    done = min(max(step // steps_per_epoch - cfg.warmup_epochs, 0), span)
    cosine = (1 + math.cos(math.pi * done / span)) / 2
    return cfg.learning_rate_min + (cfg.learning_rate - cfg.learning_rate_min) * cosine


def schedule(step: int, steps_per_epoch: int, cfg: TrainConfig, alpha: Optional[torch.Tensor],
             lr_scale: float = 1.0) -> Coefficients:
    """The coefficients of step ``step`` of a run of ``cfg.epochs`` epochs."""
    beta = kl_coefficient(step, steps_per_epoch * cfg.epochs, cfg.kl_anneal_portion, cfg.kl_const_portion,
                          cfg.kl_const_coeff)
    lam = regularization_coefficient(beta, cfg.weight_decay_norm, cfg.weight_decay_norm_init,
                                     cfg.weight_decay_norm_anneal)
    return Coefficients(beta, lam, alpha, cfg.kl_balance, learning_rate(step, steps_per_epoch, cfg) * lr_scale)


def train_step(state: TrainState, x: torch.Tensor, coeffs: Coefficients,
               max_grad_norm: Optional[float] = None) -> StepResult:
    """One step: loss, backward, gradient norm, clipping, and the update unless the step is bad; then the
    EMA of the weights (``state.ema``) follows the update; ``state.step`` + 1.

    A step is bad when its loss or gradient norm is not finite, or the gradient norm
    exceeds ``max_grad_norm`` (default: the gradient guard's threshold), on *any*
    process; it is then skipped on all of them, so the replicas never drift apart. A
    skipped step leaves no trace: its forward pass already moved the BN running
    statistics and power-iteration vectors (and, on the first step, the data-dependent
    initialisation), so every buffer is put back as it was, and the EMA does not move.
    The guard records the step.

    With ``state.grad_clip`` > 0 the gradients are scaled so that their total norm is at
    most ``grad_clip`` (:func:`torch.nn.utils.clip_grad_norm_`). The skip decision, the
    guard's history and the returned ``grad_norm`` all use the norm before clipping:
    clipping bounds ordinary large steps, while the guard exists to notice outliers, which
    clipping would otherwise turn into full-size steps in an unreliable direction (and
    the guard's running quantile would only ever see norms up to ``grad_clip``).
    ``state.clipped_steps`` counts the applied steps that were clipped.

    The loss is ``state.loss_fn``: with ``TrainConfig.compile`` the forward pass and the whole objective run as one
    compiled graph (:mod:`nvae.speedups.compile`). Everything else here stays outside it, in eager Python: the
    backward call (its graph compiled with the forward's), the gradient norm and clipping, and the decision whether to
    step, which depends on the values of the loss and the norm and on the guard's history (data-dependent control
    flow); so do restoring the buffers of a skipped step, the optimiser step and the EMA.
    """
    if max_grad_norm is None:
        max_grad_norm = state.guard.threshold()
    if coeffs.learning_rate is not None:
        for group in state.optimizer.param_groups:
            group["lr"] = coeffs.learning_rate
    buffers = list(state.net.buffers())
    before = [b.detach().clone() for b in buffers]
    state.optimizer.zero_grad(set_to_none=True)
    amp = torch.autocast(x.device.type, dtype=state.autocast_dtype) if state.autocast_dtype \
        else contextlib.nullcontext()
    with amp:
        out = state.loss_fn(state.net, x, coeffs.beta, coeffs.lam, coeffs.alpha, coeffs.balance)
    state.scaler.scale(out.loss).backward()
    state.scaler.unscale_(state.optimizer)
    # Returns the norm before clipping; under DDP the gradients, so the norms, are the same on every process.
    clip = state.grad_clip if state.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(state.net.parameters(), clip)
    bad = state.dist.any(not (torch.isfinite(out.loss) and torch.isfinite(grad_norm) and grad_norm <= max_grad_norm))
    if bad:
        state.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for b, old in zip(buffers, before):
                b.copy_(old)
    else:
        state.scaler.step(state.optimizer)
        if state.ema is not None:
            state.ema.update(state.model)
        state.clipped_steps += int(grad_norm.item() > clip)
    state.scaler.update()
    state.guard.update(grad_norm.item(), not bad)
    state.step += 1
    return StepResult(out, grad_norm, not bad)
