"""Building blocks shared by the cells: weight-normalised convolution, BN, SE, skips."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

BN_MOMENTUM = 0.05
BN_EPS = 1e-5


def batch_norm(channels: int) -> nn.BatchNorm2d:
    """BatchNorm with NVAE's momentum (0.05, PyTorch convention) and eps."""
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def _channel_norm(weight: torch.Tensor) -> torch.Tensor:
    return weight.flatten(1).norm(dim=1).view(-1, 1, 1, 1)


class WNConv2d(nn.Conv2d):
    """Conv2d with NVAE's weight normalisation: ``w = exp(g) * v / (||v|| + 1e-5)``.

    ``g`` (``log_weight_norm``) starts at ``log(||v|| + 0.01)``, so the initial
    weight is (almost) the default PyTorch initialisation. ``data_init`` sets
    ``g`` and the bias from the first training batch (the ``res_elu`` cells).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, dilation: int = 1, groups: int = 1, bias: bool = True,
                 data_init: bool = False):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        self.log_weight_norm = nn.Parameter(torch.log(_channel_norm(self.masked_weight().detach()) + 1e-2))
        self.data_init = data_init
        if data_init:
            # A buffer, so a checkpoint records that the initialisation happened
            # and a loaded model runs exactly as it was saved.
            self.register_buffer("init_done", torch.tensor(False))

    def masked_weight(self) -> torch.Tensor:
        return self.weight

    def normalized_weight(self) -> torch.Tensor:
        """The effective convolution weight (used by forward and spectral regularisation)."""
        v = self.masked_weight()
        return torch.exp(self.log_weight_norm) * v / (_channel_norm(v) + 1e-5)

    @torch.no_grad()
    def _initialize_from_data(self, x: torch.Tensor) -> None:
        v = self.masked_weight()
        out = F.conv2d(x, v / (_channel_norm(v) + 1e-5), None, self.stride, self.padding,
                       self.dilation, self.groups)
        mean = out.mean(dim=(0, 2, 3))
        scale = 5 * out.std(dim=(0, 2, 3))
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(mean)
            dist.all_reduce(scale)
            mean /= dist.get_world_size()
            scale /= dist.get_world_size()
        if self.bias is not None:
            self.bias.copy_(-mean / (scale + 1e-5))
        self.log_weight_norm.copy_(-torch.log(scale + 1e-5).view(-1, 1, 1, 1))
        self.init_done.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.data_init and self.training and not self.init_done:
            self._initialize_from_data(x)
        return self._conv_forward(x, self.normalized_weight(), self.bias)


def effective_weight(conv: nn.Conv2d) -> torch.Tensor:
    """The weight a convolution actually applies (normalised and masked where it is)."""
    return conv.normalized_weight() if isinstance(conv, WNConv2d) else conv.weight


class SqueezeExcitation(nn.Module):
    """Channel gating: global average pool, Linear(C, max(C/16, 4)), ReLU, Linear, sigmoid."""

    def __init__(self, channels: int):
        super().__init__()
        hidden = max(channels // 16, 4)
        self.se = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True),
                                nn.Linear(hidden, channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.se(x.mean(dim=(2, 3)))
        return x * gate[:, :, None, None]


class FactorizedReduce(nn.Module):
    """Down-sampling skip: Swish, then four 1x1 convs, each on one of the four 2x2 sub-grids, concatenated.

    The official code applies stride-2 1x1 convs to the input shifted by (0,0),
    (1,1), (0,1), (1,0); a stride-2 1x1 conv reads exactly the pixels of one
    sub-grid, so taking every second pixel first and convolving with stride 1
    gives the same outputs from the same weights. It also reads a quarter of the
    input, and it keeps off oneDNN's AVX2 stride-2 1x1 weight-gradient kernel,
    which for narrow channel counts in channels-last returns wrong weight
    gradients and corrupts the heap (``benchmarks/conv_kernels.py``).
    """

    #: (row, column) offset of each conv's sub-grid, in the official order.
    OFFSETS = ((0, 0), (1, 1), (0, 1), (1, 0))

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        quarter = out_channels // 4
        self.conv_1 = WNConv2d(in_channels, quarter, 1)
        self.conv_2 = WNConv2d(in_channels, quarter, 1)
        self.conv_3 = WNConv2d(in_channels, quarter, 1)
        self.conv_4 = WNConv2d(in_channels, out_channels - 3 * quarter, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(x)
        convs = (self.conv_1, self.conv_2, self.conv_3, self.conv_4)
        return torch.cat([conv(x[:, :, i::2, j::2]) for conv, (i, j) in zip(convs, self.OFFSETS)], dim=1)


class UpsampleSkip(nn.Module):
    """Up-sampling skip: bilinear x2 (align_corners=True), then a 1x1 conv halving channels."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = WNConv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True))
