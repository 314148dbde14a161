"""NVAE's residual cells (Figure 3 of the paper) and the cell tables of the official ``arch_instance``s.

Every cell computes ``skip(x) + 0.1 * SE(ops(x))``. Its operations come from a
table per cell role, so the ablations of the paper are configuration.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .fused import bn_act_conv
from .layers import BatchNorm2d, FactorizedReduce, SqueezeExcitation, UpsampleSkip, WNConv2d, batch_norm

# Cell roles and their stride: 1 keeps the resolution, 2 halves it (channels x2),
# -1 doubles it (channels / 2).
STRIDES = {"normal_pre": 1, "down_pre": 2, "normal_enc": 1, "down_enc": 2,
           "normal_dec": 1, "up_dec": -1, "normal_post": 1, "up_post": -1}


def cell_roles(roles) -> Tuple[str, ...]:
    """``roles`` (names, or one comma-separated string) as a tuple, checked against :data:`STRIDES`."""
    roles = tuple(r.strip() for r in roles.split(",")) if isinstance(roles, str) else tuple(roles)
    unknown = sorted(set(roles) - set(STRIDES))
    if not roles or unknown:
        raise ValueError(f"unknown cell role(s) {unknown or list(roles)}; choose from {sorted(STRIDES)}")
    return roles


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
        #: Keep only the BN input for backward (see :mod:`nvae.fused`).
        self.recompute_bn = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn is not None and self.activation is F.silu and not self.upsample:
            return bn_act_conv(x, self.bn, self.conv, self.conv.forward_weight(), self.conv.bias, swish=True,
                               recompute=self.recompute_bn)
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
        #: Keep only the BN inputs for backward (see :mod:`nvae.fused`).
        self.recompute_bn = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        lean = self.recompute_bn
        x = bn_act_conv(x, self.bn_in, self.expand, self.expand.weight, None, swish=False, recompute=lean)
        x = bn_act_conv(x, self.bn_expand, self.depthwise, self.depthwise.weight, None, swish=True, recompute=lean)
        x = bn_act_conv(x, self.bn_depthwise, self.project, self.project.weight, None, swish=True, recompute=lean)
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


def _table(enc: List[str], dec: List[str], pre: List[str], post: List[str]) -> Dict[str, List[str]]:
    return {"normal_enc": enc, "down_enc": enc, "normal_dec": dec, "up_dec": dec,
            "normal_pre": pre, "down_pre": pre, "normal_post": post, "up_post": post}


_RES = ["res_bnswish", "res_bnswish"]
_SEP6, _SEP3 = ["mconv_e6k5g0"], ["mconv_e3k5g0"]

#: The official ``utils.get_arch_cells`` tables: cell role -> operation names.
ARCH_INSTANCES: Dict[str, Dict[str, List[str]]] = {
    "res_mbconv": _table(_RES, _SEP6, _RES, _SEP3),
    "res_bnswish": _table(_RES, _RES, _RES, _RES),
    "res_elu": _table(*[["res_elu", "res_elu"]] * 4),
    "res_bnelu": _table(*[["res_bnelu", "res_bnelu"]] * 4),
    "mbconv_res": _table(_SEP6, _RES, _SEP3, _RES),
    "mbconv_sep": _table(_SEP6, _SEP6, _SEP3, _SEP3),
    "mbconv_sep11": _table(["mconv_e6k11g0"], ["mconv_e6k11g0"], _SEP3, _SEP3),
    "mbconv_den": _table(_SEP6, _SEP6, ["mconv_e3k5g8"], ["mconv_e3k5g8"]),
    "res53_mbconv": _table(["res_bnswish5", "res_bnswish"], _SEP6, ["res_bnswish5", "res_bnswish"], _SEP3),
    "res35_mbconv": _table(["res_bnswish", "res_bnswish5"], _SEP6, ["res_bnswish", "res_bnswish5"], _SEP3),
    "res55_mbconv": _table(["res_bnswish5", "res_bnswish5"], _SEP6, ["res_bnswish5", "res_bnswish5"], _SEP3),
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
        #: Recompute this cell in the backward pass instead of storing its activations.
        self.checkpointing = False

    def _residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + 0.1 * self.se(self.ops(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.checkpointing and self.training and torch.is_grad_enabled()):
            return self._residual(x)
        calls = []

        def run(inp: torch.Tensor) -> torch.Tensor:
            # The second call is the backward pass's recomputation: BN must give the
            # same output without folding the same batch into its averages twice.
            recompute = bool(calls)
            calls.append(1)
            bns = [m for m in self.modules() if isinstance(m, BatchNorm2d)] if recompute else []
            for m in bns:
                m.update_stats = False
            try:
                return self._residual(inp)
            finally:
                for m in bns:
                    m.update_stats = True

        return checkpoint(run, x, use_reentrant=False)


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
