"""A latent group of the hierarchy, and the rules that choose its z in the top-down walk.

Group ``l`` (paper, Figure 2) reads the decoder state ``s``: its prior head gives
p(z_l | z_<l); its encoder combiner mixes ``s`` into the encoder's feature, and its
posterior head turns that into q(z_l | x, z_<l) (residual to the prior, section 3.2),
whose samples may pass through normalising flows; its decoder combiner feeds the
chosen z_l back into ``s``. The top group's prior is a standard Normal and its
posterior reads the encoder's top feature directly.

Which z the group takes is the caller's *rule*: a callable
``rule(index, group, prior, posterior) -> z``. :class:`FromPosterior` (training,
evaluation, reconstruction), :class:`FromPrior` (sampling), :class:`Given`
(decoding latents) and :class:`PartialPosterior` (the first groups from q, the
rest from p) are the four the model uses; :meth:`nvae.NVAE.top_down` runs any.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cells import DecCombiner, EncCombiner
from .distributions import Normal, ResidualNormal
from .flows import PairedFlowCell
from .layers import WNConv2d


class PriorHead(nn.Module):
    """ELU, 1x1 conv: (mu, log sigma) of p(z_l | z_<l) from the decoder state."""

    def __init__(self, channels: int, num_latent: int):
        super().__init__()
        self.conv = WNConv2d(channels, 2 * num_latent, 1)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.conv(F.elu(s))


class LatentGroup(nn.Module):
    """One group z_l: prior head, encoder combiner, posterior head, flows and decoder combiner.

    Built from its parts (see ``NVAE``'s builders, which create them in the official
    order). The top group has neither prior head nor encoder combiner.
    """

    def __init__(self, posterior_head: WNConv2d, dec_combiner: DecCombiner, prior_head: Optional[PriorHead] = None,
                 enc_combiner: Optional[EncCombiner] = None, flows: Sequence[PairedFlowCell] = (),
                 residual: bool = True):
        super().__init__()
        if (prior_head is None) != (enc_combiner is None):
            raise ValueError("a latent group has both a prior head and an encoder combiner, or (the top) neither")
        self.prior_head = prior_head
        self.enc_combiner = enc_combiner
        self.posterior_head = posterior_head
        self.flows = nn.ModuleList(flows)
        self.dec_combiner = dec_combiner
        self.residual = residual
        self.num_latent = posterior_head.out_channels // 2

    @property
    def is_top(self) -> bool:
        """The first group of the walk, whose prior is a fixed standard Normal."""
        return self.prior_head is None

    def distributions(self, s: torch.Tensor, feature: Optional[torch.Tensor] = None
                      ) -> Tuple[Normal, Optional[Normal]]:
        """``(prior, posterior)`` at decoder state ``s``; the posterior needs the encoder's ``feature``."""
        posterior = None
        if self.is_top:
            if feature is not None:
                mu_q, log_sigma_q = self.posterior_head(feature).chunk(2, dim=1)
                posterior = Normal(mu_q, log_sigma_q)
                zeros = torch.zeros_like(mu_q)
            else:
                zeros = s.new_zeros((s.shape[0], self.num_latent) + tuple(s.shape[2:]))
            return Normal(zeros, zeros), posterior
        mu_p, log_sigma_p = self.prior_head(s).chunk(2, dim=1)
        prior = Normal(mu_p, log_sigma_p)
        if feature is not None:
            mu_q, log_sigma_q = self.posterior_head(self.enc_combiner(feature, s)).chunk(2, dim=1)
            posterior = (ResidualNormal(mu_p, log_sigma_p, mu_q, log_sigma_q, prior) if self.residual
                         else Normal(mu_q, log_sigma_q))
        return prior, posterior

    def flow(self, z: torch.Tensor, log_q: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Push a posterior sample through the flows, updating its log-density."""
        for cell in self.flows:
            z, log_det = cell(z)
            log_q = log_q - log_det
        return z, log_q

    def forward(self, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The decoder state with z_l taken in."""
        return self.dec_combiner(s, z)


# ------------------------------------------------------------------------ rules
class FromPosterior:
    """Every z from q(z|x), ``z = mu + temperature * sigma * eps`` (0: the mean), through the flows.

    Records each group's log q(z|x) (under the untempered posterior), log p(z) and KL
    (analytic without flows, ``log q - log p`` with them) and the z fed to the decoder.
    ``noise`` gives each group's eps (decoder order) instead of drawing it from ``generator``:
    a compiled pass takes its draws as inputs, since a ``torch.Generator`` cannot enter a traced graph.
    """

    def __init__(self, temperature: float = 1.0, generator: Optional[torch.Generator] = None,
                 noise: Optional[Sequence[torch.Tensor]] = None):
        self.temperature, self.generator, self.noise = temperature, generator, noise
        self.log_q: List[torch.Tensor] = []
        self.log_p: List[torch.Tensor] = []
        self.kl: List[torch.Tensor] = []
        self.latents: List[torch.Tensor] = []

    def __call__(self, index: int, group: LatentGroup, prior: Normal, posterior: Normal) -> torch.Tensor:
        z = posterior.sample(self.temperature, self.generator, None if self.noise is None else self.noise[index])
        log_q = posterior.log_prob(z)
        if group.flows:
            z, log_q = group.flow(z, log_q)
        log_p = prior.log_prob(z)
        if group.flows:
            kl = log_q - log_p
        elif isinstance(posterior, ResidualNormal):
            kl = posterior.kl_to_prior()
        else:
            kl = posterior.kl(prior)
        self.log_q.append(log_q.flatten(1).sum(1))
        self.log_p.append(log_p.flatten(1).sum(1))
        self.kl.append(kl.sum(dim=(2, 3)))
        self.latents.append(z)
        return z


class FromPrior:
    """Every z from the prior, group ``l`` at ``temperatures[l]`` (0: the prior mean)."""

    def __init__(self, temperatures: Sequence[float], generator: Optional[torch.Generator] = None):
        self.temperatures, self.generator = list(temperatures), generator

    def __call__(self, index: int, group: LatentGroup, prior: Normal, posterior: Optional[Normal]) -> torch.Tensor:
        return prior.sample(self.temperatures[index], self.generator)


class Given:
    """The z of each group given, one tensor per group (e.g. ``NVAEOutput.latents``)."""

    def __init__(self, latents: Sequence[torch.Tensor]):
        self.latents = list(latents)

    def __call__(self, index: int, group: LatentGroup, prior: Normal, posterior: Optional[Normal]) -> torch.Tensor:
        return self.latents[index]


class PartialPosterior:
    """The first ``keep`` groups from q(z|x) (at ``posterior_temperature``, through the flows),
    the others from the prior, group ``l`` at ``temperatures[l]`` (vdvae's partial reconstructions:
    what each depth of the hierarchy holds)."""

    def __init__(self, keep: int, temperatures: Sequence[float], posterior_temperature: float = 0.0,
                 generator: Optional[torch.Generator] = None):
        self.keep = keep
        self.posterior = FromPosterior(posterior_temperature, generator)
        self.prior = FromPrior(temperatures, generator)

    def __call__(self, index: int, group: LatentGroup, prior: Normal, posterior: Optional[Normal]) -> torch.Tensor:
        if index < self.keep:
            return self.posterior(index, group, prior, posterior)
        return self.prior(index, group, prior, posterior)
