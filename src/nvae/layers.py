"""Building blocks shared by the cells: weight-normalised convolution, BN, SE, skips."""
from __future__ import annotations

import weakref

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

BN_MOMENTUM = 0.05
BN_EPS = 1e-5


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose running-statistics update can be switched off.

    With ``update_stats = False`` a training-mode forward still normalises with
    the batch statistics (same output) but leaves the running averages alone:
    what gradient checkpointing needs when it re-runs a cell in the backward pass.
    """

    update_stats = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not self.update_stats:
            # Same op as a normal step (so what autograd saves matches), but with
            # momentum 0 the running averages stay exactly as they are.
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True, 0.0, self.eps)
        return super().forward(x)


def batch_norm(channels: int) -> BatchNorm2d:
    """BatchNorm with NVAE's momentum (0.05, PyTorch convention) and eps."""
    return BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


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

    def _weight_key(self) -> tuple:
        return (self.weight._version, self.log_weight_norm._version, self.weight.device, self.weight.dtype)

    def forward_weight(self) -> torch.Tensor:
        """:meth:`normalized_weight`, kept (with its graph) for one :meth:`take_forward_weight`.

        As in the official code, spectral regularisation uses the weight the
        forward pass computed, so the normalisation runs (and is differentiated)
        once per step instead of twice.
        """
        w = self.normalized_weight()
        if torch.compiler.is_compiling():   # keep the traced graph free of hooks and module state
            return w
        self._forward_weight = None
        if w.requires_grad:
            token, module = object(), weakref.ref(self)

            def forget(grad: torch.Tensor) -> None:
                # A backward pass has reached w, so its graph is (or will be) freed.
                m = module()
                if m is not None and m._forward_weight is not None and m._forward_weight[2] is token:
                    m._forward_weight = None

            w.register_hook(forget)
            self._forward_weight = (self._weight_key(), w, token)
        return w

    def take_forward_weight(self) -> torch.Tensor:
        """The weight of the last forward pass if the parameters have not changed since, else a fresh one.

        Each forward weight is handed out once, and not after a backward pass
        has gone through it: its graph is freed by the backward pass it joins.
        """
        cached, self._forward_weight = getattr(self, "_forward_weight", None), None
        if cached is not None and cached[0] == self._weight_key() and torch.is_grad_enabled():
            return cached[1]
        return self.normalized_weight()

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
        return self._conv_forward(x, self.forward_weight(), self.bias)


def effective_weight(conv: nn.Conv2d, reuse_forward: bool = False) -> torch.Tensor:
    """The weight a convolution actually applies (normalised and masked where it is).

    ``reuse_forward`` takes a weight-normalised conv's weight from its last
    forward pass (:meth:`WNConv2d.take_forward_weight`).
    """
    if isinstance(conv, WNConv2d):
        return conv.take_forward_weight() if reuse_forward else conv.normalized_weight()
    return conv.weight


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
