"""NVAE's residual cells (Figure 3 of the paper) and the cell tables of the official ``arch_instance``s.

Every cell computes ``skip(x) + 0.1 * SE(ops(x))``. Its operations come from a
table per cell role, so the ablations of the paper are configuration.
"""
from __future__ import annotations

from typing import Callable, Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import FactorizedReduce, SqueezeExcitation, UpsampleSkip, WNConv2d, batch_norm

# The stride of each cell role: 1 keeps the resolution, 2 halves it (channels x2),
# -1 doubles it (channels / 2).
STRIDES = {"normal_pre": 1, "down_pre": 2, "normal_enc": 1, "down_enc": 2,
           "normal_dec": 1, "up_dec": -1, "normal_post": 1, "up_post": -1}


class ResConv(nn.Module):
    """One half of a "regular" residual cell: [BN,] activation, [nearest x2,] k x k conv.

    ``res_bnswish`` is BN + Swish (the paper's choice), ``res_bnelu`` BN + ELU and
    ``res_elu`` ELU alone with a data-initialised weight-normalised conv (Table 2).
    """

    def __init__(self, c_in: int, c_out: int, stride: int, norm: bool, activation: Callable,
                 kernel_size: int = 3, dilation: int = 1, data_init: bool = False):
        super().__init__()
        self.upsample = stride == -1
        self.bn = batch_norm(c_in) if norm else None
        self.activation = activation
        self.conv = WNConv2d(c_in, c_out, kernel_size, stride=abs(stride), padding=dilation * (kernel_size // 2),
                             dilation=dilation, data_init=data_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn is not None:
            x = self.bn(x)
        x = self.activation(x)
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x)


class InvertedResidual(nn.Module):
    """The "separable" cell of the generative model (MobileNetV2-style).

    [nearest x2,] BN, 1x1 conv to E*C, BN, Swish, depthwise (or grouped) k x k,
    BN, Swish, 1x1 conv back, BN. The convs carry neither bias nor weight norm.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int, kernel_size: int, groups: int = 0):
        super().__init__()
        hidden = int(round(c_in * expansion))
        self.upsample = stride == -1
        self.bn_in = batch_norm(c_in)
        self.expand = nn.Conv2d(c_in, hidden, 1, bias=False)
        self.bn_expand = batch_norm(hidden)
        self.depthwise = nn.Conv2d(hidden, hidden, kernel_size, stride=abs(stride), padding=kernel_size // 2,
                                   groups=hidden if groups == 0 else groups, bias=False)
        self.bn_depthwise = batch_norm(hidden)
        self.project = nn.Conv2d(hidden, c_out, 1, bias=False)
        self.bn_out = batch_norm(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = self.expand(self.bn_in(x))
        x = self.depthwise(F.silu(self.bn_expand(x)))
        x = self.project(F.silu(self.bn_depthwise(x)))
        return self.bn_out(x)


#: Operation name (as in the official code) -> constructor(c_in, c_out, stride).
OPS: Dict[str, Callable[[int, int, int], nn.Module]] = {
    "res_elu": lambda ci, co, s: ResConv(ci, co, s, norm=False, activation=F.elu, data_init=True),
    "res_bnelu": lambda ci, co, s: ResConv(ci, co, s, norm=True, activation=F.elu),
    "res_bnswish": lambda ci, co, s: ResConv(ci, co, s, norm=True, activation=F.silu),
    "res_bnswish5": lambda ci, co, s: ResConv(ci, co, s, norm=True, activation=F.silu, dilation=2),
    "mconv_e6k5g0": lambda ci, co, s: InvertedResidual(ci, co, s, expansion=6, kernel_size=5),
    "mconv_e3k5g0": lambda ci, co, s: InvertedResidual(ci, co, s, expansion=3, kernel_size=5),
    "mconv_e3k5g8": lambda ci, co, s: InvertedResidual(ci, co, s, expansion=3, kernel_size=5, groups=8),
    "mconv_e6k11g0": lambda ci, co, s: InvertedResidual(ci, co, s, expansion=6, kernel_size=11),
}


class Cell(nn.Module):
    """A residual cell ``skip(x) + 0.1 * SE(ops(x))`` of the given role.

    Encoder cells (and pre-process cells) are ``EncoderCell``s in the paper's
    terms, decoder and post-process cells ``DecoderCell``s; which operations
    they run is decided by the ``arch_instance`` table.
    """

    def __init__(self, c_in: int, c_out: int, role: str, ops: List[str], use_se: bool):
        super().__init__()
        self.role = role
        stride = STRIDES[role]
        if stride == 1:
            self.skip = nn.Identity()
        elif stride == 2:
            self.skip = FactorizedReduce(c_in, c_out)
        else:
            self.skip = UpsampleSkip(c_in, c_out)
        self.ops = nn.Sequential(*[OPS[name](c_in if i == 0 else c_out, c_out, stride if i == 0 else 1)
                                   for i, name in enumerate(ops)])
        self.se = SqueezeExcitation(c_out) if use_se else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + 0.1 * self.se(self.ops(x))


class EncCombiner(nn.Module):
    """Bottom-up feature of a group plus a 1x1 conv of the top-down decoder state."""

    def __init__(self, c_enc: int, c_dec: int):
        super().__init__()
        self.conv = WNConv2d(c_dec, c_enc, 1)

    def forward(self, enc_feature: torch.Tensor, dec_state: torch.Tensor) -> torch.Tensor:
        return enc_feature + self.conv(dec_state)


class DecCombiner(nn.Module):
    """Concatenate the decoder state and the sampled latent, then a 1x1 conv."""

    def __init__(self, c_dec: int, c_latent: int):
        super().__init__()
        self.conv = WNConv2d(c_dec + c_latent, c_dec, 1)

    def forward(self, dec_state: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([dec_state, z], dim=1))
