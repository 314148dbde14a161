"""Bulk sampling: many prior samples as numbered ``.npz`` chunks, sharded over processes and resumable.

The layout is ours, not the official evaluation's. The official ``evaluate.py`` (its default
``sample`` mode) gives each of G GPUs ``50000 // G`` images, drawn in batches of 100 (the last
batch whole, so a GPU may write a little more) under float16 autocast, from unseeded global
generators, and GPU ``R`` writes batch ``I`` to ``gpu_R_samples_I.npz`` in its ``--save`` folder
(``np.savez_compressed``, one array ``samples``, N x C x H x W in [0, 1]: Bernoulli means for
binary data, a sample of p(x|z) at pixel temperature 1 otherwise). Its file names and contents
depend on the number of GPUs. Here chunk ``i`` holds samples ``i * batch ... i * batch + size - 1``
(exactly ``n`` in all) and is drawn with its own generator, seeded from ``(seed, i)``: process
``r`` of ``W`` draws the chunks with ``i % W == r``, so the files are the same whatever the number
of processes, and a killed run redraws nothing it finished. Every chunk is written atomically (a
half-written chunk never exists under its name), and only one chunk is in memory at a time.

Layout of ``out_dir`` (e.g. ``samples_t0.7/``)::

    manifest.json      what was asked (n, batch, temperature, seed, dtype, the weights' SHA-256)
    00000.npz ...      arrays ``samples`` (N, C, H, W) and ``index`` (the samples' numbers)

and a grid of the first samples beside it (``samples_t0.7.png``).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Union

import numpy as np
import torch

from ..distributed import DistributedContext
from ..formats.checkpoint import VIEWING_SIDE, atomic_write, model_fingerprint, save_png
from ..model.network import NVAE, Temperature, per_group
from ..seeds import sequence_seed
from .sampling import decoder_bn_layers

MANIFEST = "manifest.json"
DTYPES = ("float32", "uint8")
#: Samples shown in the grid written beside the chunks.
GRID_SAMPLES = 64


@dataclass(frozen=True)
class BulkConfig:
    """What to draw: ``n`` samples in chunks of ``batch`` at ``temperature`` (a number, a per-group
    list or a :class:`~nvae.analysis.temperature_schedule.TemperatureSchedule`), chunk ``i`` from a generator seeded
    with ``(seed, i)``, stored as ``dtype`` (``float32`` in [0, 1], or ``uint8`` = round(255 x), as
    the PNGs). ``mean`` as in :meth:`NVAE.sample` (None: what the official sample mode shows,
    Bernoulli means for binary data and samples of p(x|z) otherwise)."""

    n: int
    batch: int = 100
    temperature: Temperature = 1.0
    seed: int = 0
    dtype: str = "float32"
    mean: Optional[bool] = None

    def __post_init__(self):
        for name in ("n", "batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer (chunk seeds derive from it), got {self.seed!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.n / self.batch)

    def chunk_size(self, index: int) -> int:
        """How many samples chunk ``index`` holds (the last one may be short)."""
        return min(self.batch, self.n - index * self.batch)

    def record(self, num_groups: int) -> dict:
        """The manifest's description of this config (temperature resolved per group, as drawn)."""
        return {**asdict(self), "temperature": per_group(self.temperature, num_groups)}


@dataclass(frozen=True)
class BulkResult:
    """What :func:`sample_to_chunks` did in this process."""

    out_dir: Path
    num_chunks: int      #: chunks of the whole job
    drawn: int           #: chunks this process drew now
    kept: int            #: chunks of this process found already written (a resumed run)
    grid: Optional[Path]  #: the PNG grid (rank 0 only)


def chunk_generator(seed: int, index: int, device: Union[str, torch.device] = "cpu") -> torch.Generator:
    """The generator of chunk ``index``: seeded from ``(seed, index)`` through NumPy's SeedSequence
    (:func:`~nvae.seeds.sequence_seed`, 64 bits), so neighbouring chunks get unrelated streams and no
    chunk depends on another."""
    return torch.Generator(device=device).manual_seed(sequence_seed(seed, index, bits=64))


def chunk_path(out_dir: Union[str, Path], index: int, num_chunks: int) -> Path:
    """``out_dir/00042.npz``: five digits, more when there are more chunks (names sort in order)."""
    return Path(out_dir) / f"{index:0{max(5, len(str(num_chunks - 1)))}d}.npz"


def to_dtype(images: torch.Tensor, dtype: str) -> np.ndarray:
    """Images in [0, 1] as stored: float32, or uint8 rounded as the PNG writer rounds."""
    images = images.detach().float().cpu()
    if dtype == "uint8":
        return (images * 255 + 0.5).clamp(0, 255).to(torch.uint8).numpy()
    return images.numpy()


def draw_chunk(model: NVAE, config: BulkConfig, index: int) -> torch.Tensor:
    """The samples of chunk ``index`` (on the model's device), the same in any process."""
    device = next(model.parameters()).device
    return model.sample(config.chunk_size(index), config.temperature, chunk_generator(config.seed, index, device),
                        mean=config.mean)


def _check_manifest(out_dir: Path, expected: dict) -> None:
    """Refuse a folder holding chunks of other arguments; record the arguments in a new one."""
    path = out_dir / MANIFEST
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path} cannot be read ({e}); delete {out_dir} and run again") from None
        differs = sorted(k for k in set(stored) | set(expected) if stored.get(k) != expected.get(k))
        if differs:
            what = "; ".join(f"{k}: {stored.get(k)!r} there, {expected.get(k)!r} now" for k in differs)
            raise ValueError(f"{out_dir} holds samples drawn with other arguments ({what}); pass the same "
                             "arguments to continue it, or another --out (or delete the folder) to start afresh")
        return
    if any(out_dir.glob("*.npz")):
        raise ValueError(f"{out_dir} holds .npz files but no {MANIFEST}, so they cannot be continued; "
                         "delete them or choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(json.dumps(expected, indent=2, sort_keys=True).encode()))


def _agree_on_folder(out_dir: Path, expected: dict, dist_ctx: DistributedContext) -> None:
    """Rank 0 checks (or writes) the manifest; every process raises if it refused the folder.

    One process decides, so that no process can see a chunk that another has just written
    and take the folder for a foreign one; the collective doubles as the start barrier.
    """
    error = None
    if dist_ctx.is_main:
        try:
            _check_manifest(out_dir, expected)
        except (ValueError, OSError) as e:
            error = e
    if dist_ctx.any(error is not None) and error is None:
        raise ValueError(f"process 0 refused the output folder {out_dir} (its message says why)")
    if error is not None:
        raise error


def broadcast_decoder_bn(model: NVAE, dist_ctx: DistributedContext) -> None:
    """Give every process rank 0's decoder BN statistics (after a BN re-adjustment, which on a GPU
    need not give bit-equal statistics in every process), so all ranks sample from one model."""
    if not dist_ctx.enabled:
        return
    import torch.distributed as dist
    for layer in decoder_bn_layers(model).values():
        for buffer in (layer.running_mean, layer.running_var):
            dist.broadcast(buffer, src=0)


def _barrier(dist_ctx: DistributedContext) -> None:
    if dist_ctx.enabled:
        dist_ctx.any(False)   # a collective every process must reach


def sample_to_chunks(model: NVAE, out_dir: Union[str, Path], config: BulkConfig,
                     dist_ctx: DistributedContext = DistributedContext(), progress: bool = False,
                     identity: Optional[dict] = None) -> BulkResult:
    """Draw ``config.n`` prior samples into numbered ``.npz`` chunks under ``out_dir``, then a grid.

    Under torchrun pass ``dist_ctx`` (:class:`~nvae.distributed.DistributedContext`):
    rank ``r`` draws the chunks ``i`` with ``i % world == r``; every process must hold the
    same weights and BN statistics. Chunks already on disk are kept, so a killed run
    called again with the same arguments draws only what is missing. ``identity``
    (default: the weights' SHA-256) goes into the manifest; a folder whose manifest
    differs from this call is refused rather than mixed. Rank 0 writes the grid of the
    first samples to ``out_dir`` + ``.png`` once every process is done.
    """
    from tqdm import tqdm
    out_dir = Path(out_dir)
    rank, world = dist_ctx.rank, dist_ctx.world_size
    expected = {**config.record(model.num_groups),
                **(identity if identity is not None else {"weights_sha256": model_fingerprint(model)})}
    _agree_on_folder(out_dir, json.loads(json.dumps(expected)), dist_ctx)   # tuples compare as the JSON lists
    mine = range(rank, config.num_chunks, world)
    todo = [i for i in mine if not chunk_path(out_dir, i, config.num_chunks).exists()]
    total = sum(config.chunk_size(i) for i in mine)
    done = total - sum(config.chunk_size(i) for i in todo)
    model.eval()
    with tqdm(total=total, initial=done, desc=f"sampling {out_dir.name}", unit="img", disable=not progress,
              dynamic_ncols=True) as bar:
        for i in todo:
            images = to_dtype(draw_chunk(model, config, i), config.dtype)
            index = np.arange(i * config.batch, i * config.batch + len(images), dtype=np.int64)
            atomic_write(chunk_path(out_dir, i, config.num_chunks),
                         lambda f: np.savez_compressed(f, samples=images, index=index))
            bar.update(len(images))
    _barrier(dist_ctx)
    grid = None
    if rank == 0:
        grid = out_dir.with_name(out_dir.name + ".png")
        save_png(first_samples(out_dir, GRID_SAMPLES), grid, nrow=int(math.sqrt(min(config.n, GRID_SAMPLES))),
                 min_side=VIEWING_SIDE)
    return BulkResult(out_dir, config.num_chunks, len(todo), len(mine) - len(todo), grid)


def chunk_files(out_dir: Union[str, Path]) -> List[Path]:
    """The chunk files of ``out_dir`` in sample order."""
    return sorted(p for p in Path(out_dir).glob("*.npz") if p.stem.isdigit())


def iter_chunks(out_dir: Union[str, Path]) -> Iterator[torch.Tensor]:
    """The chunks of ``out_dir`` in order, one at a time, as float tensors in [0, 1]."""
    for path in chunk_files(out_dir):
        with np.load(path) as data:
            samples = torch.from_numpy(data["samples"])
        yield samples.float() / 255 if samples.dtype == torch.uint8 else samples


def first_samples(out_dir: Union[str, Path], count: int) -> torch.Tensor:
    """The first ``count`` samples of ``out_dir`` (fewer if it holds fewer), reading only the chunks needed."""
    taken: List[torch.Tensor] = []
    have = 0
    for samples in iter_chunks(out_dir):
        taken.append(samples[:count - have])
        have += len(taken[-1])
        if have >= count:
            break
    if not taken:
        raise ValueError(f"{out_dir} holds no sample chunks")
    return torch.cat(taken)
