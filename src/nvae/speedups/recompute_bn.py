"""BatchNorm -> [Swish] -> convolution that keeps only the BN input for the backward pass.

Written op by op, autograd stores three tensors of the same size for this chain:
the BN input, the BN output (for Swish's derivative) and the Swish output (for the
convolution's weight gradient). The last two are cheap to recompute from the
first and the batch statistics, so :class:`_BNActConv` stores the first only and
recomputes the other two in the backward pass. In the separable cells this is
four of the six expanded (6C) tensors, the bulk of the model's memory. The
recomputation costs time (5-7% of a ``mnist_small`` or ``mnist`` step on two CPU
threads, ``benchmarks/step_ratios.py``), so it is a switch, ``nvae.speedups.apply(model, recompute_bn=True)``
(:mod:`nvae.speedups.memory`), like gradient checkpointing. The backward pass keeps at most three expanded
tensors alive at once, and for stride-1 convolutions it forms the input gradient
as a forward convolution with the transposed kernel (see :func:`_transposed_conv`);
a depthwise convolution on a small map takes the weight gradient of
:mod:`nvae.speedups.depthwise`, as it does without this option.

The forward values and the running-statistics update are exactly those of
``conv(act(bn(x)))`` (the same kernels run); the gradients agree to rounding
(Swish's derivative is formed from the one sigmoid the recomputation needs). The
chain falls back to the plain modules wherever the saving does not apply or the
recomputation would be wrong: evaluation, no autograd, ``torch.compile`` (which
plans recomputation itself) and synchronised BN (whose statistics come from
every process). Under autocast (fp16, bf16) it computes in the dtypes the plain
modules would: BN and Swish in the input's dtype, the convolution and its
backward in the autocast dtype; the gradients agree to that precision.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from .depthwise import depthwise_weight_grad, takes_offset_sums


class _BNActConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bn_weight, bn_bias, running_mean, running_var, momentum, eps, swish,
                weight, bias, stride, padding, dilation, groups):
        y, mean, invstd = torch.native_batch_norm(x, bn_weight, bn_bias, running_mean, running_var,
                                                  True, momentum, eps)
        s = F.silu(y, inplace=True) if swish else y   # y itself is not needed again
        out = F.conv2d(s, weight, bias, stride, padding, dilation, groups)   # under autocast: its dtype
        ctx.save_for_backward(x, bn_weight, bn_bias, mean, invstd, weight)
        ctx.conv = (stride, padding, dilation, groups, None if bias is None else bias.shape)
        ctx.swish, ctx.eps, ctx.conv_dtype = swish, eps, out.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, bn_weight, bn_bias, mean, invstd, weight = ctx.saved_tensors
        stride, padding, dilation, groups, bias_shape = ctx.conv
        need = ctx.needs_input_grad
        need_s = any(need[:3])
        shape = (1, -1, 1, 1)
        scale = invstd * bn_weight
        s = torch.addcmul((bn_bias - mean * scale).view(shape), x, scale.view(shape))   # the BN output y
        sig = None
        if ctx.swish:
            # One sigmoid serves both Swish and its derivative, and y is not needed
            # once s = y sigmoid(y) is known: silu'(y) = sigmoid(y) + s (1 - sigmoid(y)).
            sig = torch.sigmoid(s)
            s.mul_(sig)
        # Under autocast the convolution ran in a lower precision: its backward does too (as
        # for the plain modules), and the gradients go back in their parameters' dtypes.
        # Without autocast these conversions are no-ops.
        s_conv, w_conv = s.to(ctx.conv_dtype), weight.to(ctx.conv_dtype)
        # Only channels-last gains: in NCHW oneDNN's two kernels run at the same speed.
        transposed = (_transposed_conv(w_conv, stride, padding, dilation, groups)
                      if need_s and grad_out.is_contiguous(memory_format=torch.channels_last) else None)
        offsets = need[8] and takes_offset_sums(s_conv, w_conv, stride, padding, dilation, groups)
        grad_s, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_out, s_conv, w_conv, bias_shape, _pair(stride), _pair(padding), _pair(dilation), False, [0, 0],
            groups, [need_s and transposed is None, need[8] and not offsets, bias_shape is not None and need[9]])
        if offsets:
            grad_w = depthwise_weight_grad(grad_out, s_conv, w_conv.shape[-2:], padding)
        del s_conv, w_conv
        grad_x = grad_g = grad_b_bn = None
        if need_s:
            if transposed is not None:
                grad_s = F.conv2d(grad_out, *transposed)
            grad_s = grad_s.to(s.dtype)
            if ctx.swish:
                grad_s.mul_(s.addcmul_(s, sig, value=-1).add_(sig))
            del s, sig
            grad_x, grad_g, grad_b_bn = torch.ops.aten.native_batch_norm_backward(
                grad_s.to(x.dtype), x, bn_weight, None, None, mean, invstd, True, ctx.eps,
                [need[0], need[1], need[2]])
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(ctx.bias_dtype)
        return (grad_x, grad_g, grad_b_bn, None, None, None, None, None,
                grad_w, grad_b, None, None, None, None)


def _transposed_conv(weight, stride, padding, dilation, groups):
    """``(weight, bias, stride, padding, dilation, groups)`` of the convolution that maps the
    output gradient of a stride-1 convolution to its input gradient, or None for other strides.

    It convolves with the flipped kernel, transposed within each group. In
    channels-last, oneDNN runs this forward convolution markedly faster than its
    backward-data kernel for the depthwise and narrow 1x1 convolutions of the
    separable cells (up to 5x on CPU); the sums are the same, up to their order.
    """
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    k = list(weight.shape[-2:])
    pad = [d * (kk - 1) - p for d, kk, p in zip(dilation, k, padding)]
    if stride != (1, 1) or min(pad) < 0:
        return None
    c_out, c_in_group = weight.shape[:2]
    w = weight.reshape(groups, c_out // groups, c_in_group, *k).transpose(1, 2)
    w = w.reshape(groups * c_in_group, c_out // groups, *k).flip(-2, -1)
    return w.contiguous(memory_format=torch.channels_last), None, 1, pad, dilation, groups


def _fusable(x: torch.Tensor, bn: nn.BatchNorm2d) -> bool:
    # Only the stock BN forward is reproduced here; synchronised BN, for one, takes its
    # statistics from every process.
    return (bn.training and torch.is_grad_enabled() and bn.affine and bn.momentum is not None
            and type(bn).forward is nn.modules.batchnorm._BatchNorm.forward and not torch.compiler.is_compiling())


def bn_act_conv(x: torch.Tensor, bn: nn.BatchNorm2d, conv: nn.Conv2d, weight: torch.Tensor,
                bias: Optional[torch.Tensor], swish: bool) -> torch.Tensor:
    """``conv(silu(bn(x)))`` (or ``conv(bn(x))`` with ``swish=False``) with ``weight`` and ``bias``,
    keeping only ``x`` for the backward pass.

    ``conv`` supplies stride, padding, dilation and groups; ``weight`` is the weight
    it applies (normalised, for a weight-normalised conv). Where the saving does not
    apply (see the module docstring) the plain modules run.
    """
    if not _fusable(x, bn) or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        s = bn(x)
        if swish:
            s = F.silu(s)
        return conv._conv_forward(s, weight, bias)
    running_mean = running_var = None
    if bn.track_running_stats:   # as the stock forward does
        bn.num_batches_tracked.add_(1)
        running_mean, running_var = bn.running_mean, bn.running_var
    return _BNActConv.apply(x, bn.weight, bn.bias, running_mean, running_var, bn.momentum, bn.eps, swish,
                            weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
