"""Spectral and batch-norm regularisation (paper, Section 3.2 and Appendix A; the official ``train.py``).

``L_SR`` sums the largest singular value of every convolution, estimated by
power iteration; ``L_BN`` sums ``max |gamma|`` over the BN layers. Both keep
the Lipschitz constant of the decoder (and so the KL) from blowing up.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import effective_weight


def _normalize(t: torch.Tensor) -> torch.Tensor:
    return F.normalize(t, dim=-1, eps=1e-3)


class SpectralRegularizer(nn.Module):
    """Batched power iteration over all convolutions of a model.

    Convolutions whose weight matrices (C_out x C_in*k*k) have the same shape are
    stacked and iterated together. The singular-vector estimates ``u_i``, ``v_i``
    are buffers: they persist across steps (4 iterations per call after 40 on the
    first) and travel in every checkpoint, so a resumed run continues the same
    estimate. No gradient flows through them. ``weight_of(conv)`` gives the weight
    to regularise (the model passes :func:`nvae.speedups.memory.forward_weight`, which reuses
    the forward pass's normalised weight).
    """

    def __init__(self, convs: List[nn.Conv2d], num_power_iter: int = 4, first_call_factor: int = 10,
                 weight_of: Callable[[nn.Conv2d], torch.Tensor] = effective_weight):
        super().__init__()
        self.weight_of = weight_of
        self.num_power_iter = num_power_iter
        self.first_call_factor = first_call_factor
        groups: "OrderedDict[tuple, List[nn.Conv2d]]" = OrderedDict()
        for conv in convs:
            w = conv.weight
            groups.setdefault((w.shape[0], w[0].numel()), []).append(conv)
        # A plain list: these modules belong to the model; registering them here
        # would duplicate their parameters in the state dict.
        self._groups = list(groups.values())
        for i, ((rows, cols), members) in enumerate(groups.items()):
            self.register_buffer(f"u{i}", _normalize(torch.randn(len(members), rows)))
            self.register_buffer(f"v{i}", _normalize(torch.randn(len(members), cols)))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def _power_iteration(self, w: torch.Tensor, u: torch.Tensor, v: torch.Tensor, steps: int) -> None:
        for _ in range(steps):
            v.copy_(_normalize(torch.bmm(u.unsqueeze(1), w).squeeze(1)))
            # W v as v^T W^T: on CPU a batched row-vector product is ~10x faster than a column one.
            u.copy_(_normalize(torch.bmm(v.unsqueeze(1), w.transpose(1, 2)).squeeze(1)))

    def power_iterations(self) -> int:
        """Iterations of the next call: ``first_call_factor`` times as many on the first, from the random start."""
        return self.num_power_iter * (1 if bool(self.initialized) else self.first_call_factor)

    def forward(self) -> torch.Tensor:
        """Sum of the estimated spectral norms; differentiable in the weights."""
        steps = self.power_iterations()
        sigmas = []
        for i, members in enumerate(self._groups):
            w = torch.stack([self.weight_of(c).flatten(1) for c in members])
            u, v = getattr(self, f"u{i}"), getattr(self, f"v{i}")
            self._power_iteration(w.detach().to(u.dtype), u, v, steps)
            sigma = (torch.bmm(u.unsqueeze(1).to(w.dtype), w).squeeze(1) * v.to(w.dtype)).sum()
            sigmas.append(sigma)
        self.initialized.fill_(True)
        return torch.stack(sigmas).sum()

    def singular_values(self) -> List[torch.Tensor]:
        """Current estimates per group, (num convs,) each; for inspection and tests."""
        out = []
        for i, members in enumerate(self._groups):
            w = torch.stack([effective_weight(c).flatten(1) for c in members]).detach()
            u, v = getattr(self, f"u{i}"), getattr(self, f"v{i}")
            out.append(torch.bmm(u.unsqueeze(1), torch.bmm(w, v.unsqueeze(2))).flatten())
        return out


def batchnorm_loss(bn_layers: List[nn.modules.batchnorm._BatchNorm]) -> torch.Tensor:
    """Sum over BN layers of ``max |gamma|``."""
    terms = [layer.weight.abs().max() for layer in bn_layers if layer.affine]
    return torch.stack(terms).sum() if terms else torch.zeros(())
