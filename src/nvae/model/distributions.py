"""Distributions of NVAE: the (residual) Normal of the latents and the output likelihoods p(x|z)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def soft_clamp5(x: torch.Tensor) -> torch.Tensor:
    """Differentiable clamp to (-5, 5): ``5 tanh(x / 5)``."""
    return 5.0 * torch.tanh(x / 5.0)


def _randn_like(t: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    if generator is None:   # the default generator; only this form of randn takes a traced graph's symbolic shape
        return torch.randn(t.shape, device=t.device, dtype=t.dtype)
    return torch.randn(t.shape, generator=generator, device=t.device, dtype=t.dtype)


def _rand_like(t: torch.Tensor, generator: Optional[torch.Generator], low: float, high: float) -> torch.Tensor:
    u = torch.rand(t.shape, generator=generator, device=t.device, dtype=t.dtype)
    return low + (high - low) * u


class Normal:
    """Diagonal Normal with NVAE's soft clamps: ``mu = 5 tanh(mu/5)``, ``sigma = exp(5 tanh(log_sigma/5)) + 0.01``.

    ``temperature`` multiplies sigma (low-temperature sampling).
    """

    def __init__(self, mu: torch.Tensor, log_sigma: torch.Tensor, temperature: float = 1.0):
        self.mu = soft_clamp5(mu)
        self.sigma = torch.exp(soft_clamp5(log_sigma)) + 1e-2
        if temperature != 1.0:
            self.sigma = self.sigma * temperature

    def sample(self, temperature: float = 1.0, generator: Optional[torch.Generator] = None,
               eps: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``mu + temperature * sigma * eps``, ``eps`` ~ N(0, I) drawn from ``generator`` unless given;
        temperature 0 returns the mean (and draws nothing)."""
        if temperature == 0.0:
            return self.mu
        if eps is None:
            eps = _randn_like(self.mu, generator)
        return self.mu + (temperature * self.sigma) * eps

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Element-wise log density."""
        n = (z - self.mu) / self.sigma
        return -0.5 * n * n - 0.5 * math.log(2 * math.pi) - torch.log(self.sigma)

    def kl(self, other: "Normal") -> torch.Tensor:
        """Element-wise KL(self || other), analytic."""
        t1 = (self.mu - other.mu) / other.sigma
        t2 = self.sigma / other.sigma
        return 0.5 * (t1 * t1 + t2 * t2) - 0.5 - torch.log(t2)


class ResidualNormal(Normal):
    """The posterior of NVAE, parameterised relative to its prior (paper, section 3.2).

    ``q = N(mu_p + dmu, sigma_p * dsigma)``: the encoder predicts only the
    correction (``dmu``, ``d log sigma``), added to the prior's raw parameters
    before the soft clamps, as in the official code. Its KL to the prior is
    ``1/2 (dmu^2 / sigma_p^2 + dsigma^2 - log dsigma^2 - 1)``.
    """

    def __init__(self, prior_mu: torch.Tensor, prior_log_sigma: torch.Tensor, delta_mu: torch.Tensor,
                 delta_log_sigma: torch.Tensor, prior: Normal):
        super().__init__(prior_mu + delta_mu, prior_log_sigma + delta_log_sigma)
        self.prior = prior

    def kl_to_prior(self) -> torch.Tensor:
        dmu = self.mu - self.prior.mu
        dsigma = self.sigma / self.prior.sigma
        return 0.5 * (dmu * dmu / (self.prior.sigma * self.prior.sigma) + dsigma * dsigma
                      - 2 * torch.log(dsigma) - 1)


# --------------------------------------------------------------------- p(x|z)
class Bernoulli:
    """Binary images (MNIST): independent Bernoulli pixels from logits."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) log-probabilities of ``x`` in {0, 1}."""
        return -F.binary_cross_entropy_with_logits(self.logits, x, reduction="none")

    def mean(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)

    def sample(self, temperature: float = 1.0, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        p = self.mean()
        return (torch.rand(p.shape, generator=generator, device=p.device, dtype=p.dtype) < p).to(p.dtype)


class NormalDecoder:
    """Continuous Normal likelihood on [-1, 1] (official ``num_mixture_dec 1``)."""

    def __init__(self, params: torch.Tensor):
        c = params.shape[1] // 2
        self.dist = Normal(params[:, :c], params[:, c:])

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return self.dist.log_prob(2 * x - 1)

    def mean(self) -> torch.Tensor:
        return self.dist.mu.clamp(-1, 1) / 2 + 0.5

    def sample(self, temperature: float = 1.0, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """A sample on [-1, 1] mapped to [0, 1]; ``temperature`` scales sigma, as for the latents
        (the official code ignores it here)."""
        return self.dist.sample(temperature, generator).clamp(-1, 1) / 2 + 0.5


class DiscMixLogistic:
    """Discretised mixture of logistics (PixelCNN++) with linear RGB coupling, at any bit depth.

    ``params`` holds per pixel M mixture logits and, per colour channel, M
    means, M log-scales (clamped at -7) and M coupling coefficients (tanh):
    green's mean moves with red, blue's with red and green. Grey images use
    M logits, M means, M log-scales. Bins have width ``2 / (2^bits - 1)`` on
    [-1, 1]; the two extreme values take the open tails, so the probabilities
    of all ``2^bits`` values sum to one. ``official_edge=True`` reproduces the
    official test (``x > 0.99`` takes the upper tail), which at 8 bits gives the
    tail to 254 as well and is not normalised.
    """

    def __init__(self, params: torch.Tensor, num_mix: int = 10, num_bits: int = 8, official_edge: bool = False):
        b, _, h, w = params.shape
        self.num_mix = m = num_mix
        self.max_val = 2.0 ** num_bits - 1
        self.official_edge = official_edge
        self.logit_probs = params[:, :m]                                     # B, M, H, W
        self.channels = 3 if params.shape[1] == 10 * m else 1
        rest = params[:, m:].reshape(b, self.channels, -1, h, w)             # B, C, 3M or 2M, H, W
        self.means = rest[:, :, :m]
        self.log_scales = rest[:, :, m:2 * m].clamp(min=-7.0)
        self.coeffs = torch.tanh(rest[:, :, 2 * m:3 * m]) if self.channels == 3 else None

    def _coupled_means(self, x: torch.Tensor) -> torch.Tensor:
        """Per-channel means given the (lower-index) observed channels; x is (B, C, 1, H, W)."""
        if self.channels == 1:
            return self.means
        r, g = x[:, 0], x[:, 1]
        return torch.stack([self.means[:, 0],
                            self.means[:, 1] + self.coeffs[:, 0] * r,
                            self.means[:, 2] + self.coeffs[:, 1] * r + self.coeffs[:, 2] * g], dim=1)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W) log-probability of ``x`` in [0, 1] on the ``2^bits`` grid, summed over channels."""
        x = (2 * x - 1).unsqueeze(2)                                          # B, C, 1, H, W
        centered = x - self._coupled_means(x)                                # B, C, M, H, W
        inv_scale = torch.exp(-self.log_scales)
        half_bin = 1.0 / self.max_val
        plus_in = inv_scale * (centered + half_bin)
        min_in = inv_scale * (centered - half_bin)
        log_cdf_plus = plus_in - F.softplus(plus_in)                         # log sigmoid(plus_in)
        log_one_minus_cdf_min = -F.softplus(min_in)                          # log (1 - sigmoid(min_in))
        cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
        mid_in = inv_scale * centered
        log_pdf_mid = mid_in - self.log_scales - 2.0 * F.softplus(mid_in)
        # Where the bin mass underflows, use the density at the bin centre times the bin width.
        log_prob_mid = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-10)),
                                   log_pdf_mid - math.log(self.max_val / 2))
        upper_edge = 0.99 if self.official_edge else 1.0 - half_bin
        log_probs = torch.where(x < -1.0 + half_bin, log_cdf_plus,
                                torch.where(x > upper_edge, log_one_minus_cdf_min, log_prob_mid))
        log_probs = log_probs.sum(dim=1) + F.log_softmax(self.logit_probs, dim=1)   # B, M, H, W
        return torch.logsumexp(log_probs, dim=1)

    def _select(self, component: torch.Tensor):
        sel = F.one_hot(component, self.num_mix).permute(0, 3, 1, 2).unsqueeze(1).to(self.means.dtype)
        means = (self.means * sel).sum(2)
        log_scales = (self.log_scales * sel).sum(2)
        coeffs = (self.coeffs * sel).sum(2) if self.coeffs is not None else None
        return means, log_scales, coeffs

    def _couple(self, x: torch.Tensor, coeffs: Optional[torch.Tensor]) -> torch.Tensor:
        if coeffs is None:
            return ((x.clamp(-1, 1)) + 1) / 2
        x0 = x[:, 0].clamp(-1, 1)
        x1 = (x[:, 1] + coeffs[:, 0] * x0).clamp(-1, 1)
        x2 = (x[:, 2] + coeffs[:, 1] * x0 + coeffs[:, 2] * x1).clamp(-1, 1)
        return (torch.stack([x0, x1, x2], dim=1) + 1) / 2

    def sample(self, temperature: float = 1.0, generator: Optional[torch.Generator] = None,
               official_temperature: bool = False) -> torch.Tensor:
        """A sample in [0, 1] (not rounded to the grid, as in the official code).

        ``temperature`` < 1 sharpens: it divides the mixture logits and multiplies
        the logistic scales. ``official_temperature=True`` draws as the official
        ``DiscMixLogistic.sample(t)`` does instead: logits divided by t and the
        logistic scales *divided* by t too, which makes pixels noisier below t = 1
        (the official training's sample grids; its evaluation samples at t = 1,
        where both agree). It needs t > 0.
        """
        if official_temperature and not temperature > 0:
            raise ValueError(f"the official draw divides the logistic scales by t; t must be > 0, got {temperature}")
        u = _rand_like(self.logit_probs, generator, 1e-5, 1 - 1e-5)
        gumbel = -torch.log(-torch.log(u))
        means, log_scales, coeffs = self._select(torch.argmax(self.logit_probs / temperature + gumbel, dim=1))
        u = _rand_like(means, generator, 1e-5, 1 - 1e-5)
        scale = torch.exp(log_scales) / temperature if official_temperature else torch.exp(log_scales) * temperature
        x = means + scale * (torch.log(u) - torch.log1p(-u))
        return self._couple(x, coeffs)

    def mean(self) -> torch.Tensor:
        """Mixture-weighted means pushed through the coupling (the official ``mean``)."""
        sel = torch.softmax(self.logit_probs, dim=1).unsqueeze(1)
        means = (self.means * sel).sum(2)
        coeffs = (self.coeffs * sel).sum(2) if self.coeffs is not None else None
        return self._couple(means, coeffs)


def output_distribution(params: torch.Tensor, decoder: str, num_mix: int = 10, num_bits: int = 8,
                        official_edge: bool = False):
    """The likelihood p(x|z) named by ``decoder`` ('bernoulli', 'mixture' or 'normal')."""
    if decoder == "bernoulli":
        return Bernoulli(params)
    if decoder == "normal":
        return NormalDecoder(params)
    return DiscMixLogistic(params, num_mix, num_bits, official_edge)


def sum_log_prob(log_prob: torch.Tensor, crop: int = 0) -> torch.Tensor:
    """Sum a per-pixel log-probability map to (B,), dropping ``crop`` pixels at each border."""
    if crop:
        log_prob = log_prob[..., crop:-crop, crop:-crop]
    return log_prob.flatten(1).sum(1)


__all__: Sequence[str] = ("Normal", "ResidualNormal", "Bernoulli", "NormalDecoder", "DiscMixLogistic",
                          "output_distribution", "sum_log_prob", "soft_clamp5")
