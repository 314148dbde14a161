"""Memory and speed options: the same numbers, computed with less memory or less work.

The paper's modules (:mod:`nvae.model.cells`, :mod:`nvae.model.layers`) say only what they
compute. Each option here changes *how* some of them compute by moving them to a
subclass whose ``forward`` trades memory for compute or reuses work; a module keeps
its parameters, buffers and state-dict keys, and moves back when the option is off.

- :func:`set_checkpointing`: whole cells are recomputed in the backward pass instead
  of storing their activations (``torch.utils.checkpoint``); during the recomputation
  BN normalises with the batch statistics but does not fold the batch into its
  running averages a second time.
- :func:`set_recompute_bn` and :func:`lean_forward`: every BN -> [Swish] -> conv chain keeps
  only the BN input for the backward pass (:mod:`nvae.speedups.recompute_bn`).
- :func:`reuse_forward_weights` (on by default in :func:`nvae.speedups.apply`): spectral
  regularisation takes each weight-normalised weight from the forward pass instead of
  normalising twice, as the official code does.
- :func:`small_map_depthwise` (on by default in :func:`nvae.speedups.apply`): depthwise
  convolutions on small feature maps sum their weight gradient by kernel offset
  (:mod:`nvae.speedups.depthwise`) instead of oneDNN's slow general kernel.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Dict, Iterator, Optional, Sequence, Type

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..model.cells import Cell, InvertedResidual, ResConv
from ..config import cell_roles
from .depthwise import DepthwiseConv2d
from .recompute_bn import bn_act_conv
from ..model.layers import WNConv2d


def _move(module: nn.Module, cls: Type[nn.Module]) -> None:
    # Same instance, same attributes: parameters, buffers, children and every
    # reference to the module (optimiser, DDP, regulariser) stay valid.
    if type(module) is not cls:
        module.__class__ = cls


# -------------------------------------------------------------- checkpointing
@contextlib.contextmanager
def frozen_batch_statistics(module: nn.Module) -> Iterator[None]:
    """BN layers in ``module`` normalise with the batch statistics but leave their running
    averages and ``num_batches_tracked`` as they were: a recomputed forward pass must give
    the same output (and save the same tensors) without counting the same batch twice."""
    layers = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in layers]
    for m in layers:
        m.momentum = 0.0   # running = 1 * running + 0 * batch: unchanged
    try:
        yield
    finally:
        for m, (momentum, count) in zip(layers, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


class CheckpointedCell(Cell):
    """A :class:`~nvae.model.cells.Cell` recomputed in the backward pass (training with autograd only)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return super().forward(x)
        if torch.compiler.is_compiling():
            # Traced, the cell is recomputed from the graph (AOTAutograd), not by running its Python again: the BN
            # running averages are written once, after the forward graph, so there is nothing to freeze (and a
            # traced checkpoint takes no context but a selective-recomputation policy).
            return checkpoint(super().forward, x, use_reentrant=False)
        return checkpoint(super().forward, x, use_reentrant=False,
                          context_fn=lambda: (contextlib.nullcontext(), frozen_batch_statistics(self)))


def set_checkpointing(model: nn.Module, enabled: bool = True, roles: Optional[Sequence[str]] = None) -> None:
    """Recompute the cells of ``model`` (those of the given ``roles``, or all) in the backward pass."""
    roles = None if roles is None else cell_roles(roles)
    for m in model.modules():
        if isinstance(m, Cell):
            _move(m, CheckpointedCell if enabled and (roles is None or m.role in roles) else Cell)


def checkpointed_roles(model: nn.Module) -> Dict[str, bool]:
    """Whether each cell role of ``model`` is recomputed in backward (True if any cell of the role is)."""
    out: Dict[str, bool] = {}
    for m in model.modules():
        if isinstance(m, Cell):
            out[m.role] = out.get(m.role, False) or isinstance(m, CheckpointedCell)
    return out


# ------------------------------------------------------------------ recompute BN
class LeanResConv(ResConv):
    """:class:`~nvae.model.cells.ResConv` keeping only the BN input of its BN -> Swish -> conv for backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn is None or self.activation is not torch.nn.functional.silu or self.upsample:
            return super().forward(x)
        w = self.conv.normalized_weight()
        if isinstance(self.conv, _ForwardWeight):
            self.conv._keep(w)
        return bn_act_conv(x, self.bn, self.conv, w, self.conv.bias, swish=True)


def lean_forward(cell: InvertedResidual, x: torch.Tensor) -> torch.Tensor:
    """``cell(x)`` for a separable cell, keeping only the BN inputs of its three chains for backward."""
    if cell.upsample:
        x = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
    x = bn_act_conv(x, cell.bn_in, cell.expand, cell.expand.weight, None, swish=False)
    x = bn_act_conv(x, cell.bn_expand, cell.depthwise, cell.depthwise.weight, None, swish=True)
    x = bn_act_conv(x, cell.bn_depthwise, cell.project, cell.project.weight, None, swish=True)
    return cell.bn_out(x)


def set_recompute_bn(model: nn.Module, enabled: bool = True) -> None:
    """Keep only BN inputs for the backward pass of every regular cell's BN -> Swish -> conv chain of ``model``
    (the separable cells take :func:`lean_forward` through :mod:`nvae.speedups.switches`)."""
    for m in model.modules():
        if isinstance(m, ResConv):
            _move(m, LeanResConv if enabled else ResConv)


# ------------------------------------------------------------- forward weights
class _ForwardWeight:
    """Mixin for a :class:`~nvae.model.layers.WNConv2d`: keeps the weight its forward pass applied
    (with its graph) for one :meth:`take_forward_weight`."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        self._keep(weight)
        return super()._conv_forward(x, weight, bias)

    def _parameter_versions(self) -> tuple:
        return (self.weight._version, self.log_weight_norm._version, self.weight.device, self.weight.dtype)

    def _keep(self, w: torch.Tensor) -> None:
        # A traced graph holds no hooks or state (and an attribute written inside a traced checkpoint would
        # fail the trace of the checkpointed cell): the compiled step recomputes the weight instead.
        if torch.compiler.is_compiling():
            return
        self._forward_weight = None
        if not w.requires_grad:
            return
        token, module = object(), weakref.ref(self)

        def forget(grad: torch.Tensor) -> None:
            # A backward pass has reached w, so its graph is (or will be) freed.
            m = module()
            if m is not None and m._forward_weight is not None and m._forward_weight[2] is token:
                m._forward_weight = None

        w.register_hook(forget)
        self._forward_weight = (self._parameter_versions(), w, token)

    def take_forward_weight(self) -> torch.Tensor:
        """The weight of the last forward pass if the parameters have not changed since, else a fresh one.

        Each forward weight is handed out once, and not after a backward pass has gone
        through it: its graph is freed by the backward pass it joins.
        """
        if torch.compiler.is_compiling():   # nothing was kept (see _keep); the compiler shares the work
            return self.normalized_weight()
        kept, self._forward_weight = getattr(self, "_forward_weight", None), None
        if kept is not None and kept[0] == self._parameter_versions() and torch.is_grad_enabled():
            return kept[1]
        return self.normalized_weight()


_WITH_FORWARD_WEIGHT: Dict[type, type] = {}


def reuse_forward_weights(model: nn.Module, enabled: bool = True) -> None:
    """Let every weight-normalised conv of ``model`` keep its forward weight for :func:`forward_weight`
    (or, with ``enabled=False``, move each back to its own class)."""
    for m in model.modules():
        if isinstance(m, _ForwardWeight) and not enabled:
            _move(m, type(m).__mro__[2])   # (the made class, _ForwardWeight, the layer's class, ...)
            m._forward_weight = None
        elif isinstance(m, WNConv2d) and not isinstance(m, _ForwardWeight) and enabled:
            cls = type(m)
            if cls not in _WITH_FORWARD_WEIGHT:
                _WITH_FORWARD_WEIGHT[cls] = type(cls.__name__, (_ForwardWeight, cls),
                                                 {"__module__": cls.__module__, "__doc__": cls.__doc__})
            _move(m, _WITH_FORWARD_WEIGHT[cls])


def forward_weight(conv: nn.Conv2d) -> torch.Tensor:
    """The weight ``conv`` applied in its last forward pass where it was kept, else its weight now."""
    if isinstance(conv, _ForwardWeight):
        return conv.take_forward_weight()
    return conv.normalized_weight() if isinstance(conv, WNConv2d) else conv.weight


# --------------------------------------------------------- depthwise gradients
def small_map_depthwise(model: nn.Module, enabled: bool = True) -> None:
    """Let every depthwise conv of ``model`` take :mod:`nvae.speedups.depthwise`'s weight gradient on small maps
    (or, with ``enabled=False``, the plain ``nn.Conv2d`` one)."""
    for m in model.modules():
        if type(m) in (nn.Conv2d, DepthwiseConv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels:
            _move(m, DepthwiseConv2d if enabled else nn.Conv2d)
