"""The NVAE network (paper, Figure 2): a bottom-up encoder, and one top-down walk over the latent groups.

Data flows: image -> stem -> pre-process cells -> encoder stages (one feature per
latent group) -> the top-down walk from the learned ``h0``: per group, decoder cells,
then the group's prior / posterior and its z (:mod:`nvae.model.latent_group`) -> post-process
cells -> output head -> p(x|z) (:mod:`nvae.model.distributions`). The same walk serves
training and evaluation (z from the posterior), sampling (from the prior), decoding
given latents, and partial-posterior samples; only the rule choosing z differs.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Callable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cells import Cell, DecCombiner, EncCombiner
from ..config import ARCH_INSTANCES, NVAEConfig
from .distributions import output_distribution, sum_log_prob
from .flows import PairedFlowCell
from .latent_group import FromPosterior, FromPrior, Given, LatentGroup, PartialPosterior, PriorHead
from .layers import WNConv2d
from .regularizers import SpectralRegularizer, batchnorm_loss

Temperature = Union[float, Sequence[float]]


class BottomUp(NamedTuple):
    """The encoder's output for a batch: one feature per latent group, in decoder order
    (the top group's already through ``encoder0``)."""

    features: Tuple[torch.Tensor, ...]

    def repeat(self, k: int) -> "BottomUp":
        """The same features for ``k`` copies of the batch (``x.repeat(k, 1, 1, 1)``'s order)."""
        return BottomUp(tuple(f.repeat(k, 1, 1, 1) for f in self.features))


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


class OutputHead(nn.Module):
    """ELU, 3x3 conv to the parameters of p(x|z)."""

    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.conv = WNConv2d(channels, out_channels, 3, padding=1)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.conv(F.elu(s))


def per_group(temperature: Temperature, num_groups: int) -> List[float]:
    """One temperature per latent group (decoder order) from one value, a list, or a
    :class:`~nvae.analysis.temperature_schedule.TemperatureSchedule` (anything with ``resolve(num_groups)``)."""
    if hasattr(temperature, "resolve"):
        return [float(t) for t in temperature.resolve(num_groups)]
    if isinstance(temperature, (int, float)):
        return [float(temperature)] * num_groups
    temps = [float(t) for t in temperature]
    if len(temps) != num_groups:
        raise ValueError(f"got {len(temps)} per-group temperatures for a model with {num_groups} groups")
    return temps


def iw_bound(log_w: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """The importance-weighted bound ``logsumexp_k(log w_k) - log K`` over ``dim`` (Burda et al.).

    With K = 1 it is the ELBO; it never exceeds log p(x) in expectation and
    tends to it as K grows.
    """
    return torch.logsumexp(log_w, dim=dim) - math.log(log_w.shape[dim])


def default_max_batch(device: Union[str, torch.device]) -> int:
    """Images per forward pass of an importance-weighted evaluation, K folded in, when none is asked for:
    64 on a CPU (larger passes are memory-bound there and get slower), 1024 on a GPU."""
    return 1024 if torch.device(device).type == "cuda" else 64


@contextlib.contextmanager
def training_mode(module: nn.Module, training: bool) -> Iterator[nn.Module]:
    """``module`` in training (or eval) mode for the block, then back in the mode it was in."""
    was_training = module.training
    module.train(training)
    try:
        yield module
    finally:
        module.train(was_training)


# -------------------------------------------------------------------- builders
# Modules are created in the official code's order, so a seed gives the official
# initialisation (and the one nvae's earlier layout gave).
def _channels(c: NVAEConfig, scale_from_top: int) -> Tuple[int, int]:
    """(encoder, decoder) channels at a latent scale counted from the coarsest (0)."""
    mult = 2 ** (c.num_preprocess_blocks + c.num_latent_scales - 1 - scale_from_top)
    return c.num_channels_enc * mult, c.num_channels_dec * mult


def _scales_top_down(c: NVAEConfig) -> Iterator[Tuple[int, int]]:
    """(scale from the top, group within the scale) of every latent group, in decoder order."""
    for s in range(c.num_latent_scales):
        for g in range(c.groups_per_scale[c.num_latent_scales - 1 - s]):
            yield s, g


def _preprocess(c: NVAEConfig) -> nn.ModuleList:
    """Pre-process blocks, each ending in a down-sampling cell."""
    arch, cells, ch = ARCH_INSTANCES[c.arch_instance], nn.ModuleList(), c.num_channels_enc
    for _ in range(c.num_preprocess_blocks):
        for i in range(c.num_preprocess_cells):
            last = i == c.num_preprocess_cells - 1
            role = "down_pre" if last else "normal_pre"
            cells.append(Cell(ch, 2 * ch if last else ch, role, arch[role], c.use_se))
            ch = 2 * ch if last else ch
    return cells


def _encoder(c: NVAEConfig) -> Tuple[nn.ModuleList, List[EncCombiner]]:
    """The encoder's stages (finest first, one per group: [down cell,] cells) and the
    encoder combiners of the groups below the top, in encoder order."""
    arch, stages, combiners = ARCH_INSTANCES[c.arch_instance], nn.ModuleList(), []
    groups = list(_scales_top_down(c))[::-1]
    for k, (s, g) in enumerate(groups):
        ch_enc, ch_dec = _channels(c, s)
        stage = nn.Sequential()
        if g == c.groups_per_scale[c.num_latent_scales - 1 - s] - 1 and k > 0:   # first group of a coarser scale
            stage.append(Cell(ch_enc // 2, ch_enc, "down_enc", arch["down_enc"], c.use_se))
        for _ in range(c.num_cell_per_cond_enc):
            stage.append(Cell(ch_enc, ch_enc, "normal_enc", arch["normal_enc"], c.use_se))
        if k < len(groups) - 1:
            combiners.append(EncCombiner(ch_enc, ch_dec))
        stages.append(stage)
    return stages, combiners


def _latent_heads(c: NVAEConfig) -> Tuple[list, list, list]:
    """Per group (decoder order): posterior head, flows, prior head (None for the top)."""
    posterior, flows, prior = [], [], []
    for s, g in _scales_top_down(c):
        ch_enc, ch_dec = _channels(c, s)
        posterior.append(WNConv2d(ch_enc, 2 * c.num_latent_per_group, 3, padding=1))
        flows.append([PairedFlowCell(c.num_latent_per_group) for _ in range(c.num_nf)])
        prior.append(None if (s, g) == (0, 0) else PriorHead(ch_dec, c.num_latent_per_group))
    return posterior, flows, prior


def _decoder(c: NVAEConfig) -> Tuple[nn.ModuleList, List[DecCombiner]]:
    """The decoder's stages (one per group: [up cell,] cells; none before the top group)
    and each group's decoder combiner, in decoder order."""
    arch, stages, combiners = ARCH_INSTANCES[c.arch_instance], nn.ModuleList(), []
    for s, g in _scales_top_down(c):
        ch = _channels(c, s)[1]
        stage = nn.Sequential()
        if s > 0 and g == 0:
            stage.append(Cell(2 * ch, ch, "up_dec", arch["up_dec"], c.use_se))
        if (s, g) != (0, 0):
            for _ in range(c.num_cell_per_cond_dec):
                stage.append(Cell(ch, ch, "normal_dec", arch["normal_dec"], c.use_se))
        stages.append(stage)
        combiners.append(DecCombiner(ch, c.num_latent_per_group))
    return stages, combiners


def _postprocess(c: NVAEConfig) -> nn.ModuleList:
    """Post-process blocks, each starting with an up-sampling cell."""
    arch, cells = ARCH_INSTANCES[c.arch_instance], nn.ModuleList()
    ch = c.num_channels_dec * 2 ** c.num_preprocess_blocks
    for _ in range(c.num_postprocess_blocks):
        for i in range(c.num_postprocess_cells):
            role = "up_post" if i == 0 else "normal_post"
            cells.append(Cell(ch, ch // 2 if i == 0 else ch, role, arch[role], c.use_se))
            ch = ch // 2 if i == 0 else ch
    return cells


class NVAE(nn.Module):
    """NVAE (Vahdat & Kautz, 2020) built from an :class:`NVAEConfig`.

    Inputs are images in [0, 1] of shape (B, in_channels, image_size, image_size),
    already quantised to ``num_x_bits`` (and binarised for the Bernoulli decoder).
    """

    def __init__(self, config: NVAEConfig):
        super().__init__()
        self.config = c = config
        top_enc, top_dec = _channels(c, 0)
        top_size = c.image_size // c.downsampling
        # The decoder starts from this learned tensor at the coarsest scale.
        self.h0 = nn.Parameter(torch.rand(top_dec, top_size, top_size))
        self.stem = WNConv2d(c.in_channels, c.num_channels_enc, 3, padding=1)
        self.preprocess = _preprocess(c)
        self.encoder_stages, enc_combiners = _encoder(c)
        self.encoder0 = Encoder0(top_enc)
        posterior, flows, prior = _latent_heads(c)
        decoder_stages, dec_combiners = _decoder(c)
        self.groups = nn.ModuleList(LatentGroup(*parts, residual=c.res_dist) for parts in
                                    zip(posterior, dec_combiners, prior, [None] + enc_combiners[::-1], flows))
        self.decoder_stages = decoder_stages
        self.postprocess = _postprocess(c)
        self.output_head = OutputHead(c.num_channels_dec, c.num_output_channels)
        # In the official module order, so a seed draws the power-iteration vectors it always drew.
        convs = [m for _, _, module in self.official_order() if module is not None
                 for m in module.modules() if isinstance(m, nn.Conv2d)]
        self.spectral = SpectralRegularizer(convs)

    def official_order(self) -> List[Tuple[str, str, Optional[nn.Module]]]:
        """``(section, our prefix, module)`` of every module, in the order the official code registers them
        (``h0`` has no module). The official towers interleave cells and combiners, where ours keep each
        combiner in its latent group; the spectral regulariser and the checkpoint key maps follow this order."""
        order: List[Tuple[str, str, Optional[nn.Module]]] = [("h0", "h0", None), ("stem", "stem", self.stem)]
        order += [("preprocess", f"preprocess.{i}", cell) for i, cell in enumerate(self.preprocess)]
        groups = self.groups
        for k, stage in enumerate(self.encoder_stages):
            order += [("encoder_tower", f"encoder_stages.{k}.{j}", cell) for j, cell in enumerate(stage)]
            if k < len(groups) - 1:
                g = len(groups) - 1 - k
                order.append(("encoder_tower", f"groups.{g}.enc_combiner", groups[g].enc_combiner))
        order.append(("encoder0", "encoder0.conv", self.encoder0.conv))
        order += [("posterior_heads", f"groups.{g}.posterior_head", group.posterior_head)
                  for g, group in enumerate(groups)]
        order += [("prior_heads", f"groups.{g}.prior_head.conv", groups[g].prior_head.conv)
                  for g in range(1, len(groups))]
        order += [("flows", f"groups.{g}.flows.{j}", f) for g, group in enumerate(groups) for j, f in enumerate(group.flows)]
        for g, (stage, group) in enumerate(zip(self.decoder_stages, groups)):
            order += [("decoder_tower", f"decoder_stages.{g}.{j}", cell) for j, cell in enumerate(stage)]
            order.append(("decoder_tower", f"groups.{g}.dec_combiner", group.dec_combiner))
        order += [("postprocess", f"postprocess.{i}", cell) for i, cell in enumerate(self.postprocess)]
        order.append(("output_head", "output_head.conv", self.output_head.conv))
        return order

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

    # ------------------------------------------------------------ the two passes
    def encode(self, x: torch.Tensor) -> BottomUp:
        """The deterministic bottom-up pass: the encoder's feature for every group.

        In eval mode it does not depend on the posterior samples, so importance
        sampling computes it once per image and reuses it for all K samples.
        """
        s = self.stem(2 * x - 1.0)
        for cell in self.preprocess:
            s = cell(s)
        features = []
        for stage in self.encoder_stages:
            s = stage(s)
            features.append(s)
        features[-1] = self.encoder0(features[-1])
        return BottomUp(tuple(features[::-1]))

    def top_down(self, n: int, rule, bottom_up: Optional[BottomUp] = None) -> torch.Tensor:
        """Walk the decoder from ``h0`` for ``n`` images; group ``l`` takes
        ``z = rule(l, group, prior, posterior)`` (the posterior is None without ``bottom_up``).
        Returns the parameters of p(x|z)."""
        s = self.h0.unsqueeze(0).expand(n, -1, -1, -1)
        for index, (cells, group) in enumerate(zip(self.decoder_stages, self.groups)):
            s = cells(s)
            prior, posterior = group.distributions(s, None if bottom_up is None else bottom_up.features[index])
            s = group(s, rule(index, group, prior, posterior))
        for cell in self.postprocess:
            s = cell(s)
        return self.output_head(s)

    def forward(self, x: torch.Tensor, temperature: float = 1.0,
                generator: Optional[torch.Generator] = None, bottom_up: Optional[BottomUp] = None,
                noise: Optional[Sequence[torch.Tensor]] = None) -> NVAEOutput:
        """Encode ``x``, sample every group from the posterior, decode, and score.

        ``temperature`` scales the posterior noise: ``z = mu + temperature * sigma * eps``;
        0 gives the posterior means (a deterministic encoding). log q is always
        evaluated under the untempered posterior. ``bottom_up`` is :meth:`encode`'s
        result for ``x``, when the caller already has it. ``noise`` holds every group's
        eps (decoder order, one (B, C, H, W) per group), given instead of drawn from ``generator``.
        """
        rule = FromPosterior(temperature, generator, noise)
        logits = self.top_down(x.shape[0], rule, self.encode(x) if bottom_up is None else bottom_up)
        recon = -sum_log_prob(self.output_distribution(logits).log_prob(x), self.config.crop_output)
        kl_channels = torch.stack(rule.kl, dim=1)
        return NVAEOutput(logits=logits, recon=recon, kl=kl_channels.sum(2), log_q=sum(rule.log_q),
                          log_p=sum(rule.log_p), kl_per_channel=kl_channels, latents=tuple(rule.latents))

    # --------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample_logits(self, n: int, temperature: Temperature = 1.0,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Parameters of p(x|z) for ``n`` ancestral samples of the prior.

        ``temperature`` (one value, or one per group in decoder order) scales every
        prior sigma; 0 takes every z at its prior mean.
        """
        return self.top_down(n, FromPrior(per_group(temperature, self.num_groups), generator))

    @torch.no_grad()
    def decode_logits(self, latents: Sequence[torch.Tensor]) -> torch.Tensor:
        """Parameters of p(x|z) for given latents, one tensor per group (e.g. ``NVAEOutput.latents``)."""
        if len(latents) != self.num_groups:
            raise ValueError(f"got {len(latents)} latent groups for a model with {self.num_groups}")
        return self.top_down(latents[0].shape[0], Given(latents))

    @torch.no_grad()
    def partial_posterior_logits(self, x: torch.Tensor, keep: int, temperature: Temperature = 1.0,
                                 posterior_temperature: float = 0.0,
                                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Parameters of p(x|z) with the first ``keep`` groups from q(z|x) (at ``posterior_temperature``,
        0: the means) and the rest from the prior at ``temperature`` (one, a per-group list or a
        schedule): what the top ``keep`` groups say about ``x``. ``keep = num_groups`` is the
        reconstruction, ``keep = 0`` a prior sample."""
        if not 0 <= keep <= self.num_groups:
            raise ValueError(f"keep must be in 0..{self.num_groups} (the number of groups), got {keep}")
        rule = PartialPosterior(keep, per_group(temperature, self.num_groups), posterior_temperature, generator)
        return self.top_down(x.shape[0], rule, self.encode(x))

    @torch.no_grad()
    def sample(self, n: int, temperature: Temperature = 1.0, generator: Optional[torch.Generator] = None,
               mean: Optional[bool] = None) -> torch.Tensor:
        """``n`` images in [0, 1] from the prior at ``temperature``.

        Like the official evaluation, binary images show the Bernoulli means and
        colour images a sample of p(x|z): the temperature acts on the latents only,
        the pixel noise stays at temperature 1. Temperature 0 everywhere draws
        nothing at all: every z at its prior mean and each image p(x|z)'s mean, so
        every seed gives the same images. ``mean=True`` or ``False`` forces means
        or draws.
        """
        temperatures = per_group(temperature, self.num_groups)
        dist = self.output_distribution(self.sample_logits(n, temperatures, generator))
        if mean is None:
            mean = self.config.decoder == "bernoulli" or not any(temperatures)
        return dist.mean() if mean else dist.sample(1.0, generator)

    # ------------------------------------------------------------- likelihood
    def posterior_pass(self, x: torch.Tensor, bottom_up: BottomUp, generator: Optional[torch.Generator] = None,
                       noise: Optional[Sequence[torch.Tensor]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Importance sampling's inner pass: one posterior sample per image of ``x`` (``bottom_up`` its
        :meth:`encode`), scored as ``(log_w, nelbo)``, each (B,); see :meth:`importance_sample`."""
        out = self(x, generator=generator, bottom_up=bottom_up, noise=noise)
        return -out.recon - out.log_q + out.log_p, out.recon + out.kl.sum(1)

    @torch.no_grad()
    def importance_sample(self, x: torch.Tensor, num_samples: int, max_batch: Optional[int] = None,
                          generator: Optional[torch.Generator] = None, posterior_pass: Optional[Callable] = None):
        """Draw K posterior samples per image; returns ``(log_w, nelbo)``, each (K, B).

        ``log_w = log p(x|z_k) + log p(z_k) - log q(z_k|x)`` and ``nelbo = recon + KL``
        (KL as in training: analytic without flows). The K samples are folded into
        the batch in chunks of at most ``max_batch`` images per forward pass; BN
        runs in eval mode, so folding does not change any number, and the
        bottom-up pass, which does not depend on the samples, runs once per image. The default is
        64 images on CPU (larger passes are memory-bound there and get slower)
        and 1024 on GPU. ``posterior_pass(x, bottom_up, generator)`` scores each chunk (default
        :meth:`posterior_pass`; :func:`nvae.speedups.compile.compile_eval` gives a compiled one).
        """
        if max_batch is None:
            max_batch = default_max_batch(x.device)
        score = self.posterior_pass if posterior_pass is None else posterior_pass
        b = x.shape[0]
        per_chunk = max(1, max_batch // b)
        log_w, nelbo = [], []
        with training_mode(self, False):
            bottom_up = self.encode(x)   # deterministic in eval mode: once, not K times
            for start in range(0, num_samples, per_chunk):
                k = min(per_chunk, num_samples - start)
                chunk_log_w, chunk_nelbo = score(x.repeat(k, 1, 1, 1), bottom_up.repeat(k), generator)
                log_w.append(chunk_log_w.view(k, b))
                nelbo.append(chunk_nelbo.view(k, b))
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

    # ---------------------------------------------------------- regularisers
    def spectral_loss(self) -> torch.Tensor:
        """Spectral regularisation L_SR: the sum of the convolutions' largest singular values."""
        return self.spectral()

    def batchnorm_loss(self) -> torch.Tensor:
        """BN regularisation L_BN: the sum over BN layers of max |gamma|."""
        # Looked up on each call: BN layers may be swapped (synchronised BN under DDP).
        return batchnorm_loss([m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)])

    # ------------------------------------------------------------ checkpoints
    # Thin doors to nvae.formats, imported when called: the network itself reads and writes no file.
    def save(self, path: Union[str, Path], **extra) -> None:
        """Write config, weights and buffers to ``path`` atomically (see :mod:`nvae.formats.checkpoint`)."""
        from ..formats.checkpoint import save_model
        save_model(self, path, **extra)

    @classmethod
    def from_checkpoint(cls, path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> "NVAE":
        """Rebuild a model saved by :meth:`save` (never unpickles anything but tensors and plain data): the
        plain network, as :class:`NVAE` builds it (``nvae.speedups.apply`` makes it faster)."""
        from ..formats.checkpoint import load_model
        return load_model(cls, path, map_location)

    @classmethod
    def from_official(cls, path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> "NVAE":
        """Load a checkpoint written by the official NVlabs/NVAE ``train.py``; returns the plain network in eval
        mode."""
        from ..formats.official import load_official
        return load_official(cls, path, map_location)
