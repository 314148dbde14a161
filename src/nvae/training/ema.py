"""An exponential moving average (EMA) of a model's weights, as vdvae's ``ema_rate`` and Efficient-VDVAE's
``ema_decay`` keep one; the official NVAE code has none.

After every optimiser step that is applied (a skipped step changes nothing, so it moves
nothing here either), each averaged tensor becomes ``d * ema + (1 - d) * w``, where the
share kept, ``d``, warms up with the number ``n`` of updates already averaged:

    d(n) = min(rate, n / (n + 9))

so the first update (``n = 0``) is a copy, and from ``n = 9 * rate / (1 - rate)`` on (891
updates at 0.99, 8,991 at 0.999, 89,991 at 0.9999) it is the plain EMA at the configured
rate, its asymptote. Before that, the average after ``n`` updates gives the weights of
update ``j`` (1 to ``n``) the share ``C(j + 7, 8) / C(n + 8, 9)`` (binomial coefficients;
they sum to 1), about ``(9 / n) * (j / n)^8``. This is polynomial-decay averaging (Shamir &
Zhang, 2013, with their eta = 8); among the usual warm-ups it is timm's inverse-decay one,
``1 - (1 + n / gamma)^-power``, with gamma 9 and power 1, and TensorFlow's
``(1 + n) / (10 + n)`` shifted by one update so that the first is a copy. Whatever the length
of the run, the average covers its recent end: the last tenth of the updates carries
``1 - 0.9^9 = 61 %`` of the weight, the first half ``0.5^9 = 0.2 %``.

Why a warm-up and not a bias correction. A constant rate from the first weights on keeps
``rate^n`` of them (``0.999^1500 = 0.22``: at 1,500 steps a fifth of the "average" is the
weights of step one). Adam's cure, an average started at zero and divided by
``1 - rate^n``, removes that excess but leaves the average of all ``n`` steps with shares
from ``rate^(n-1)`` to 1, nearly flat while ``n`` is small next to ``1 / (1 - rate)``: at
1,500 steps and 0.999 the first half of the run still carries 32 % of it. Early weights
are far from late ones (the learning-rate and KL warm-ups run over the first epochs), an
average of distant points of a non-convex model is no model of either, and the averaged
BN statistics (below) fit the averaged weights only while those stay close together.
The warm-up keeps the average over nearby weights at every length, and needs nothing but
the count, which the state dict has always held.

What is averaged: every parameter, and the BN running statistics (``running_mean``,
``running_var``). The running statistics of the raw model describe the activations of the
last few dozen raw weights (BN momentum 0.05), not those of the EMA weights, which are an
average over about ``1 / (1 - d)`` steps. While the weights move slowly the activations move
about linearly with them, so the same average of the statistics is the statistics of the
averaged model, to first order; it costs nothing, needs no data, and is as exact to resume
as the weights. Copying the raw statistics would pair the EMA weights with another
model's statistics; re-estimating them would need a pass over data at every checkpoint.
(For sampling, ``nvae sample --readjust-bn`` still re-estimates the decoder's statistics
at the sampling temperature, from whichever weights were loaded.) Every other buffer
(BN step counters, power-iteration vectors, flow masks, initialisation flags) is copied
from the raw model: they are not weights and averaging them means nothing.

The average starts as a copy of the weights after the first applied step, not of the
initial weights: the first step's forward pass runs the data-dependent initialisation,
and the random weights before it are no estimate of anything.

Checkpoints: :meth:`WeightEMA.state_dict` holds ``rate``, ``updates`` and the tensors, as it
did before the warm-up existed, so an average saved then resumes under the warm-up from its
count (a count below the warm-up's end makes it forget its oldest weights faster, which is
what such an average needs); a state without a count (none was ever written) is taken as
already warmed up, the constant rate it was made with.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

#: Buffer names that are averaged with the parameters.
AVERAGED_BUFFERS = ("running_mean", "running_var")

#: The warm-up's constant: the share kept after ``n`` updates is at most ``n / (n + WARMUP)``.
WARMUP = 9


def averaged_names(model: nn.Module) -> List[str]:
    """State-dict names of ``model`` whose tensors the EMA averages (the rest it copies)."""
    params = [name for name, _ in model.named_parameters()]
    stats = [name for name, b in model.named_buffers()
             if name.rsplit(".", 1)[-1] in AVERAGED_BUFFERS and b.is_floating_point()]
    return params + stats


class WeightEMA:
    """The EMA of a model's state dict; see the module docstring for what is averaged and why.

    ``weights`` maps the model's state-dict names to tensors on the model's device, or is
    empty before the first update. :meth:`copy_to` puts the average into a model.
    """

    def __init__(self, rate: float):
        if not 0 < rate < 1:
            raise ValueError(f"the EMA rate must be in (0, 1) (vdvae uses 0.9999), got {rate}")
        self.rate = float(rate)
        self.weights: Dict[str, torch.Tensor] = {}
        self.updates = 0        #: applied steps averaged so far: the warm-up's n
        self._averaged: Optional[List[str]] = None

    def decay(self, n: int) -> float:
        """The share of the average kept by the update that follows ``n`` updates: ``min(rate, n / (n + 9))``."""
        return min(self.rate, n / (n + WARMUP))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Average ``model``'s current weights in (call after each applied optimiser step)."""
        current = model.state_dict()
        decay = self.decay(self.updates)
        if not self.weights or decay == 0:   # the first update: a copy
            self.weights = {k: v.detach().clone() for k, v in current.items()}
        else:
            if self._averaged is None:
                self._averaged = averaged_names(model)
            averaged = set(self._averaged)
            ema = [self.weights[k] for k in self._averaged]
            # One fused kernel per list: the update costs little next to a step, on a GPU too.
            torch._foreach_mul_(ema, decay)
            torch._foreach_add_(ema, [current[k] for k in self._averaged], alpha=1 - decay)
            for k, v in current.items():
                if k not in averaged:
                    self.weights[k].copy_(v)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> nn.Module:
        """Load the average into ``model`` (which must have the averaged model's layout); returns it."""
        if not self.weights:
            raise ValueError("the EMA holds no weights yet (no step has been applied); use the raw weights")
        model.load_state_dict(self.weights)
        return model

    def state_dict(self) -> Dict[str, Any]:
        """``{"rate", "updates", "state_dict"}``: plain data and tensors, as a checkpoint holds them."""
        return {"rate": self.rate, "updates": self.updates, "state_dict": dict(self.weights)}

    @torch.no_grad()
    def load_state_dict(self, state: Dict[str, Any], model: nn.Module) -> None:
        """Restore :meth:`state_dict`'s output for ``model`` (whose tensors give device and memory layout).

        The rate stays this object's (the run's configuration decides it). A state without
        ``updates`` counts as warmed up (:data:`WARMUP`): it goes on at the configured rate.
        """
        stored = state["state_dict"]
        if not stored:
            self.weights, self.updates = {}, int(state.get("updates", 0))
            return
        current = model.state_dict()
        if set(stored) != set(current):
            missing = sorted(set(current) - set(stored))[:3]
            raise ValueError(f"the stored EMA does not match the model (lacks {missing} or holds other entries)")
        weights = {}
        for name, ref in current.items():
            if stored[name].shape != ref.shape:
                raise ValueError(f"the stored EMA of {name} has shape {tuple(stored[name].shape)}, the model "
                                 f"{tuple(ref.shape)}")
            weights[name] = torch.empty_like(ref).copy_(stored[name])
        self.weights, self.updates = weights, int(state["updates"]) if "updates" in state else self.warmed_up()

    def warmed_up(self) -> int:
        """The first count at which :meth:`decay` is the configured rate: ``9 * rate / (1 - rate)``, rounded up."""
        n = max(0, math.floor(WARMUP * self.rate / (1 - self.rate)) - 1)   # at or below it, whatever the rounding
        while self.decay(n) < self.rate:
            n += 1
        return n


def stored_ema(checkpoint: Dict[str, Any]) -> Optional[Dict[str, torch.Tensor]]:
    """The EMA state dict a checkpoint dict holds, or None (trained without EMA, older nvae, or no step yet)."""
    ema = checkpoint.get("ema")
    if not isinstance(ema, dict) or not isinstance(ema.get("state_dict"), dict) or not ema["state_dict"]:
        return None
    return ema["state_dict"]
