"""How the images behind a model's FID are drawn, and the data statistics they meet: the official protocol and ours.

The official evaluation (NVlabs/NVAE ``evaluate.py --eval_mode evaluate_fid``, which calls ``train.py``'s
``test_vae_fid``) does four things that a plain "FID of samples" does not:

* with ``--readjust_bn`` it re-estimates the decoder's BN statistics (its ``set_bn``) from 500 batches of
  2 prior samples at the given temperature ``t``, in training mode under float16 autocast;
* it then draws its 50,000 images at temperature 1.0 whatever ``t`` was (``t`` acts only
  through the re-adjusted BN statistics);
* it feeds Inception the *mean* of p(x|z): the mixture-weighted logistic means pushed through
  the RGB coupling (:meth:`nvae.model.distributions.DiscMixLogistic.mean`) for colour data, the
  Bernoulli means for binary data, as floats (not rounded to 8 bits). (The official
  ``NormalDecoder`` has no mean and would fail there; ours uses the clamped Normal mean.)
* over G GPUs each GPU draws ``ceil(50000 / G)`` images and the GPUs' means and covariances are
  averaged.

Here every process draws the global batches ``rank, rank + world, ...`` of exactly ``num_samples``
images, each batch from a generator seeded by ``(seed, batch index)``, so the images are the same
whatever the number of processes. Their statistics are reduced ``average`` under ``official`` (the
official averaging, which lacks the spread of the per-process means, a relative O(processes /
images)) and ``pooled`` under ``ours`` (sums of features and of outer products added up: the statistics
of all images, identical for any number of processes); ``reduction`` chooses either way.

``ours`` lets the temperature act on the samples too: latents drawn at ``t`` and, as
:meth:`nvae.NVAE.sample` and ``nvae sample`` give them, a sample of p(x|z) for colour models
(pixel noise at temperature 1, where our and the official logistic draws agree) and the Bernoulli
means for binary ones; ``--readjust-bn`` re-adjusts with 36 samples per batch in float32, as ``nvae
sample --readjust-bn`` does (and shares its cache).

Data statistics (``nvae fid-stats``). The official ``scripts/precompute_fid_statistics.py`` reads the
training loader of ``datasets.get_loaders_eval`` as training does: shuffled, with the training
transforms (random horizontal flips for the colour sets, random crops and flips for LSUN), batches of
its ``--batch_size`` 64 with ``drop_last``, MNIST and Omniglot binarised (its ``Binarize`` transform,
although its comment says binary sets are not binarised); for CelebA-HQ 256 and Omniglot the
(shuffled, unflipped, not ``drop_last``) validation loader follows; the first ``--max_samples`` 50,000
images of that stream are used, labels ignored. For CIFAR-10 that is 781 x 64 = 49,984 of its 50,000
images. :func:`official_reference_dataset` gives those images, from generators seeded by ``seed``
(the official script is unseeded); :func:`stats_dataset` gives ours: every image of the chosen splits,
in order, without flips or binarisation.
"""
from __future__ import annotations

import argparse
import contextlib
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from ..distributed import DistributedContext
from ..formats.checkpoint import CheckpointError, safe_load
from ..formats.opened import OpenedCheckpoint
from .fid import REDUCTIONS, FeatureMoments, FIDError, Stats, frechet_distance
from ..model.network import NVAE, Temperature, training_mode
from ..seeds import EVAL_BATCH, REFERENCE_IMAGE, derived_seed
from .sampling import (decoder_bn_layers, readjust_bn, readjust_bn_cached, readjust_precision,
                       temperature_name)

__all__ = ["PROTOCOLS", "FIDProtocol", "is_official_checkpoint", "default_protocol", "prepare_bn",
           "sample_moments", "protocol_statistics", "protocol_fid", "bn_cache_checkpoint",
           "STATS_MERGED_SPLITS", "stats_splits", "stats_dataset", "OFFICIAL_STATS_BATCH",
           "OFFICIAL_STATS_IMAGES", "OFFICIAL_BINARISED", "official_selection", "OfficialReference",
           "official_reference_dataset", "default_reduction"]

PROTOCOLS = ("official", "ours")

#: Samples per BN re-adjustment batch: the official FID evaluation's (``evaluate.py``, mode
#: ``evaluate_fid``: 500 steps of 2), and ours, ``readjust_bn``'s default as ``nvae sample`` uses it (the
#: official ``sample`` mode used 36 in its first release, 16 now).
OFFICIAL_READJUST_BATCH = 2
SAMPLE_READJUST_BATCH = 36
#: Re-adjustment steps of both official modes, and our default.
OFFICIAL_READJUST_STEPS = 500
#: How each protocol reduces statistics over processes by default: the official ``test_vae_fid`` averages
#: the GPUs' means and covariances; ours pools.
_DEFAULT_REDUCTION = {"official": "average", "ours": "pooled"}


def default_reduction(protocol: str) -> str:
    """``average`` for ``official`` (the official code's), ``pooled`` for ``ours``."""
    return _DEFAULT_REDUCTION[protocol]


@dataclass(frozen=True)
class FIDProtocol:
    """Which images a model's FID is computed from, and how many.

    ``name`` is ``official`` or ``ours`` (module docstring). ``temperature`` is the ``-t``
    of the command: under ``official`` it only sets the temperature of the BN
    re-adjustment. ``readjust_batch`` defaults to 2 (official) or 36 (ours); the
    re-adjustment runs under float16 autocast on CUDA under ``official``
    (:attr:`readjust_autocast`). Batch ``b`` of ``batch_size`` images is drawn with a
    generator seeded by ``(seed, b)``; ``reduction`` is one of
    :data:`nvae.analysis.fid.REDUCTIONS`, by default the protocol's (:func:`default_reduction`).
    """

    name: str = "official"
    temperature: Temperature = 1.0
    readjust_bn: bool = False
    readjust_steps: int = OFFICIAL_READJUST_STEPS
    readjust_batch: Optional[int] = None
    num_samples: int = 50000
    batch_size: int = 100
    seed: int = 0
    reduction: Optional[str] = None

    def __post_init__(self):
        if self.name not in PROTOCOLS:
            raise FIDError(f"protocol must be one of {PROTOCOLS}, got {self.name!r}")
        if self.reduction is None:
            object.__setattr__(self, "reduction", default_reduction(self.name))
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
    def readjust_autocast(self) -> bool:
        """Whether BN re-adjustment asks for float16 autocast (official; it applies on CUDA only)."""
        return self.name == "official"

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
        out["readjust_precision"] = readjust_precision(model, self.readjust_autocast) if self.readjust_bn else None
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


def bn_cache_checkpoint(checkpoint: Union[str, Path], batch: int, precision: str = "float32") -> Path:
    """The name re-adjusted BN statistics are cached under (:func:`nvae.analysis.sampling.bn_cache_path`).

    The cache is named after the checkpoint, the temperature and the steps; a batch other
    than ``nvae sample``'s 36 gets its own name, and so do statistics re-adjusted under
    float16 autocast (``precision``, :func:`nvae.analysis.sampling.readjust_precision`), so the
    official FID's 2-sample statistics never stand in for the 36-sample ones or the reverse,
    nor float16 ones for float32 ones.
    """
    checkpoint = Path(checkpoint)
    tags = ("" if batch == SAMPLE_READJUST_BATCH else f".b{batch}") + ("" if precision == "float32" else ".fp16")
    return checkpoint.with_name(f"{checkpoint.stem}{tags}{checkpoint.suffix}") if tags else checkpoint


# ----------------------------------------------------------------------------- drawing
def _device(model: NVAE) -> torch.device:
    return next(model.parameters()).device


def prepare_bn(model: NVAE, protocol: FIDProtocol, checkpoint: Union[str, Path, None] = None,
               dist_ctx: DistributedContext = DistributedContext(), progress: bool = False) -> Optional[bool]:
    """Re-adjust the decoder BN statistics if ``protocol`` asks; None if not, else whether a cache was used.

    The generator is seeded with ``protocol.seed``. With ``checkpoint`` the statistics are
    cached beside it (:func:`bn_cache_checkpoint`). Under torchrun rank 0 re-adjusts and
    every process receives its statistics, so all draw from the same model. Under ``official``
    the re-adjustment runs under float16 autocast where the model is on CUDA, in float32 elsewhere.
    """
    if not protocol.readjust_bn:
        return None
    main = dist_ctx.is_main
    cached = False
    if main:
        g = torch.Generator(_device(model)).manual_seed(protocol.seed)
        autocast = protocol.readjust_autocast
        args = (protocol.temperature, protocol.readjust_steps, protocol.bn_batch, g, progress)
        if checkpoint is None:
            readjust_bn(model, *args, autocast=autocast)
        else:
            cache = bn_cache_checkpoint(checkpoint, protocol.bn_batch, readjust_precision(model, autocast))
            cached = readjust_bn_cached(model, cache, *args, autocast=autocast)
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
    """Our reference images: those of ``splits`` of ``dataset`` one after the other (train first, as the
    official script chains them), in order, without flips or binarisation; ``test`` is the split ``nvae
    eval`` evaluates (validation where it exists). (LSUN's training split keeps its random crop.)"""
    from ..data import build_dataset
    parts = [build_dataset(dataset, s, root, image_size=image_size, flip=False) for s in splits]
    return parts[0] if len(parts) == 1 else ConcatDataset(parts)


#: The official ``precompute_fid_statistics.py``'s defaults: ``--batch_size`` 64 (the loaders' batch, which
#: ``drop_last`` makes count) and ``--max_samples`` 50000.
OFFICIAL_STATS_BATCH = 64
OFFICIAL_STATS_IMAGES = 50000
#: Data sets whose official loaders binarise every image (``datasets.py``: ``Binarize`` in
#: ``_data_transforms_mnist``, for training and validation alike).
OFFICIAL_BINARISED = frozenset({"mnist", "omniglot"})


def official_selection(lengths: Sequence[int], seed: int = 0, batch_size: int = OFFICIAL_STATS_BATCH,
                       max_images: Optional[int] = OFFICIAL_STATS_IMAGES) -> List[Tuple[int, int]]:
    """``(part, index)`` of the images the official script reads, in its order.

    ``lengths`` are the sizes of the chained splits (training first). Each split is read
    through a ``torch.utils.data.DataLoader(range(n), batch_size, shuffle=True)`` whose
    ``generator`` (one for all, seeded with ``seed``) decides the order; the training split's
    loader drops its last partial batch (``drop_last=True``), the others do not, as the official
    loaders. The first ``max_images`` of the stream are kept (all with None).
    """
    if batch_size < 1:
        raise FIDError(f"batch_size must be at least 1, got {batch_size}")
    g = torch.Generator().manual_seed(seed)
    picked: List[Tuple[int, int]] = []
    for part, n in enumerate(lengths):
        if max_images is not None and len(picked) >= max_images:
            break
        for batch in DataLoader(range(n), batch_size=batch_size, shuffle=True, drop_last=part == 0, generator=g):
            picked += [(part, int(i)) for i in batch]
            if max_images is not None and len(picked) >= max_images:
                break
    return picked if max_images is None else picked[:max_images]


class OfficialReference(Dataset):
    """The official reference images of the chained ``parts`` (training split first): ``(image,)`` items.

    Item ``k`` is image :func:`official_selection` ``[k]`` as its data set yields it, with every
    random transform of that data set (flips, LSUN's crops) and the binarisation (``binarise``:
    each pixel 1 with probability its grey level, as the official ``Binarize``) drawn from torch's
    global generator re-seeded for the item with ``derived_seed(REFERENCE_IMAGE, seed, k)`` (and put
    back afterwards), so the images are the same in any process and with any number of loader workers.
    """

    def __init__(self, parts: Sequence[Dataset], seed: int = 0, batch_size: int = OFFICIAL_STATS_BATCH,
                 max_images: Optional[int] = OFFICIAL_STATS_IMAGES, binarise: bool = False):
        self.parts = list(parts)
        self.seed = seed
        self.binarise = binarise
        self.selection = official_selection([len(d) for d in self.parts], seed, batch_size, max_images)

    def __len__(self):
        return len(self.selection)

    def __getitem__(self, k):
        part, index = self.selection[k]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derived_seed(REFERENCE_IMAGE, self.seed, k))
            item = self.parts[part][index]
            x = item[0] if isinstance(item, (list, tuple)) else item     # labels, where there are any, are dropped
            if self.binarise:
                x = torch.bernoulli(x)
        return (x,)


def official_reference_dataset(dataset: str, root: Optional[str] = None, image_size: Optional[int] = None,
                               seed: int = 0, batch_size: int = OFFICIAL_STATS_BATCH,
                               max_images: Optional[int] = OFFICIAL_STATS_IMAGES) -> OfficialReference:
    """The images the official ``precompute_fid_statistics.py`` takes from ``dataset`` (module docstring),
    seeded with ``seed``: the training split with its training transforms (the data set's default flips),
    then for :data:`STATS_MERGED_SPLITS` the validation split, :class:`OfficialReference` over them,
    binarised for :data:`OFFICIAL_BINARISED`."""
    from ..data import build_dataset
    parts = [build_dataset(dataset, "train", root, image_size=image_size)]
    if dataset in STATS_MERGED_SPLITS:
        parts.append(build_dataset(dataset, "test", root, image_size=image_size))
    data = OfficialReference(parts, seed, batch_size, max_images, binarise=dataset in OFFICIAL_BINARISED)
    if len(data) < 2:
        raise FIDError(f"the official selection of {dataset} ({' + '.join(str(len(d)) for d in parts)} images, "
                       f"batches of {batch_size} without the last partial training batch) holds {len(data)} "
                       "image(s); FID statistics need 2 or more: use a smaller --batch-size")
    return data
