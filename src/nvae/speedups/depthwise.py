"""The weight gradient of a depthwise convolution on small feature maps, summed by kernel offset.

On AVX2 CPUs oneDNN has no depthwise kernel for this gradient: it runs its
general grouped-convolution kernel, and when the feature map is no larger than
the kernel's reach (4x4 maps under a 5x5 kernel, the coarsest scale of the MNIST
models) a GEMM fallback that takes 4-5 times as long as summing
``grad_out * shifted input`` over the batch for each of the k x k offsets
(``benchmarks/depthwise_grad.py``). :func:`depthwise_weight_grad` is that sum;
:class:`DepthwiseConv2d` uses it for such maps in training and keeps oneDNN
everywhere else (on larger maps the sums are the slower ones). The forward pass
and the input gradient are oneDNN's, unchanged; the weight gradient agrees with
oneDNN's to rounding (the same products, summed in another order).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

#: Feature maps of at most this many pixels take the offset sums (oneDNN's GEMM fallback below it).
SMALL_MAP = 16


def depthwise_weight_grad(grad_out: torch.Tensor, x: torch.Tensor, kernel_size, padding) -> torch.Tensor:
    """d loss / d weight of a stride-1, dilation-1 depthwise conv: ``(C, 1, kh, kw)``."""
    c, (h, w) = x.shape[1], grad_out.shape[-2:]
    kh, kw = kernel_size
    ph, pw = _pair(padding)
    xp = F.pad(x, (pw, pw, ph, ph))
    out = torch.empty(kh, kw, c, dtype=x.dtype, device=x.device)
    for i in range(kh):
        for j in range(kw):
            torch.sum(grad_out * xp[:, :, i:i + h, j:j + w], (0, 2, 3), out=out[i, j])
    return out.permute(2, 0, 1).unsqueeze(1).contiguous(memory_format=torch.channels_last
                                                        if x.is_contiguous(memory_format=torch.channels_last)
                                                        and not x.is_contiguous() else torch.contiguous_format)


def takes_offset_sums(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int) -> bool:
    """Whether the weight gradient of this convolution at input ``x`` is better summed by offset."""
    return (x.device.type == "cpu" and x.dim() == 4 and x.shape[-2] * x.shape[-1] <= SMALL_MAP
            and groups == x.shape[1] == weight.shape[0] and weight.shape[1] == 1
            and _pair(stride) == (1, 1) and _pair(dilation) == (1, 1) and not isinstance(padding, str)
            and x.dtype == weight.dtype == torch.float32 and not torch.compiler.is_compiling())


class _DepthwiseSmallMap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, padding):
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.has_bias = padding, bias is not None
        return F.conv2d(x, weight, bias, 1, padding, 1, x.shape[1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, [1, 1], list(ctx.padding), [1, 1], False, [0, 0], x.shape[1],
                [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            grad_w = depthwise_weight_grad(grad_out, x, weight.shape[-2:], ctx.padding)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None


class DepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state-dict keys) whose weight gradient on small
    maps is summed by kernel offset (see the module docstring)."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if (torch.is_grad_enabled() and weight.requires_grad and self.padding_mode == "zeros"
                and not torch.is_autocast_enabled(x.device.type)
                and takes_offset_sums(x, weight, self.stride, self.padding, self.dilation, self.groups)):
            return _DepthwiseSmallMap.apply(x, weight, bias, _pair(self.padding))
        return super()._conv_forward(x, weight, bias)
