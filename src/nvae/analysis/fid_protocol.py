"""How the images behind a model's FID are drawn: the official protocol and ours, sharded over processes.

The official evaluation (NVlabs/NVAE ``evaluate.py --eval_mode evaluate_fid``, ``train.py``'s
``test_vae_fid``) does three things that a plain "FID of samples" does not:

* with ``--readjust_bn`` it re-estimates the decoder's BN statistics from 500 batches of 2
  prior samples at the given temperature ``t``;
* it then draws its 50,000 images at temperature 1.0 whatever ``t`` was (``t`` acts only
  through the re-adjusted BN statistics);
* it feeds Inception the *mean* of p(x|z): the mixture-weighted logistic means pushed through
  the RGB coupling (:meth:`nvae.model.distributions.DiscMixLogistic.mean`) for colour data, the
  Bernoulli means for binary data, as floats (not rounded to 8 bits). (The official
  ``NormalDecoder`` has no mean and would fail there; ours uses the clamped Normal mean.)

Over several GPUs it gives each GPU ``ceil(50000 / GPUs)`` images and averages the GPUs' means
and covariances. Here every process draws the global batches ``rank, rank + world, ...`` of
exactly ``num_samples`` images, each batch from a generator seeded by ``(seed, batch index)``,
so the images are the same whatever the number of processes. Their statistics are reduced
``pooled`` by default (sums of features and of outer products added up: the statistics of all
images, identical for any number of processes) or ``average`` (the official averaging, which
differs from pooled by the spread of the per-process means, a relative O(processes / images)).

``ours`` lets the temperature act on the samples too: latents drawn at ``t`` and, as
:meth:`nvae.NVAE.sample` and ``nvae sample`` give them, a sample of p(x|z) for colour models
(pixel noise at temperature 1) and the Bernoulli means for binary ones; ``--readjust-bn``
re-adjusts with 36 samples per batch, as ``nvae sample --readjust-bn`` does (and shares its cache).
"""
from __future__ import annotations

import argparse
import contextlib
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Tuple, Union

import torch
from torch.utils.data import ConcatDataset, Dataset

from ..distributed import DistributedContext
from ..formats.checkpoint import CheckpointError, safe_load
from ..formats.opened import OpenedCheckpoint
from .fid import REDUCTIONS, FeatureMoments, FIDError, Stats, frechet_distance
from ..model.network import NVAE, Temperature, training_mode
from ..seeds import EVAL_BATCH, derived_seed
from .sampling import decoder_bn_layers, readjust_bn, readjust_bn_cached, temperature_name

__all__ = ["PROTOCOLS", "FIDProtocol", "is_official_checkpoint", "default_protocol", "prepare_bn",
           "sample_moments", "protocol_statistics", "protocol_fid", "bn_cache_checkpoint",
           "STATS_MERGED_SPLITS", "stats_splits", "stats_dataset"]

PROTOCOLS = ("official", "ours")

#: Samples per BN re-adjustment batch: the official FID evaluation's, and ``readjust_bn``'s default
#: (the official sampling mode's, used by ``nvae sample``).
OFFICIAL_READJUST_BATCH = 2
SAMPLE_READJUST_BATCH = 36


@dataclass(frozen=True)
class FIDProtocol:
    """Which images a model's FID is computed from, and how many.

    ``name`` is ``official`` or ``ours`` (module docstring). ``temperature`` is the ``-t``
    of the command: under ``official`` it only sets the temperature of the BN
    re-adjustment. ``readjust_batch`` defaults to 2 (official) or 36 (ours).
    Batch ``b`` of ``batch_size`` images is drawn with a generator seeded by
    ``(seed, b)``; ``reduction`` is one of :data:`nvae.analysis.fid.REDUCTIONS`.
    """

    name: str = "official"
    temperature: Temperature = 1.0
    readjust_bn: bool = False
    readjust_steps: int = 500
    readjust_batch: Optional[int] = None
    num_samples: int = 50000
    batch_size: int = 100
    seed: int = 0
    reduction: str = "pooled"

    def __post_init__(self):
        if self.name not in PROTOCOLS:
            raise FIDError(f"protocol must be one of {PROTOCOLS}, got {self.name!r}")
        if self.reduction not in REDUCTIONS:
            raise FIDError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        temps = [self.temperature] if isinstance(self.temperature, (int, float)) else list(self.temperature)
        if not temps or not all(math.isfinite(t) and t >= 0 for t in temps):
            raise FIDError(f"the temperature must be finite and non-negative, got {self.temperature!r}")
        for field, low in (("readjust_steps", 1), ("num_samples", 2), ("batch_size", 1)):
            if getattr(self, field) < low:
                raise FIDError(f"{field} must be at least {low}, got {getattr(self, field)}")
        if self.readjust_batch is not None and self.readjust_batch < 1:
            raise FIDError(f"readjust_batch must be at least 1, got {self.readjust_batch}")

    @property
    def bn_batch(self) -> int:
        """Samples per BN re-adjustment step."""
        if self.readjust_batch is not None:
            return self.readjust_batch
        return OFFICIAL_READJUST_BATCH if self.name == "official" else SAMPLE_READJUST_BATCH

    @property
    def sampling_temperature(self) -> Temperature:
        """The temperature the latents of the FID images are drawn at: 1.0 under ``official``."""
        return 1.0 if self.name == "official" else self.temperature

    @property
    def quantizes(self) -> bool:
        """Whether images are rounded to 8 bits before Inception (as PNG files would be): not under ``official``,
        whose float means go to Inception as they are."""
        return self.name != "official"

    def feeds_means(self, model: NVAE) -> bool:
        """Whether Inception sees the means of p(x|z) (else samples of it)."""
        return self.name == "official" or model.config.decoder == "bernoulli"

    def draw(self, model: NVAE, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``n`` images in [0, 1] as this protocol feeds them to Inception (``model`` in eval mode)."""
        return model.sample(n, self.sampling_temperature, generator, mean=self.feeds_means(model)).float()

    def describe(self, model: NVAE) -> dict:
        """The protocol's settings and what they mean for ``model``, for the output JSON."""
        out = asdict(self)
        out["protocol"] = out.pop("name")
        out["readjust_batch"] = self.bn_batch if self.readjust_bn else None
        out["readjust_steps"] = self.readjust_steps if self.readjust_bn else None
        out["bn_temperature"] = self.temperature if self.readjust_bn else None
        out["sampling_temperature"] = self.sampling_temperature
        out["rounded_to_8_bits"] = self.quantizes
        out["images"] = f"{'means' if self.feeds_means(model) else 'samples'} of p(x|z) ({model.config.decoder})"
        return out

    def shard(self, rank: int, world: int) -> range:
        """The global batch indices process ``rank`` of ``world`` draws."""
        return range(rank, math.ceil(self.num_samples / self.batch_size), world)

    def batch_len(self, index: int) -> int:
        return min(self.batch_size, self.num_samples - index * self.batch_size)


# ----------------------------------------------------------------------------- checkpoints
def is_official_checkpoint(path: Union[str, Path, OpenedCheckpoint]) -> bool:
    """Whether ``path`` (a checkpoint, a run directory, or a checkpoint already opened) was written by the
    official ``train.py``."""
    if isinstance(path, OpenedCheckpoint):
        return path.is_official
    p = Path(path)
    if p.is_dir():
        p = p / "checkpoint.pt"
    try:
        state = safe_load(p, "cpu", allowed_globals=[argparse.Namespace])
    except CheckpointError:
        return False
    return isinstance(state, dict) and isinstance(state.get("args"), argparse.Namespace)


def default_protocol(path: Union[str, Path, OpenedCheckpoint]) -> str:
    """``official`` for a checkpoint of the official code, ``ours`` for one of ours."""
    return "official" if is_official_checkpoint(path) else "ours"


def bn_cache_checkpoint(checkpoint: Union[str, Path], batch: int) -> Path:
    """The name re-adjusted BN statistics are cached under (:func:`nvae.analysis.sampling.bn_cache_path`).

    The cache is named after the checkpoint, the temperature and the steps; a batch other
    than ``nvae sample``'s 36 gets its own name, so the official FID's 2-sample statistics
    never stand in for the 36-sample ones or the reverse.
    """
    checkpoint = Path(checkpoint)
    if batch == SAMPLE_READJUST_BATCH:
        return checkpoint
    return checkpoint.with_name(f"{checkpoint.stem}.b{batch}{checkpoint.suffix}")


# ----------------------------------------------------------------------------- drawing
def _device(model: NVAE) -> torch.device:
    return next(model.parameters()).device


def prepare_bn(model: NVAE, protocol: FIDProtocol, checkpoint: Union[str, Path, None] = None,
               dist_ctx: DistributedContext = DistributedContext(), progress: bool = False) -> Optional[bool]:
    """Re-adjust the decoder BN statistics if ``protocol`` asks; None if not, else whether a cache was used.

    The generator is seeded with ``protocol.seed``. With ``checkpoint`` the statistics are
    cached beside it (:func:`bn_cache_checkpoint`). Under torchrun rank 0 re-adjusts and
    every process receives its statistics, so all draw from the same model.
    """
    if not protocol.readjust_bn:
        return None
    main = dist_ctx.is_main
    cached = False
    if main:
        g = torch.Generator(_device(model)).manual_seed(protocol.seed)
        args = (protocol.temperature, protocol.readjust_steps, protocol.bn_batch, g, progress)
        if checkpoint is None:
            readjust_bn(model, *args)
        else:
            cached = readjust_bn_cached(model, bn_cache_checkpoint(checkpoint, protocol.bn_batch), *args)
    if dist_ctx.enabled:
        import torch.distributed as dist
        for m in decoder_bn_layers(model).values():
            for buf in (m.running_mean, m.running_var):
                dist.broadcast(buf, src=0)
        flag = torch.tensor([1.0 if cached else 0.0], device=dist_ctx.device)
        dist.broadcast(flag, src=0)
        cached = bool(flag.item() > 0)
    model.eval()
    return cached


def sample_moments(model: NVAE, protocol: FIDProtocol, features, dist_ctx: DistributedContext = DistributedContext(),
                   progress: bool = True) -> FeatureMoments:
    """This process's share of the protocol's images, through ``features``, as :class:`FeatureMoments`.

    ``features`` maps images (B, C, H, W) in [0, 1] to (B, D) and has ``dims`` = D
    (:class:`nvae.analysis.fid.InceptionFeatures`). BN is used as it stands (see :func:`prepare_bn`).
    A ``quantize`` attribute of ``features`` is set to the protocol's choice while it runs.
    """
    from tqdm import tqdm
    world, rank = dist_ctx.world_size, dist_ctx.rank
    mine = protocol.shard(rank, world)
    moments = FeatureMoments(features.dims)
    device = _device(model)
    bar = tqdm(total=sum(protocol.batch_len(b) for b in mine), unit="img", desc=f"FID images ({protocol.name})",
               dynamic_ncols=True, disable=not (progress and rank == 0))
    with _quantizing(features, protocol.quantizes), training_mode(model, False), bar:
        for b in mine:
            g = torch.Generator(device).manual_seed(derived_seed(EVAL_BATCH, protocol.seed, b))
            x = protocol.draw(model, protocol.batch_len(b), g)
            moments.add(features(x))
            bar.update(len(x))
    return moments


@contextlib.contextmanager
def _quantizing(features, quantize: bool):
    """``features.quantize`` (where it exists) set to ``quantize`` for the block, then as it was."""
    before = getattr(features, "quantize", None)
    if before is not None:
        features.quantize = quantize
    try:
        yield
    finally:
        if before is not None:
            features.quantize = before


def _check_shards(protocol: FIDProtocol, world: int) -> None:
    """Under ``average`` every process needs 2 images; said on every process before anything is drawn."""
    if protocol.reduction != "average" or world == 1:
        return
    smallest = min(sum(protocol.batch_len(b) for b in protocol.shard(r, world)) for r in range(world))
    if smallest < 2:
        raise FIDError(f"with {world} processes, -n {protocol.num_samples} and --batch-size {protocol.batch_size} "
                       f"a process gets {smallest} image(s), and --reduction average needs 2 per process; "
                       "draw more images, use smaller batches or --reduction pooled")


def protocol_statistics(model: NVAE, protocol: FIDProtocol, features, checkpoint: Union[str, Path, None] = None,
                        dist_ctx: DistributedContext = DistributedContext(),
                        progress: bool = True) -> Tuple[Stats, dict]:
    """``((mu, sigma), info)`` of the protocol's images on every process.

    BN is re-adjusted first if asked (:func:`prepare_bn`); ``info`` is
    :meth:`FIDProtocol.describe` plus ``bn_from_cache`` and ``world_size``.
    """
    world = dist_ctx.world_size
    _check_shards(protocol, world)
    cached = prepare_bn(model, protocol, checkpoint, dist_ctx, progress)
    moments = sample_moments(model, protocol, features, dist_ctx, progress)
    stats = moments.reduce(dist_ctx, protocol.reduction)
    info = protocol.describe(model)
    info.update(bn_from_cache=cached, world_size=world)
    return stats, info


def protocol_fid(model: NVAE, protocol: FIDProtocol, features, reference: Stats,
                 checkpoint: Union[str, Path, None] = None, dist_ctx: DistributedContext = DistributedContext(),
                 progress: bool = True) -> dict:
    """FID of the protocol's images against ``reference`` ``(mu, sigma)``: ``{"fid": ..., **info}``."""
    if reference[0].shape[0] != features.dims:
        raise FIDError(f"the data statistics hold {reference[0].shape[0]} features but the feature extractor "
                       f"gives {features.dims}; compute both with the same --dims")
    stats, info = protocol_statistics(model, protocol, features, checkpoint, dist_ctx, progress)
    return {"fid": frechet_distance(reference, stats), **info}


def default_output_name(protocol: FIDProtocol) -> str:
    """``fid_official_t0.6_bn_n50000.json``: what the default output of ``nvae fid`` is called."""
    bn = "_bn" if protocol.readjust_bn else ""
    return f"fid_{protocol.name}_{temperature_name(protocol.temperature)}{bn}_n{protocol.num_samples}.json"


# ----------------------------------------------------------------------------- reference statistics
#: Data sets whose official reference statistics (``scripts/precompute_fid_statistics.py``) are of the
#: training and validation images together; the others use the training images only.
STATS_MERGED_SPLITS = frozenset({"celebahq256", "omniglot"})


def stats_splits(dataset: str, splits: Optional[str] = None) -> Tuple[str, ...]:
    """The splits reference statistics are computed from: ``splits`` ("train", "test" or
    "train,test") if given, else the official script's choice for ``dataset``."""
    if splits is None:
        return ("train", "test") if dataset in STATS_MERGED_SPLITS else ("train",)
    names = tuple(s.strip() for s in splits.split(",") if s.strip())
    if not names or any(s not in ("train", "test") for s in names) or len(set(names)) != len(names):
        raise FIDError(f"--split must be train, test or train,test (each at most once), got {splits!r}")
    return names


def stats_dataset(dataset: str, splits: Tuple[str, ...], root: Optional[str] = None,
                  image_size: Optional[int] = None) -> Dataset:
    """The images of ``splits`` of ``dataset`` one after the other (train first, as the official script
    chains them), without flips; ``test`` is the split ``nvae eval`` evaluates (validation where it exists)."""
    from ..data import build_dataset
    parts = [build_dataset(dataset, s, root, image_size=image_size, flip=False) for s in splits]
    return parts[0] if len(parts) == 1 else ConcatDataset(parts)
