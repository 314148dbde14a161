"""The NVAE network (paper, Figure 2): bidirectional encoder, top-down decoder shared by prior and posterior."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cells import ARCH_INSTANCES, Cell, DecCombiner, EncCombiner, cell_roles
from .config import NVAEConfig
from .distributions import Normal, ResidualNormal, output_distribution, sum_log_prob
from .flows import PairedFlowCell
from .layers import WNConv2d
from .objective import iw_bound
from .regularizers import SpectralRegularizer, batchnorm_loss

Temperature = Union[float, Sequence[float]]


class BottomUp(NamedTuple):
    """The encoder's output for a batch: what the top-down pass combines with the decoder state."""

    q0: torch.Tensor            #: parameters of q(z_0|x) (mean and log-scale, stacked on channels)
    enc_states: tuple           #: encoder features for groups 1.., in decoder order

    def repeat(self, k: int) -> "BottomUp":
        """The same features for ``k`` copies of the batch (``x.repeat(k, 1, 1, 1)``'s order)."""
        return BottomUp(self.q0.repeat(k, 1, 1, 1), tuple(e.repeat(k, 1, 1, 1) for e in self.enc_states))


class NVAEOutput(NamedTuple):
    """What a forward pass returns. All values in nats, per image."""

    logits: torch.Tensor        #: parameters of p(x|z), (B, C_out, H, W)
    recon: torch.Tensor         #: -log p(x|z), (B,)
    kl: torch.Tensor            #: per-group KL, (B, L)
    log_q: torch.Tensor         #: log q(z|x) summed over groups, (B,)
    log_p: torch.Tensor         #: log p(z) summed over groups, (B,)
    kl_per_channel: torch.Tensor  #: KL per group and latent channel, summed over space, (B, L, num_latent_per_group)
    latents: tuple = ()         #: the z fed to the decoder, one (B, C, H, W) per group (after any flows)

    @property
    def elbo(self) -> torch.Tensor:
        """The evidence lower bound per image, (B,)."""
        return -self.recon - self.kl.sum(1)


class Encoder0(nn.Module):
    """ELU, 1x1 conv, ELU: the features of the top group's posterior."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = WNConv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.elu(self.conv(F.elu(x)))


class PriorHead(nn.Module):
    """ELU, 1x1 conv: (mu, log sigma) of p(z_l | z_<l) from the decoder state."""

    def __init__(self, channels: int, num_latent: int):
        super().__init__()
        self.conv = WNConv2d(channels, 2 * num_latent, 1)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.conv(F.elu(s))


class OutputHead(nn.Module):
    """ELU, 3x3 conv to the parameters of p(x|z)."""

    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.conv = WNConv2d(channels, out_channels, 3, padding=1)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.conv(F.elu(s))


def _per_group(temperature: Temperature, num_groups: int) -> List[float]:
    if isinstance(temperature, (int, float)):
        return [float(temperature)] * num_groups
    temps = [float(t) for t in temperature]
    if len(temps) != num_groups:
        raise ValueError(f"got {len(temps)} per-group temperatures for a model with {num_groups} groups")
    return temps


class NVAE(nn.Module):
    """NVAE (Vahdat & Kautz, 2020) built from an :class:`NVAEConfig`.

    Inputs are images in [0, 1] of shape (B, in_channels, image_size, image_size),
    already quantised to ``num_x_bits`` (and binarised for the Bernoulli decoder).
    """

    def __init__(self, config: NVAEConfig):
        super().__init__()
        self.config = c = config
        arch = ARCH_INSTANCES[c.arch_instance]
        nz = c.num_latent_per_group
        gps = c.groups_per_scale
        S = c.num_latent_scales
        top_mult = 2 ** (c.num_preprocess_blocks + S - 1)
        top_size = c.image_size // c.downsampling

        # The decoder starts from this learned tensor at the coarsest scale.
        self.h0 = nn.Parameter(torch.rand(c.num_channels_dec * top_mult, top_size, top_size))
        self.stem = WNConv2d(c.in_channels, c.num_channels_enc, 3, padding=1)

        # Bottom-up: pre-process blocks, each ending in a down-sampling cell.
        mult = 1
        self.preprocess = nn.ModuleList()
        for _ in range(c.num_preprocess_blocks):
            for i in range(c.num_preprocess_cells):
                ch = c.num_channels_enc * mult
                if i == c.num_preprocess_cells - 1:
                    self.preprocess.append(Cell(ch, 2 * ch, "down_pre", arch["down_pre"], c.use_se))
                    mult *= 2
                else:
                    self.preprocess.append(Cell(ch, ch, "normal_pre", arch["normal_pre"], c.use_se))

        # Bottom-up encoder tower, finest scale first; a combiner marks each group's feature.
        self.encoder_tower = nn.ModuleList()
        for s in range(S):
            for g in range(gps[s]):
                ch = c.num_channels_enc * mult
                for _ in range(c.num_cell_per_cond_enc):
                    self.encoder_tower.append(Cell(ch, ch, "normal_enc", arch["normal_enc"], c.use_se))
                if not (s == S - 1 and g == gps[s] - 1):
                    self.encoder_tower.append(EncCombiner(ch, c.num_channels_dec * mult))
            if s < S - 1:
                ch = c.num_channels_enc * mult
                self.encoder_tower.append(Cell(ch, 2 * ch, "down_enc", arch["down_enc"], c.use_se))
                mult *= 2
        self.encoder0 = Encoder0(c.num_channels_enc * mult)

        # Posterior and prior heads and flows, in decoder order (coarsest scale first).
        self.posterior_heads = nn.ModuleList()
        self.prior_heads = nn.ModuleList()
        self.flows = nn.ModuleList()
        m = top_mult
        for s in range(S):
            for g in range(gps[S - 1 - s]):
                self.posterior_heads.append(WNConv2d(c.num_channels_enc * m, 2 * nz, 3, padding=1))
                for _ in range(c.num_nf):
                    self.flows.append(PairedFlowCell(nz))
                if not (s == 0 and g == 0):   # p(z_1) is a fixed standard Normal
                    self.prior_heads.append(PriorHead(c.num_channels_dec * m, nz))
            m //= 2

        # Top-down decoder tower: cells, then a combiner taking in z_l; up-sampling between scales.
        self.decoder_tower = nn.ModuleList()
        m = top_mult
        for s in range(S):
            ch = c.num_channels_dec * m
            for g in range(gps[S - 1 - s]):
                if not (s == 0 and g == 0):
                    for _ in range(c.num_cell_per_cond_dec):
                        self.decoder_tower.append(Cell(ch, ch, "normal_dec", arch["normal_dec"], c.use_se))
                self.decoder_tower.append(DecCombiner(ch, nz))
            if s < S - 1:
                self.decoder_tower.append(Cell(ch, ch // 2, "up_dec", arch["up_dec"], c.use_se))
                m //= 2

        # Post-process blocks, each starting with an up-sampling cell.
        self.postprocess = nn.ModuleList()
        for _ in range(c.num_postprocess_blocks):
            for i in range(c.num_postprocess_cells):
                ch = c.num_channels_dec * m
                if i == 0:
                    self.postprocess.append(Cell(ch, ch // 2, "up_post", arch["up_post"], c.use_se))
                    m //= 2
                else:
                    self.postprocess.append(Cell(ch, ch, "normal_post", arch["normal_post"], c.use_se))
        self.output_head = OutputHead(c.num_channels_dec * m, c.num_output_channels)

        self.spectral = SpectralRegularizer([mod for mod in self.modules() if isinstance(mod, nn.Conv2d)])

    # ------------------------------------------------------------- properties
    @property
    def num_groups(self) -> int:
        return self.config.num_groups

    @property
    def groups_per_scale(self):
        return self.config.groups_per_scale

    @property
    def latent_shapes(self) -> List[tuple]:
        """(channels, height, width) of each latent group, in decoder order."""
        c, shapes = self.config, []
        size = c.image_size // c.downsampling
        for s in range(c.num_latent_scales):
            shapes += [(c.num_latent_per_group, size, size)] * c.groups_per_scale[c.num_latent_scales - 1 - s]
            size *= 2
        return shapes

    def output_distribution(self, logits: torch.Tensor):
        """p(x|z) for the given output-head parameters."""
        c = self.config
        return output_distribution(logits, c.decoder, c.num_mixture_dec, c.num_x_bits, c.official_edge)

    # ---------------------------------------------------------------- forward
    def _flow(self, group: int, z: torch.Tensor, log_q: torch.Tensor):
        n = self.config.num_nf
        for flow in self.flows[group * n:(group + 1) * n]:
            z, log_det = flow(z)
            log_q = log_q - log_det
        return z, log_q

    def _decode_tail(self, s: torch.Tensor) -> torch.Tensor:
        for cell in self.postprocess:
            s = cell(s)
        return self.output_head(s)

    @property
    def _enc_combiners(self) -> List[EncCombiner]:
        """The encoder's combiner cells, in decoder order (matching ``BottomUp.enc_states``)."""
        return [cell for cell in self.encoder_tower if isinstance(cell, EncCombiner)][::-1]

    def encode(self, x: torch.Tensor) -> "BottomUp":
        """The deterministic bottom-up pass: the encoder's features for every group (see :meth:`forward`).

        In eval mode it does not depend on the posterior samples, so importance
        sampling computes it once per image and reuses it for all K samples.
        """
        s = self.stem(2 * x - 1.0)
        for cell in self.preprocess:
            s = cell(s)
        enc_states = []
        for cell in self.encoder_tower:
            if isinstance(cell, EncCombiner):
                enc_states.append(s)
            else:
                s = cell(s)
        enc_states.reverse()
        q0 = self.posterior_heads[0](self.encoder0(s))
        return BottomUp(q0, tuple(enc_states))

    def forward(self, x: torch.Tensor, temperature: float = 1.0,
                generator: Optional[torch.Generator] = None, bottom_up: Optional["BottomUp"] = None) -> NVAEOutput:
        """Encode ``x``, sample every group from the posterior, decode, and score.

        ``temperature`` scales the posterior noise: ``z = mu + temperature * sigma * eps``;
        0 gives the posterior means (a deterministic encoding). log q is always
        evaluated under the untempered posterior. ``bottom_up`` is :meth:`encode`'s
        result for ``x``, when the caller already has it.
        """
        with_flows = self.config.num_nf > 0
        if bottom_up is None:
            bottom_up = self.encode(x)
        enc_states = bottom_up.enc_states
        enc_combiners = self._enc_combiners

        log_qs, log_ps, kls, latents = [], [], [], []

        def visit(q: Normal, p: Normal, group: int) -> torch.Tensor:
            z = q.sample(generator, temperature)
            log_q = q.log_prob(z)
            if with_flows:
                z, log_q = self._flow(group, z, log_q)
            log_p = p.log_prob(z)
            if with_flows:
                kl = log_q - log_p
            elif isinstance(q, ResidualNormal):
                kl = q.kl_to_prior()
            else:
                kl = q.kl(p)
            log_qs.append(log_q.flatten(1).sum(1))
            log_ps.append(log_p.flatten(1).sum(1))
            kls.append(kl.sum(dim=(2, 3)))
            latents.append(z)
            return z

        mu_q, log_sigma_q = bottom_up.q0.chunk(2, dim=1)
        zeros = torch.zeros_like(mu_q)
        z = visit(Normal(mu_q, log_sigma_q), Normal(zeros, zeros), 0)

        s = self.h0.unsqueeze(0).expand(x.shape[0], -1, -1, -1)
        group = 0
        for cell in self.decoder_tower:
            if isinstance(cell, DecCombiner):
                if group > 0:
                    mu_p, log_sigma_p = self.prior_heads[group - 1](s).chunk(2, dim=1)
                    prior = Normal(mu_p, log_sigma_p)
                    feature = enc_combiners[group - 1](enc_states[group - 1], s)
                    mu_q, log_sigma_q = self.posterior_heads[group](feature).chunk(2, dim=1)
                    if self.config.res_dist:
                        q = ResidualNormal(mu_p, log_sigma_p, mu_q, log_sigma_q, prior)
                    else:
                        q = Normal(mu_q, log_sigma_q)
                    z = visit(q, prior, group)
                s = cell(s, z)
                group += 1
            else:
                s = cell(s)

        logits = self._decode_tail(s)
        recon = -sum_log_prob(self.output_distribution(logits).log_prob(x), self.config.crop_output)
        kl_channels = torch.stack(kls, dim=1)
        return NVAEOutput(logits=logits, recon=recon, kl=kl_channels.sum(2), log_q=sum(log_qs),
                          log_p=sum(log_ps), kl_per_channel=kl_channels, latents=tuple(latents))

    # --------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample_logits(self, n: int, temperature: Temperature = 1.0,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Parameters of p(x|z) for ``n`` ancestral samples of the prior.

        ``temperature`` (one value, or one per group in decoder order) scales every
        prior sigma; 0 takes every z at its prior mean.
        """
        temps = _per_group(temperature, self.num_groups)

        def prior_sample(group: int, s: torch.Tensor) -> torch.Tensor:
            if group == 0:
                zeros = self.h0.new_zeros((n,) + self.latent_shapes[0])
                return Normal(zeros, zeros, temps[0]).sample(generator)
            mu_p, log_sigma_p = self.prior_heads[group - 1](s).chunk(2, dim=1)
            return Normal(mu_p, log_sigma_p, temps[group]).sample(generator)

        return self._top_down(n, prior_sample)

    @torch.no_grad()
    def decode_logits(self, latents: Sequence[torch.Tensor]) -> torch.Tensor:
        """Parameters of p(x|z) for given latents, one tensor per group (e.g. ``NVAEOutput.latents``)."""
        if len(latents) != self.num_groups:
            raise ValueError(f"got {len(latents)} latent groups for a model with {self.num_groups}")
        return self._top_down(latents[0].shape[0], lambda group, s: latents[group])

    def _top_down(self, n: int, latent_for_group) -> torch.Tensor:
        """Run the decoder from h0; ``latent_for_group(group, state)`` supplies each z."""
        s = self.h0.unsqueeze(0).expand(n, -1, -1, -1)
        group = 0
        for cell in self.decoder_tower:
            if isinstance(cell, DecCombiner):
                s = cell(s, latent_for_group(group, s))
                group += 1
            else:
                s = cell(s)
        return self._decode_tail(s)

    @torch.no_grad()
    def sample(self, n: int, temperature: Temperature = 1.0, generator: Optional[torch.Generator] = None,
               mean: Optional[bool] = None) -> torch.Tensor:
        """``n`` images in [0, 1] from the prior at ``temperature``.

        Like the official evaluation, binary images show the Bernoulli means and
        colour images a sample of p(x|z) (pixel noise at temperature 1: the
        temperature acts on the latents); ``mean=True`` or ``False`` forces one
        or the other.
        """
        dist = self.output_distribution(self.sample_logits(n, temperature, generator))
        if mean is None:
            mean = self.config.decoder == "bernoulli"
        return dist.mean() if mean else dist.sample(1.0, generator)

    # ------------------------------------------------------------- likelihood
    @contextlib.contextmanager
    def _eval_mode(self):
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    @torch.no_grad()
    def importance_sample(self, x: torch.Tensor, num_samples: int, max_batch: Optional[int] = None,
                          generator: Optional[torch.Generator] = None):
        """Draw K posterior samples per image; returns ``(log_w, nelbo)``, each (K, B).

        ``log_w = log p(x|z_k) + log p(z_k) - log q(z_k|x)`` and ``nelbo = recon + KL``
        (KL as in training: analytic without flows). The K samples are folded into
        the batch in chunks of at most ``max_batch`` images per forward pass; BN
        runs in eval mode, so folding does not change any number, and the
        bottom-up pass, which does not depend on the samples, runs once per image. The default is
        64 images on CPU (larger passes are memory-bound there and get slower)
        and 1024 on GPU.
        """
        if max_batch is None:
            max_batch = 1024 if x.device.type == "cuda" else 64
        b = x.shape[0]
        per_chunk = max(1, max_batch // b)
        log_w, nelbo = [], []
        with self._eval_mode():
            bottom_up = self.encode(x)   # deterministic in eval mode: once, not K times
            for start in range(0, num_samples, per_chunk):
                k = min(per_chunk, num_samples - start)
                out = self(x.repeat(k, 1, 1, 1), generator=generator, bottom_up=bottom_up.repeat(k))
                log_w.append((-out.recon - out.log_q + out.log_p).view(k, b))
                nelbo.append((out.recon + out.kl.sum(1)).view(k, b))
        return torch.cat(log_w, dim=0), torch.cat(nelbo, dim=0)

    def log_importance_weights(self, x: torch.Tensor, num_samples: int, max_batch: Optional[int] = None,
                               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """(K, B) log weights ``log p(x|z_k) + log p(z_k) - log q(z_k|x)``, z_k ~ q(z|x)."""
        return self.importance_sample(x, num_samples, max_batch, generator)[0]

    @torch.no_grad()
    def log_likelihood(self, x: torch.Tensor, num_samples: int = 1000, max_batch: Optional[int] = None,
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Importance-weighted estimate of log p(x) in nats, (B,).

        ``logsumexp_k(log w_k) - log K`` with K = ``num_samples`` posterior samples.
        """
        return iw_bound(self.log_importance_weights(x, num_samples, max_batch, generator))

    def set_checkpointing(self, enabled: bool = True, roles: Optional[Sequence[str]] = None) -> "NVAE":
        """Recompute cells in the backward pass instead of storing their activations.

        Same loss, gradients and BN statistics; less memory, more compute.
        ``roles`` restricts it to some cell roles (e.g. ``["normal_dec", "up_dec",
        "normal_post", "up_post"]``: the generative model's wide separable cells).
        """
        roles = None if roles is None else cell_roles(roles)
        for cell in self.modules():
            if isinstance(cell, Cell):
                cell.checkpointing = enabled and (roles is None or cell.role in roles)
        return self

    def set_recompute_bn(self, enabled: bool = True) -> "NVAE":
        """Keep only BN inputs for the backward pass and recompute the BN and Swish outputs there.

        Same values, gradients and BN statistics (:mod:`nvae.fused`); in the
        separable cells two thirds of the wide activations are not stored.
        Composes with :meth:`set_checkpointing`.
        """
        for m in self.modules():
            if hasattr(m, "recompute_bn"):
                m.recompute_bn = enabled
        return self

    # ---------------------------------------------------------- regularisers
    def spectral_loss(self) -> torch.Tensor:
        """Spectral regularisation L_SR: the sum of the convolutions' largest singular values."""
        return self.spectral()

    def batchnorm_loss(self) -> torch.Tensor:
        """BN regularisation L_BN: the sum over BN layers of max |gamma|."""
        # Looked up on each call: BN layers may be swapped (synchronised BN under DDP).
        return batchnorm_loss([m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)])

    # ------------------------------------------------------------ checkpoints
    def save(self, path: Union[str, Path], **extra) -> None:
        """Write config, weights and buffers to ``path`` atomically (see :mod:`nvae.checkpoint`)."""
        from .checkpoint import save_model
        save_model(self, path, **extra)

    @classmethod
    def from_checkpoint(cls, path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> "NVAE":
        """Rebuild a model saved by :meth:`save` (never unpickles anything but tensors and plain data)."""
        from .checkpoint import load_model
        return load_model(path, map_location)

    @classmethod
    def from_official(cls, path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> "NVAE":
        """Load a checkpoint written by the official NVlabs/NVAE ``train.py``; returns it in eval mode."""
        from .official import load_official
        return load_official(path, map_location)
