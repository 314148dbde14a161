"""Evaluation-mode shortcuts on CPU: the same function in fewer passes over memory.

In evaluation BN is a fixed per-channel affine map, so in a separable cell
(:class:`~nvae.model.cells.InvertedResidual`: BN, 1x1 conv, BN, Swish, depthwise conv,
BN, Swish, 1x1 conv, BN) every BN folds into the weights and bias of the
convolution next to it, and each Swish can run as its convolution's oneDNN
post-op instead of a separate pass. The cell becomes three convolutions. Profiled
on one CPU thread, the Swish and BN passes took a third of an importance-weighted
evaluation, and the decoder's separable cells are the part that runs K times per
image.

The values are those of the plain modules up to rounding (the products are
summed in another order). The folded weights are cached per cell and rebuilt
when any of its parameters or BN buffers changes (their version counters),
so validation during training and EMA swaps see the current weights.

:func:`nvae.speedups.apply` switches it on (``folded_eval``, on by default); a cell
then runs folded only where it can (:func:`folds`): evaluation mode, no autograd,
float32 CPU tensors, not inside ``torch.compile``. Swish falls back to a separate
pass where this PyTorch build lacks oneDNN's fused convolution.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model.cells import InvertedResidual


def _bn_affine(bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` with ``bn(x) = x * scale + shift`` per channel in evaluation mode."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def _fold_output(weight: torch.Tensor, bias: Optional[torch.Tensor], bn: nn.BatchNorm2d):
    """``bn(conv(x, weight, bias))`` as one convolution: its weight and bias."""
    scale, shift = _bn_affine(bn)
    bias = shift if bias is None else bias * scale + shift
    return weight * scale.view(-1, 1, 1, 1), bias


def _fold_input_1x1(weight: torch.Tensor, bn: nn.BatchNorm2d):
    """``conv1x1(bn(x), weight)`` as one convolution (exact for 1x1 kernels only: no padding to see the shift)."""
    scale, shift = _bn_affine(bn)
    return weight * scale.view(1, -1, 1, 1), weight.flatten(1) @ shift


_HAS_POINTWISE = hasattr(torch.ops.mkldnn, "_convolution_pointwise") and torch.backends.mkldnn.is_available()


def conv_swish(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], conv: nn.Conv2d) -> torch.Tensor:
    """``silu(conv(x))`` with ``conv``'s geometry and the given weight and bias, in one oneDNN pass where it can."""
    if _HAS_POINTWISE and x.device.type == "cpu":
        return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, list(conv.padding), list(conv.stride),
                                                       list(conv.dilation), conv.groups, "swish", [], None)
    return F.silu(F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups), inplace=True)


def _versions(module: nn.Module) -> tuple:
    return tuple((t._version, t.data_ptr()) for t in (*module.parameters(), *module.buffers()))


def _folded(cell: InvertedResidual, memory_format: torch.memory_format):
    """The cell's three folded convolutions (weights and biases), cached on the cell until a parameter or
    BN buffer changes."""
    key = (_versions(cell), memory_format)
    cached = getattr(cell, "_folded_cache", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    w1, b1 = _fold_input_1x1(cell.expand.weight, cell.bn_in)
    w1, b1 = _fold_output(w1, b1, cell.bn_expand)
    w2, b2 = _fold_output(cell.depthwise.weight, None, cell.bn_depthwise)
    w3, b3 = _fold_output(cell.project.weight, None, cell.bn_out)
    weights = tuple(t.contiguous(memory_format=memory_format) if t.dim() == 4 else t.contiguous()
                    for t in (w1, b1, w2, b2, w3, b3))
    cell._folded_cache = (key, weights)
    return weights


def folded_forward(cell: InvertedResidual, x: torch.Tensor) -> torch.Tensor:
    """``cell(x)`` in evaluation as three convolutions with BN folded in (only where :func:`folds` says so)."""
    if cell.upsample:   # nearest up-sampling commutes with the per-channel BN that follows it
        x = F.interpolate(x, scale_factor=2, mode="nearest")
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and x.dim() == 4 \
        and not x.is_contiguous() else torch.contiguous_format
    w1, b1, w2, b2, w3, b3 = _folded(cell, fmt)
    x = conv_swish(x, w1, b1, cell.expand)
    x = conv_swish(x, w2, b2, cell.depthwise)
    return F.conv2d(x, w3, b3, cell.project.stride, cell.project.padding, cell.project.dilation,
                    cell.project.groups)


def folds(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``module`` may run folded on ``x``: evaluation mode, no autograd, float32 on the CPU, not traced."""
    return (not module.training and not torch.is_grad_enabled() and x.device.type == "cpu"
            and x.dtype == torch.float32 and not torch.compiler.is_compiling())
