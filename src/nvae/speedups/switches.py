"""The speed-ups as switches on a built model: on, listed and off from outside it.

A plain :class:`~nvae.model.network.NVAE` runs the paper's network op by op. :func:`apply`
moves some of its modules to subclasses that compute the same numbers with less memory
or fewer passes (each one's module says how and how exactly); parameters, buffers,
state-dict keys and every reference to a module stay as they were. Training and every
command that reads a run apply :data:`DEFAULT` (``NVAE(config)``, ``NVAE.from_checkpoint``
and ``NVAE.from_official`` give the plain network); :func:`enabled` reads the switches
back off the modules, and :func:`remove` returns the plain network.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn

from ..config import cell_roles
from ..model.cells import InvertedResidual, ResConv
from ..model.layers import effective_weight
from . import memory
from .depthwise import DepthwiseConv2d
from .folded_eval import folded_forward, folds


@dataclass(frozen=True)
class Speedups:
    """Which speed-ups a model runs with.

    ``forward_weights``: spectral regularisation reuses the weight each weight-normalised conv applied in the
    forward pass (bit-identical losses; gradients summed in another order). ``small_map_depthwise``: depthwise
    weight gradients on maps of at most 16 pixels summed by kernel offset. ``folded_eval``: in evaluation without
    autograd on the CPU, separable cells run as three convolutions with BN folded in (equal up to rounding).
    ``recompute_bn``: BN -> Swish -> conv chains keep only the BN input for backward. ``checkpointing``: cells
    recomputed in backward, every cell (True) or those of the given roles.
    """

    forward_weights: bool = True
    small_map_depthwise: bool = True
    folded_eval: bool = True
    recompute_bn: bool = False
    checkpointing: Union[bool, Tuple[str, ...]] = False

    def __post_init__(self):
        if not isinstance(self.checkpointing, bool):
            object.__setattr__(self, "checkpointing", tuple(sorted(cell_roles(self.checkpointing))))


#: What training, the loaders and the command line run with.
DEFAULT = Speedups()
#: The paper's network op by op.
PLAIN = Speedups(forward_weights=False, small_map_depthwise=False, folded_eval=False)


class SeparableCell(InvertedResidual):
    """A separable cell (:class:`~nvae.model.cells.InvertedResidual`) with its speed-ups switched on:
    folded in evaluation without autograd, lean (BN recomputed) otherwise, else the plain cell."""

    folded_eval = False
    recompute_bn = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.folded_eval and folds(self, x):
            return folded_forward(self, x)
        if self.recompute_bn:
            return memory.lean_forward(self, x)
        return InvertedResidual.forward(self, x)


def _separable_cells(model: nn.Module, speedups: Speedups) -> None:
    sped_up = speedups.folded_eval or speedups.recompute_bn
    for m in model.modules():
        if isinstance(m, InvertedResidual):
            memory._move(m, SeparableCell if sped_up else InvertedResidual)
            if sped_up:
                m.folded_eval, m.recompute_bn = speedups.folded_eval, speedups.recompute_bn
            else:
                m.__dict__.pop("folded_eval", None)
                m.__dict__.pop("recompute_bn", None)
                m.__dict__.pop("_folded_cache", None)


def apply(model: nn.Module, speedups: Optional[Speedups] = None, **switches) -> nn.Module:
    """Run ``model`` with ``speedups`` (default :data:`DEFAULT`), each field replaced by ``switches``
    (``apply(model, recompute_bn=True)``); every switch not asked for is off or at its default, whatever
    the model ran with before. Returns ``model``."""
    speedups = dataclasses.replace(speedups or DEFAULT, **switches)
    memory.reuse_forward_weights(model, speedups.forward_weights)
    spectral = getattr(model, "spectral", None)
    if spectral is not None:
        spectral.weight_of = memory.forward_weight if speedups.forward_weights else effective_weight
    memory.small_map_depthwise(model, speedups.small_map_depthwise)
    _separable_cells(model, speedups)
    memory.set_recompute_bn(model, speedups.recompute_bn)
    roles = None if isinstance(speedups.checkpointing, bool) else speedups.checkpointing
    memory.set_checkpointing(model, bool(speedups.checkpointing), roles)
    return model


def remove(model: nn.Module) -> nn.Module:
    """The plain network again (:data:`PLAIN`)."""
    return apply(model, PLAIN)


def enabled(model: nn.Module) -> Speedups:
    """The speed-ups ``model`` runs with, read off its modules."""
    modules = list(model.modules())
    separable = [m for m in modules if isinstance(m, InvertedResidual)]
    regular = [m for m in modules if isinstance(m, ResConv)]
    checkpointed = memory.checkpointed_roles(model)
    roles = tuple(r for r, on in checkpointed.items() if on)
    return Speedups(
        forward_weights=any(isinstance(m, memory._ForwardWeight) for m in modules),
        small_map_depthwise=any(isinstance(m, DepthwiseConv2d) for m in modules),
        folded_eval=any(isinstance(m, SeparableCell) and m.folded_eval for m in separable),
        recompute_bn=any(isinstance(m, memory.LeanResConv) for m in regular)
        or any(isinstance(m, SeparableCell) and m.recompute_bn for m in separable),
        checkpointing=True if roles and len(roles) == len(checkpointed) else (roles or False))

