"""Latent export: a split's posterior latents in one ``.npz``, the images back from them, and
partial-posterior grids (what each depth of the hierarchy holds).

:func:`encode_dataset` walks a split batch by batch and stores, per latent group (decoder
order, coarsest first), the z the decoder takes: the posterior means, i.e. the walk at
temperature 0, each group's mean given the means of the groups above it (what
``model(x, temperature=0)`` feeds the decoder, after any flows), or posterior samples at a
temperature. With ``active_only`` only the channels whose average KL over the encoded images
exceeds a threshold are kept (Efficient-VDVAE's encoding mode); :func:`active_channels`
finds them with :func:`nvae.analysis.likelihood.kl_statistics`.

The file (format ``nvae-latents``, version 1) holds plain arrays only
(``np.load(path)`` reads it without pickle):

* ``z_0`` ... ``z_{L-1}``: float32, (N, C_l, H_l, W_l), C_l counting the kept channels;
* ``channels_0`` ... ``channels_{L-1}``: int64, which channels of each group ``z_l`` holds
  (all of them without ``active_only``);
* ``indices``: int64 (N,), each row's image index in the split;
* ``meta``: one JSON string: format, version, the model's fingerprint
  (:func:`nvae.formats.checkpoint.model_fingerprint`), the full latent shapes, mode
  (``mean`` or ``sample``), temperature, KL threshold, seed, and what the caller adds
  (checkpoint, data set, split).

:func:`decode` gives back the mean of p(x|z) (as the temperature-0 reconstruction shows it),
the latents fed to the walk by the ``Given`` rule. A channel the file dropped takes the prior
mean given the groups above (0 in the top group): a channel whose KL is near zero has a
posterior close to its prior, so its posterior mean is close to that prior mean. Decoding
with a model whose fingerprint differs from the file's is refused unless asked for
(``allow_other_model``): the latents of one model mean nothing to another.

Memory stays bounded on a whole data set: rows go into memory-mapped ``.npy`` files in a
temporary folder beside the output, and the ``.npz`` is assembled from them and written
atomically at the end (the folder is removed whatever happens). Under ``torchrun`` every
process encodes its share of the batches (global batch ``b`` on rank ``b % W``) and rank 0
gathers and writes them. Global batch ``b`` draws its randomness (MNIST's binarisation, the
posterior noise of ``sample``, the KL estimate of ``active_only``) from a generator seeded by
``(seed, b)`` (:func:`~nvae.seeds.derived_seed` in ``LATENTS_ENCODE``, in ``LATENTS_KL`` for the
KL estimate), so the file does not depend on the number of processes; with deterministic
inputs (every data set but MNIST) the posterior means depend on nothing but the weights and
the image.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Subset

from ..formats.checkpoint import atomic_write, model_fingerprint
from ..data import prepare_batch
from ..distributed import DistributedContext
from .likelihood import kl_statistics
from ..model.latent_group import FromPosterior, LatentGroup
from ..model.network import NVAE, Temperature, training_mode
from ..seeds import LATENTS_ENCODE, LATENTS_KL, derived_seed

log = logging.getLogger(__name__)

LATENTS_FORMAT = "nvae-latents"
LATENTS_VERSION = 1


@dataclass(frozen=True)
class EncodeConfig:
    """What :func:`encode_dataset` stores."""

    sample: bool = False                #: posterior samples instead of the posterior means
    temperature: float = 1.0            #: posterior temperature of the samples (``sample`` only)
    active_only: bool = False           #: keep only the channels whose average KL exceeds ``kl_threshold``
    kl_threshold: float = 0.1           #: nats per channel (the official active-unit threshold)
    batch_size: int = 64                #: images per forward pass
    max_images: Optional[int] = None    #: encode only the first N images of the split
    seed: int = 0                       #: seeds each global batch's generator

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.max_images is not None and self.max_images < 1:
            raise ValueError(f"max_images must be positive (or None), got {self.max_images}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not (math.isfinite(self.kl_threshold) and self.kl_threshold >= 0):
            raise ValueError(f"kl_threshold must be a finite number >= 0, got {self.kl_threshold}")


@dataclass
class Latents:
    """A latents file in memory: per group the stored z and which channels they are, the image indices, the
    file's metadata (see the module docstring)."""

    z: List[np.ndarray]
    channels: List[np.ndarray]
    indices: np.ndarray
    meta: dict

    @property
    def num_images(self) -> int:
        return int(self.indices.shape[0])

    def first(self, n: int) -> "Latents":
        """The first ``n`` rows (all of them when there are fewer)."""
        return Latents([z[:n] for z in self.z], self.channels, self.indices[:n], self.meta)


def _world(dist_ctx: DistributedContext) -> Tuple[int, int]:
    """(world size, rank); (1, 0) for one process."""
    return (dist_ctx.world_size, dist_ctx.rank) if dist_ctx.enabled else (1, 0)


# ----------------------------------------------------------------------------- encoding
@torch.no_grad()
def encode_batch(model: NVAE, x: torch.Tensor, temperature: float = 0.0,
                 generator: Optional[torch.Generator] = None) -> List[torch.Tensor]:
    """The z of every group for prepared images ``x``: the posterior means at temperature 0, else
    posterior samples ``mu + temperature * sigma * eps`` (through the flows, as the decoder takes them)."""
    rule = FromPosterior(temperature, generator)
    model.top_down(x.shape[0], rule, model.encode(x))
    return rule.latents


@torch.no_grad()
def active_channels(model: NVAE, data: Dataset, threshold: float = 0.1, batch_size: int = 64, seed: int = 0,
                    dist_ctx: DistributedContext = DistributedContext(),
                    progress: bool = False) -> List[torch.Tensor]:
    """Per group, the indices of the latent channels whose average KL over ``data`` exceeds ``threshold``
    (nats per image): :func:`~nvae.analysis.likelihood.kl_statistics`'s active units, channel by channel.

    The KL of a group depends on the posterior samples of the groups above it, so it is an
    estimate: global batch ``b`` of ``batch_size`` images is scored with a generator seeded by
    :func:`~nvae.seeds.derived_seed` ``(LATENTS_KL, seed, b)``. Under several processes batch ``b`` is scored by rank
    ``b % W`` and the sums are all-reduced: every process returns the channels one process finds.
    """
    from tqdm import tqdm
    world, rank = _world(dist_ctx)
    total, device = len(data), next(model.parameters()).device
    sums = torch.zeros(model.num_groups, model.config.num_latent_per_group, dtype=torch.float64)
    mine = range(rank, math.ceil(total / batch_size), world)
    for b in tqdm(mine, desc="KL per channel", unit="batch", disable=not (progress and rank == 0)):
        part = Subset(data, range(b * batch_size, min((b + 1) * batch_size, total)))
        gen = torch.Generator(device).manual_seed(derived_seed(LATENTS_KL, seed, b))
        stats = kl_statistics(model, part, batch_size=batch_size, threshold=threshold, generator=gen, progress=False)
        sums += torch.tensor(stats.kl_per_channel, dtype=torch.float64) * stats.num_images
    if world > 1:
        reduced = sums.to(dist_ctx.device)
        dist.all_reduce(reduced)
        sums = reduced.cpu()
    return [torch.nonzero(mean > threshold).flatten() for mean in sums / total]


class _NpzAssembler:
    """Arrays filled piece by piece in memory-mapped ``.npy`` files in a temporary folder beside
    ``output``, then written as one ``.npz`` atomically; the folder goes whatever happens."""

    def __init__(self, output: Union[str, Path]):
        self.output = Path(output)
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix=f".{self.output.name}.", suffix=".parts", dir=self.output.parent))
        self.arrays: Dict[str, np.ndarray] = {}

    def allocate(self, name: str, shape: Sequence[int], dtype) -> np.ndarray:
        """A zero-filled array backed by a file (in memory when it holds nothing: mmap refuses empty files)."""
        if math.prod(shape) == 0:
            self.arrays[name] = np.zeros(shape, dtype)
        else:
            self.arrays[name] = np.lib.format.open_memmap(self.folder / f"{name}.npy", mode="w+", dtype=dtype,
                                                          shape=tuple(shape))
        return self.arrays[name]

    def write(self, **small: np.ndarray) -> Path:
        """The ``.npz`` of every allocated array and ``small`` ones; numpy copies a memmap in chunks."""
        arrays = {**self.arrays, **small}
        atomic_write(self.output, lambda f: np.savez(f, **arrays))
        return self.output

    def __enter__(self) -> "_NpzAssembler":
        return self

    def __exit__(self, *exc) -> None:
        self.arrays.clear()   # drop the maps before their files
        shutil.rmtree(self.folder, ignore_errors=True)


def _gather(part, dist_ctx: DistributedContext) -> Optional[list]:
    """Every process's ``part`` on rank 0 (a list in rank order), None on the others."""
    world, rank = _world(dist_ctx)
    if world == 1:
        return [part]
    out = [None] * world if rank == 0 else None
    dist.gather_object(part, out, dst=0)
    return out


@torch.no_grad()
def encode_dataset(model: NVAE, data: Dataset, output: Union[str, Path], config: EncodeConfig = EncodeConfig(), *,
                   dist_ctx: DistributedContext = DistributedContext(), progress: bool = True,
                   identity: Optional[dict] = None) -> Optional[Path]:
    """Encode the first ``config.max_images`` images of ``data`` (all without it) with ``model`` (in eval
    mode, on its device) and write the latents file ``output`` (see the module docstring).

    ``identity``: plain entries added to the file's ``meta`` (e.g. checkpoint, data set, split).
    Under several processes (``dist_ctx``) every one must call this; rank 0 writes the file and
    returns its path, the others return None.
    """
    world, rank = _world(dist_ctx)
    total = len(data) if config.max_images is None else min(config.max_images, len(data))
    if total < 1:
        raise ValueError(f"nothing to encode: the split holds {len(data)} images")
    with training_mode(model, False):
        keep = (active_channels(model, Subset(data, range(total)), config.kl_threshold, config.batch_size,
                                config.seed, dist_ctx, progress) if config.active_only
                else [torch.arange(c) for c, _, _ in model.latent_shapes])
        meta = {"format": LATENTS_FORMAT, "version": LATENTS_VERSION, "model_sha256": model_fingerprint(model),
                "latent_shapes": [list(s) for s in model.latent_shapes], "num_images": total,
                "mode": "sample" if config.sample else "mean",
                "temperature": config.temperature if config.sample else 0.0,
                "active_only": config.active_only, "kl_threshold": config.kl_threshold if config.active_only else None,
                "seed": config.seed, "batch_size": config.batch_size, **(identity or {})}
        if rank != 0:
            _encode_rounds(model, data, config, keep, None, dist_ctx, progress)
            return None
        with _NpzAssembler(output) as files:
            sinks = [files.allocate(f"z_{g}", (total, len(k), h, w), np.float32)
                     for g, (k, (_, h, w)) in enumerate(zip(keep, model.latent_shapes))]
            _encode_rounds(model, data, config, keep, sinks, dist_ctx, progress)
            return files.write(indices=np.arange(total, dtype=np.int64), meta=np.array(json.dumps(meta)),
                               **{f"channels_{g}": k.numpy().astype(np.int64) for g, k in enumerate(keep)})


def _encode_rounds(model: NVAE, data: Dataset, config: EncodeConfig, keep: List[torch.Tensor],
                   sinks: Optional[List[np.ndarray]], dist_ctx: DistributedContext, progress: bool) -> None:
    """Encode this process's global batches, round by round; rank 0 writes every round's rows into ``sinks``."""
    from tqdm import tqdm
    world, rank = _world(dist_ctx)
    device, b = next(model.parameters()).device, config.batch_size
    total = len(data) if config.max_images is None else min(config.max_images, len(data))
    n_batches = math.ceil(total / b)
    mine = [list(range(i * b, min((i + 1) * b, total))) for i in range(rank, n_batches, world)]
    batches = iter(DataLoader(data, batch_sampler=mine)) if mine else iter(())
    temperature = config.temperature if config.sample else 0.0
    bar = tqdm(total=total, desc="encode", unit="img", disable=not (progress and rank == 0), dynamic_ncols=True)
    for first in range(0, n_batches, world):
        index, part = first + rank, None
        if index < n_batches:
            g = torch.Generator(device).manual_seed(derived_seed(LATENTS_ENCODE, config.seed, index))
            x = prepare_batch(next(batches)[0].to(device), model.config, g)
            z = encode_batch(model, x, temperature, g)
            if not all(bool(torch.isfinite(zl).all()) for zl in z):
                raise ValueError(f"the model gives non-finite latents for images {index * b}..; the checkpoint's "
                                 "weights hold NaN or inf (check it); nothing was written")
            part = (index * b, [zl[:, k.to(zl.device)].float().cpu().numpy() for zl, k in zip(z, keep)])
        for got in _gather(part, dist_ctx) or ():
            if got is not None:
                start, arrays = got
                for sink, a in zip(sinks, arrays):
                    sink[start:start + a.shape[0]] = a
                bar.update(arrays[0].shape[0])
    bar.close()


# ----------------------------------------------------------------------------- reading and decoding
def load_latents(path: Union[str, Path]) -> Latents:
    """Read a latents file written by :func:`encode_dataset`; a clear ``ValueError`` for anything else."""
    import zipfile
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"latents file {path} does not exist; write one with `nvae encode`")
    try:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            if not isinstance(meta, dict) or meta.get("format") != LATENTS_FORMAT:
                raise ValueError("its meta entry is not nvae's")
            if meta.get("version") != LATENTS_VERSION:
                raise ValueError(f"it has version {meta.get('version')!r}, this nvae reads {LATENTS_VERSION}")
            n = len(meta["latent_shapes"])
            latents = Latents([f[f"z_{g}"] for g in range(n)], [f[f"channels_{g}"] for g in range(n)],
                              f["indices"], meta)
        _check_consistent(latents)
    except (OSError, KeyError, ValueError, TypeError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is not a readable nvae latents file ({e}); write one with `nvae encode`") from None
    check_finite_latents(latents, path)
    return latents


def check_finite_latents(latents: Latents, where: Union[str, Path]) -> None:
    """A ``ValueError`` naming ``where`` and the first group that holds NaN or inf: decoding them gives NaN
    images that look like a result, so nothing is decoded or written from such a file."""
    for g, z in enumerate(latents.z):
        bad = int(z.size - np.count_nonzero(np.isfinite(z)))
        if bad:
            raise ValueError(f"{where}: group {g} holds {bad} non-finite values (NaN or inf); the file is damaged "
                             "or was written from a broken model: encode the images again with `nvae encode`")


def _check_consistent(latents: Latents) -> None:
    """A ``ValueError`` unless every group's array fits its channel list and the recorded shape."""
    for g, (z, k, shape) in enumerate(zip(latents.z, latents.channels, latents.meta["latent_shapes"])):
        fits = z.shape == (latents.num_images, len(k), *shape[1:]) and k.ndim == 1
        if not fits or (len(k) and not 0 <= k.min() <= k.max() < shape[0]):
            raise ValueError(f"group {g} holds {z.shape} for channels {k.tolist()} of {shape}: the file is damaged")


def check_latents_fit(model: NVAE, latents: Latents, allow_other_model: bool = False) -> None:
    """A ``ValueError`` unless ``model`` can decode ``latents``: same latent shapes, and the same weights
    (fingerprint) unless ``allow_other_model``, which only logs a warning."""
    shapes = [list(s) for s in model.latent_shapes]
    if latents.meta["latent_shapes"] != shapes:
        raise ValueError(f"the latents have groups of shapes {latents.meta['latent_shapes']}, the model "
                         f"{shapes}; decode with the model that encoded them ({latents.meta.get('checkpoint')})")
    if latents.meta.get("model_sha256") != model_fingerprint(model):
        where = latents.meta.get("checkpoint", "not recorded")
        if not allow_other_model:
            raise ValueError(f"the latents were encoded by other weights (checkpoint {where}) than this model's; "
                             "decode with that checkpoint, or allow another model (--allow-other-model) if you "
                             "mean to")
        log.warning("decoding latents encoded by other weights (checkpoint %s)", where)


class GivenChannels:
    """A rule for :meth:`NVAE.top_down`: the given channels of each group; the others at the prior mean
    given the groups above (``channels[l]`` None: the group is given whole)."""

    def __init__(self, latents: Sequence[torch.Tensor], channels: Sequence[Optional[torch.Tensor]]):
        self.latents, self.channels = list(latents), list(channels)

    def __call__(self, index: int, group: LatentGroup, prior, posterior) -> torch.Tensor:
        keep = self.channels[index]
        if keep is None:
            return self.latents[index]
        z = prior.mu.clone()
        z[:, keep] = self.latents[index]
        return z


def _batch_rule(latents: Latents, start: int, stop: int, model: NVAE, device) -> GivenChannels:
    """The rule decoding rows ``start:stop`` of ``latents`` on ``device``."""
    z = [torch.from_numpy(np.ascontiguousarray(a[start:stop])).to(device) for a in latents.z]
    channels = [None if len(k) == shape[0] else torch.from_numpy(k).to(device)
                for k, shape in zip(latents.channels, model.latent_shapes)]
    return GivenChannels(z, channels)


@torch.no_grad()
def decode_batches(model: NVAE, latents: Latents, batch_size: int = 64, allow_other_model: bool = False
                   ) -> Iterator[Tuple[int, torch.Tensor]]:
    """``(first row, images)`` for consecutive batches of ``latents``: the mean of p(x|z) in [0, 1], on the
    model's device, the model in eval mode (checked with :func:`check_latents_fit` first)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    check_latents_fit(model, latents, allow_other_model)
    check_finite_latents(latents, latents.meta.get("path", "the latents"))
    device = next(model.parameters()).device
    with training_mode(model, False):
        for start in range(0, latents.num_images, batch_size):
            stop = min(start + batch_size, latents.num_images)
            logits = model.top_down(stop - start, _batch_rule(latents, start, stop, model, device))
            yield start, model.output_distribution(logits).mean()


def decode(model: NVAE, latents: Union[Latents, str, Path], batch_size: int = 64,
           allow_other_model: bool = False) -> torch.Tensor:
    """The images of ``latents`` (a :class:`Latents` or a file): the mean of p(x|z), (N, C, H, W) in [0, 1]."""
    if not isinstance(latents, Latents):
        latents = load_latents(latents)
    return torch.cat([images for _, images in decode_batches(model, latents, batch_size, allow_other_model)])


def decode_to_file(model: NVAE, latents: Latents, output: Union[str, Path], batch_size: int = 64,
                   allow_other_model: bool = False, progress: bool = True) -> Path:
    """Decode ``latents`` into the ``.npz`` ``output`` (``images`` float32 (N, C, H, W) in [0, 1], the file's
    ``indices``, and ``meta`` with the model's fingerprint), batch by batch in bounded memory, atomically."""
    from tqdm import tqdm
    c = model.config
    meta = {"format": "nvae-decoded", "model_sha256": model_fingerprint(model), "latents_meta": latents.meta}
    with _NpzAssembler(output) as files:
        images = files.allocate("images", (latents.num_images, c.in_channels, c.image_size, c.image_size),
                                np.float32)
        with tqdm(total=latents.num_images, desc="decode", unit="img", disable=not progress) as bar:
            for start, x in decode_batches(model, latents, batch_size, allow_other_model):
                images[start:start + x.shape[0]] = x.float().cpu().numpy()
                bar.update(x.shape[0])
        return files.write(indices=latents.indices.astype(np.int64), meta=np.array(json.dumps(meta)))


# ----------------------------------------------------------------------------- partial posteriors
@torch.no_grad()
def partial_posterior_grid(model: NVAE, x: torch.Tensor, keep: Sequence[int], temperature: Temperature = 1.0,
                           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """vdvae's figure: the inputs, then for each ``k`` in ``keep`` the images decoded with the first ``k``
    groups at their posterior means and the rest from the prior at ``temperature`` (one, a per-group list or
    a schedule).

    Returns (1 + len(keep), B, C, H, W) in [0, 1]: row 0 the prepared inputs ``x``, the others the mean of
    p(x|z). Every row starts from the same state of ``generator``, so the rows differ only by what the
    kept groups hold: ``k = num_groups`` is the temperature-0 reconstruction, ``k = 0`` the sample
    ``model.sample(B, temperature, generator, mean=True)`` gives.
    """
    bad = [k for k in keep if not 0 <= k <= model.num_groups]
    if bad or not keep:
        raise ValueError(f"keep-groups must be a non-empty list of counts in 0..{model.num_groups} (the model's "
                         f"number of latent groups), got {list(keep)}")
    state = generator.get_state() if generator is not None else None
    rows = [x]
    with training_mode(model, False):
        for k in keep:
            g = None
            if generator is not None:
                g = torch.Generator(generator.device)
                g.set_state(state)
            logits = model.partial_posterior_logits(x, k, temperature, posterior_temperature=0.0, generator=g)
            rows.append(model.output_distribution(logits).mean())
    return torch.stack(rows)
