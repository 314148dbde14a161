"""Inverse-autoregressive flows on the posterior samples (paper, Section 3.2, "more expressive approximate posteriors with normalizing flows"; the official ``neural_ar_operations.py``).

Each paired cell is two autoregressive cells, the second with spatially
mirrored masks so the pair sees context from both directions. The official
cells are shift-only (``z <- z - mu(z)``, log-determinant 0) and ignore the
encoder feature; we keep that.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import WNConv2d


def channel_mask(c_in: int, c_out: int, groups: int, zero_diag: bool) -> torch.Tensor:
    """Which input channels each output channel may see at the centre pixel.

    Channels are ordered; output channel block i (of ``c_out / c_in`` outputs, or
    one output per ``c_in / c_out`` inputs) sees input blocks before i, and block i
    itself unless ``zero_diag``. Depthwise convs see their own channel (or nothing).
    """
    if groups == c_in:
        return torch.full((c_out, 1), 0.0 if zero_diag else 1.0)
    assert groups == 1 and (c_in % c_out == 0 or c_out % c_in == 0), (c_in, c_out, groups)
    out_idx = torch.arange(c_out).unsqueeze(1)
    in_idx = torch.arange(c_in).unsqueeze(0)
    if c_out >= c_in:
        block_out, block_in = out_idx // (c_out // c_in), in_idx
    else:
        block_out, block_in = out_idx, in_idx // (c_in // c_out)
    visible = block_in < block_out if zero_diag else block_in <= block_out
    return visible.float()


def autoregressive_mask(c_in: int, c_out: int, kernel_size: int, groups: int, zero_diag: bool,
                        mirror: bool) -> torch.Tensor:
    """Kernel mask of a raster-order autoregressive conv: rows above, pixels to the left, and
    the centre tap restricted by :func:`channel_mask`. ``mirror`` reverses the raster order."""
    m = (kernel_size - 1) // 2
    mask = torch.ones(c_out, c_in // groups, kernel_size, kernel_size)
    mask[:, :, m:, :] = 0
    mask[:, :, m, :m] = 1
    mask[:, :, m, m] = channel_mask(c_in, c_out, groups, zero_diag)
    if mirror:
        mask = mask.flip(2, 3)
    return mask


class MaskedConv2d(WNConv2d):
    """Weight-normalised conv whose kernel is multiplied by an autoregressive mask."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, padding: int = 0, groups: int = 1,
                 bias: bool = False, zero_diag: bool = False, mirror: bool = False, init_scale: float = 1.0):
        super().__init__(c_in, c_out, kernel_size, padding=padding, groups=groups, bias=bias)
        # Derived from the shape; not saved, as in the official checkpoints.
        self.register_buffer("mask", autoregressive_mask(c_in, c_out, kernel_size, groups, zero_diag, mirror),
                             persistent=False)
        with torch.no_grad():
            init = torch.log(self.masked_weight().flatten(1).norm(dim=1) + 1e-2) + math.log(init_scale)
            self.log_weight_norm.copy_(init.view(-1, 1, 1, 1))

    def masked_weight(self) -> torch.Tensor:
        mask = getattr(self, "mask", None)
        return self.weight if mask is None else self.weight * mask


class AutoregressiveCell(nn.Module):
    """One shift-only IAF cell: masked 3x3 conv (to 6x channels, centre excluded), ELU,
    masked depthwise 5x5, ELU, ELU, masked 1x1 conv back (initial scale 0.1) -> mu; z - mu."""

    def __init__(self, num_z: int, mirror: bool, expansion: int = 6, kernel_size: int = 5):
        super().__init__()
        hidden = num_z * expansion
        self.conv = MaskedConv2d(num_z, hidden, 3, padding=1, zero_diag=True, mirror=mirror)
        self.depthwise = MaskedConv2d(hidden, hidden, kernel_size, padding=kernel_size // 2, groups=hidden,
                                      zero_diag=False, mirror=mirror)
        # The small initial scale keeps the flow close to the identity at the start.
        self.mu = MaskedConv2d(hidden, num_z, 1, bias=True, zero_diag=False, mirror=mirror, init_scale=0.1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = F.elu(self.depthwise(F.elu(self.conv(z))))
        return z - self.mu(F.elu(h))


class PairedFlowCell(nn.Module):
    """Two autoregressive cells, the second in mirrored order. Returns (z, log_det)."""

    def __init__(self, num_z: int):
        super().__init__()
        self.cell1 = AutoregressiveCell(num_z, mirror=False)
        self.cell2 = AutoregressiveCell(num_z, mirror=True)

    def forward(self, z: torch.Tensor):
        z = self.cell2(self.cell1(z))
        # Shift-only cells are volume preserving: the Jacobian is unit triangular.
        return z, torch.zeros_like(z)
