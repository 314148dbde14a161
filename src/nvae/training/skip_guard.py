"""Which optimisation steps to skip, and when to give up on the current weights.

A step is skipped when its loss or gradient norm is not finite, or when the
gradient norm is far above its recent history (VDVAE's remedy for the rare
enormous gradients of deep VAEs). VDVAE uses a fixed threshold; here it is a
multiple of a running quantile, and the history includes the skipped norms, so
if gradients grow for good the threshold follows them and training cannot stall.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Optional

import numpy as np

__all__ = ["GradientGuard", "TrainingDiverged"]


class TrainingDiverged(RuntimeError):
    """Too many consecutive bad steps and no checkpoint to roll back to."""


class GradientGuard:
    """Running gradient-norm statistics that set the skip threshold and count consecutive skips.

    Args:
        factor: skip when the norm exceeds ``factor`` times the ``quantile`` of the
            last ``window`` finite norms; ``None`` skips only non-finite steps.
        warmup: norms to collect before the threshold applies.
        max_consecutive: consecutive skips after which :attr:`needs_rollback` is set.
    """

    def __init__(self, factor: Optional[float] = 10.0, quantile: float = 0.95, window: int = 200, warmup: int = 50,
                 max_consecutive: int = 20):
        if factor is not None and factor <= 1:
            raise ValueError(f"the gradient skip factor must be > 1 (or None to disable), got {factor}")
        if not 0 < quantile <= 1:
            raise ValueError(f"the gradient skip quantile must be in (0, 1], got {quantile}")
        self.factor, self.quantile, self.warmup, self.max_consecutive = factor, quantile, warmup, max_consecutive
        self.history: deque = deque(maxlen=window)
        self.consecutive = 0
        self.total = 0

    def threshold(self) -> float:
        """The largest gradient norm the next step may have."""
        if self.factor is None or len(self.history) < max(self.warmup, 1):
            return math.inf
        return self.factor * float(np.quantile(np.asarray(self.history), self.quantile))

    def update(self, grad_norm: float, stepped: bool) -> None:
        """Record one step's gradient norm and whether it was applied."""
        if math.isfinite(grad_norm):
            self.history.append(float(grad_norm))
        if stepped:
            self.consecutive = 0
        else:
            self.consecutive += 1
            self.total += 1

    @property
    def needs_rollback(self) -> bool:
        return self.max_consecutive > 0 and self.consecutive >= self.max_consecutive

    def state_dict(self) -> dict:
        return {"history": list(self.history), "consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: dict) -> None:
        self.history.clear()
        self.history.extend(float(v) for v in state["history"])
        self.consecutive, self.total = int(state["consecutive"]), int(state["total"])
