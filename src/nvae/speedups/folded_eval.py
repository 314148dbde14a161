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

:func:`fused_inference` turns it on for a block of code; it applies only where
it can: modules in evaluation mode, no autograd, float32 CPU tensors, not inside
``torch.compile``. Swish falls back to a separate pass where this PyTorch build
lacks oneDNN's fused convolution.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Tuple

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


class FoldedInvertedResidual(InvertedResidual):
    """:class:`~nvae.model.cells.InvertedResidual` in evaluation as three convolutions with BN folded in."""

    def _folded(self, memory_format: torch.memory_format):
        key = (_versions(self), memory_format)
        cached = getattr(self, "_folded_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        w1, b1 = _fold_input_1x1(self.expand.weight, self.bn_in)
        w1, b1 = _fold_output(w1, b1, self.bn_expand)
        w2, b2 = _fold_output(self.depthwise.weight, None, self.bn_depthwise)
        w3, b3 = _fold_output(self.project.weight, None, self.bn_out)
        weights = tuple(t.contiguous(memory_format=memory_format) if t.dim() == 4 else t.contiguous()
                        for t in (w1, b1, w2, b2, w3, b3))
        self._folded_cache = (key, weights)
        return weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _applies(self, x):
            return InvertedResidual.forward(self, x)
        if self.upsample:   # nearest up-sampling commutes with the per-channel BN that follows it
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and x.dim() == 4 \
            and not x.is_contiguous() else torch.contiguous_format
        w1, b1, w2, b2, w3, b3 = self._folded(fmt)
        x = conv_swish(x, w1, b1, self.expand)
        x = conv_swish(x, w2, b2, self.depthwise)
        return F.conv2d(x, w3, b3, self.project.stride, self.project.padding, self.project.dilation,
                        self.project.groups)


def _applies(module: nn.Module, x: torch.Tensor) -> bool:
    return (not module.training and not torch.is_grad_enabled() and x.device.type == "cpu"
            and x.dtype == torch.float32 and not torch.compiler.is_compiling())


@contextlib.contextmanager
def fused_inference(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within the block, ``model``'s separable cells run folded (see the module docstring) where that applies."""
    moved: List[Tuple[nn.Module, type]] = []
    if enabled:
        for m in model.modules():
            if isinstance(m, InvertedResidual) and type(m) is not FoldedInvertedResidual:
                moved.append((m, type(m)))
                m.__class__ = FoldedInvertedResidual
    try:
        yield
    finally:
        for m, cls in moved:
            m.__class__ = cls
