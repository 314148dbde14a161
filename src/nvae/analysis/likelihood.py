"""Evaluation over a data split: NELBO and the importance-weighted NLL (paper, Section 5; the official ``evaluate.py``).

A long evaluation (K = 1000 over a whole test split) can run over the processes
of a ``torchrun`` job and be resumed after an interruption; both rest on one
rule: *a batch's numbers depend on the batch alone*.

* The first ``num_images`` images of the split are cut into global batches of
  ``batch_size`` consecutive images (the last one may be shorter). Global batch
  ``b`` draws all its randomness (binarisation, posterior samples) from its own
  generator seeded with :func:`~nvae.seeds.derived_seed` ``(EVAL_BATCH, seed, b)``, not from one stream,
  so skipping finished batches, or evaluating a batch on another process,
  changes no draw.
* Sharding: with W processes, batch ``b`` is evaluated by rank ``b % W``, in
  rounds of W batches. Every image is evaluated exactly once, whatever the split
  size; when the batches do not divide evenly the last round leaves some ranks idle.
* Every ``save_every`` rounds the per-batch sums are all-reduced (each rank
  fills in its own batches, zeros elsewhere, so the sum is exact) and, with a
  ``partial`` path, rank 0 writes them atomically to that small JSON file
  together with the evaluation's arguments. The totals are ``math.fsum`` of the
  per-batch sums in batch order: one process or many, interrupted or not, the
  same numbers.
* ``resume=True`` continues from a partial file whose arguments match (model
  weights, K, batch size, images, seed, device type, caller's ``identity``)
  and refuses one that does not; without it an existing partial file is
  replaced, with a warning. The world size is recorded but need not match: the
  finished batches are always a prefix of the global batches, which any number
  of processes can continue. The file is removed once the result is complete.
"""
from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from ..formats.checkpoint import atomic_write, model_fingerprint
from ..data import prepare_batch
from ..distributed import DistributedContext
from ..model.network import NVAE, iw_bound, default_max_batch
from ..seeds import EVAL_BATCH, derived_seed
from ..speedups.compile import compile_eval

log = logging.getLogger(__name__)

#: ``format`` and ``version`` of a partial-evaluation file.
PARTIAL_FORMAT = "nvae-eval-partial"
PARTIAL_VERSION = 1


@dataclass
class EvalResult:
    """Averages over the evaluated images. NLL and NELBO in nats per image; bits/dim over the
    sub-pixels that enter the likelihood (MNIST: 28x28, as the paper reports)."""

    nll: float
    nelbo: float
    bpd: float
    bpd_elbo: float
    num_images: int
    num_samples: int
    data_dims: int

    def to_dict(self) -> dict:
        return {**asdict(self), "units": {"nll": "nats/image", "nelbo": "nats/image", "bpd": "bits/dim",
                                          "bpd_elbo": "bits/dim"}}


def partial_path_for(output: Union[str, Path]) -> Path:
    """Where the partial sums of an evaluation bound for ``output`` are kept: ``NAME.partial.json`` beside it."""
    output = Path(output)
    stem = output.stem if output.suffix == ".json" else output.name
    return output.with_name(f"{stem}.partial.json")


@dataclass(frozen=True)
class EvalConfig:
    """What an evaluation computes; two evaluations with equal configs (and weights and data) give equal numbers."""

    num_samples: int = 1000             #: K of the importance-weighted bound
    batch_size: int = 16                #: images per batch (each batch draws from its own seed)
    max_batch: Optional[int] = None     #: images per forward pass, K folded in (default 64 on CPU, 1024 on GPU)
    max_images: Optional[int] = None    #: evaluate only the first N images
    seed: Optional[int] = None          #: None: drawn from the caller's generator
    save_every: int = 10                #: batches per process between all-reduces (and partial-file writes)
    #: torch.compile the pass over each chunk of samples (:func:`nvae.speedups.compile.compile_eval`): the same
    #: samples, so the same numbers up to rounding
    compile: bool = False

    def __post_init__(self):
        if self.num_samples < 1 or self.batch_size < 1 or self.save_every < 1:
            raise ValueError(f"num_samples, batch_size and save_every must be positive, got {self.num_samples}, "
                             f"{self.batch_size} and {self.save_every}")
        for name in ("max_batch", "max_images"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive (or None), got {getattr(self, name)}")


@dataclass(frozen=True)
class PartialFile:
    """Where an evaluation keeps its partial sums (see :func:`partial_path_for`), and whether to continue them.

    ``identity``: the caller's extra plain entries that must match to continue (e.g. data set and split).
    """

    path: Union[str, Path]
    resume: bool = False
    identity: Optional[dict] = None


@torch.no_grad()
def evaluate(model: NVAE, data: Dataset, config: EvalConfig = EvalConfig(), *,
             generator: Optional[torch.Generator] = None,
             dist_ctx: DistributedContext = DistributedContext(), partial: Optional[PartialFile] = None,
             progress: bool = True) -> EvalResult:
    """Importance-weighted NLL with K = ``config.num_samples`` and the NELBO over ``data`` (in eval mode),
    on the model's device.

    Images are prepared as in training (binarised afresh for the Bernoulli decoder, as the
    official test does; quantised to ``num_x_bits`` otherwise). The estimator is
    :meth:`NVAE.importance_sample` and :func:`~nvae.model.network.iw_bound` per image.

    Randomness: global batch ``b`` (images ``b * batch_size`` onwards) uses a generator on
    the model's device seeded with :func:`~nvae.seeds.derived_seed` ``(EVAL_BATCH, seed, b)``. Without ``config.seed``
    one is drawn from ``generator`` (or from torch's global generator without one), so a
    seeded ``generator`` still makes the evaluation reproducible. ``max_batch`` orders the
    draws, so it is part of what makes two evaluations equal.

    Several processes: pass ``dist_ctx`` (a :class:`~nvae.distributed.DistributedContext`
    with more than one process); each evaluates its share of the batches (batch ``b`` on
    rank ``b % world_size``), the sums are all-reduced every ``save_every`` rounds, and
    every rank returns the same result. Only rank 0 shows progress and writes the partial
    file. See the module docstring.

    Compiling (``config.compile``): :meth:`NVAE.posterior_pass` runs compiled whole, one graph per chunk; the batch's
    generator draws the same eps outside it, so the numbers are the eager ones up to rounding. The first chunks of each
    shape wait for the compiler.

    Resuming: with ``partial`` the per-batch sums are written to ``partial.path`` atomically
    every ``save_every`` batches per process, with the evaluation's arguments.
    ``partial.resume`` continues from that file when it exists, and raises ``ValueError``
    when it belongs to other arguments or cannot be read; otherwise it is replaced (with a
    warning). The file is removed once the evaluation is complete. A resumed evaluation
    gives the same numbers as an uninterrupted one.
    """
    run = _EvalRun.plan(model, data, config, generator, dist_ctx, partial)
    run.sweep(progress)
    total, cfg = run.total, model.config
    nll, nelbo = math.fsum(run.nll) / total, math.fsum(run.nelbo) / total
    per_dim = 1.0 / (math.log(2.0) * cfg.num_data_dims)
    return EvalResult(nll=nll, nelbo=nelbo, bpd=nll * per_dim, bpd_elbo=nelbo * per_dim, num_images=total,
                      num_samples=config.num_samples, data_dims=cfg.num_data_dims)


@dataclass
class _EvalRun:
    """One evaluation under way: its resolved settings and the per-batch sums so far."""

    model: NVAE
    data: Dataset
    config: EvalConfig
    device: torch.device
    dist_ctx: DistributedContext
    total: int                      #: images to evaluate
    max_batch: int
    seed: int
    partial: Optional[PartialFile]
    args: Optional[dict]            #: what a partial file must match (rank 0)
    nll: list                       #: per-batch sums, in batch order
    nelbo: list
    posterior_pass: Optional[Callable] = None   #: the compiled inner pass (None: the model's own)

    @classmethod
    def plan(cls, model, data, config, generator, dist_ctx, partial) -> "_EvalRun":
        device = next(model.parameters()).device
        total = len(data) if config.max_images is None else min(config.max_images, len(data))
        if total < 1:
            raise ValueError(f"nothing to evaluate: the split holds {len(data)} images, max_images={config.max_images}")
        max_batch = config.max_batch if config.max_batch is not None else default_max_batch(device)
        seed = config.seed
        if seed is None:
            if partial is not None and generator is None:
                raise ValueError("a resumable evaluation needs a seed (or a seeded generator) to repeat its draws")
            gen_device = generator.device if generator is not None else "cpu"
            seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=gen_device))
        # Rank 0 reads the partial file and tells the others (seed included: it may come from rank 0's RNG).
        args, state, error = None, None, None
        if partial is not None and dist_ctx.is_main:
            args = {"model_sha256": model_fingerprint(model), "num_samples": config.num_samples,
                    "batch_size": config.batch_size, "max_batch": max_batch, "num_images": total,
                    "dataset_size": len(data), "seed": seed, "device": device.type, **(partial.identity or {})}
            if config.compile:   # equal to the eager sums up to rounding only: continued compiled, as it began
                args["compiled"] = True
            try:
                state = _read_partial(Path(partial.path), args, partial.resume,
                                      math.ceil(total / config.batch_size), total)
            except ValueError as e:
                error = str(e)
        seed, state, error = dist_ctx.from_main((seed, state, error))
        if error is not None:
            raise ValueError(error)
        compiled = compile_eval(model) if config.compile else None
        return cls(model, data, config, device, dist_ctx, total, max_batch, seed, partial, args,
                   list(state["batch_nll_sums"]) if state else [], list(state["batch_nelbo_sums"]) if state else [],
                   compiled)

    def images_in(self, first: int, stop: int) -> int:
        """Images in global batches ``first`` .. ``stop - 1``."""
        b = self.config.batch_size
        return min(stop * b, self.total) - min(first * b, self.total)

    def sweep(self, progress: bool) -> None:
        """Evaluate the batches not done yet, in rounds, all-reducing and saving after each."""
        from tqdm import tqdm
        world, rank = self.dist_ctx.world_size, self.dist_ctx.rank
        main, b_size = rank == 0, self.config.batch_size
        n_batches, done = math.ceil(self.total / b_size), len(self.nll)
        # The bar counts importance samples (images x K) and shows them as images (unit_scale 1 / K): it moves with
        # every chunk of samples, so a batch that takes minutes at K = 1000 shows progress and an ETA at once.
        k = self.config.num_samples
        bar = tqdm(total=self.total * k, initial=self.images_in(0, done) * k, desc=f"eval K={k}", unit="img",
                   unit_scale=1 / k, disable=not (progress and main), dynamic_ncols=True,
                   bar_format="{l_bar}{bar}| {n:.1f}/{total:.0f} [{elapsed}<{remaining}, {rate_fmt}{postfix}]")
        if done and progress and main:
            bar.write(f"resuming from {self.partial.path}: {self.images_in(0, done)} of {self.total} images done",
                      file=sys.stderr)
        mine = [list(range(b * b_size, min((b + 1) * b_size, self.total)))
                for b in range(done + rank, n_batches, world)]
        batches = iter(DataLoader(self.data, batch_sampler=mine))
        block = self.config.save_every * world
        for start in range(done, n_batches, block):
            stop = min(n_batches, start + block)
            sums = torch.zeros(2, stop - start, dtype=torch.float64)
            for b in range(start + rank, stop, world):
                # this process's samples stand for the round's (every process runs the same chunks at once)
                round_images = self.images_in(b, min(b + world, stop))
                sums[:, b - start] = self.batch_sums(next(batches)[0], b,
                                                     lambda samples, n=round_images: bar.update(samples * n))
            if world > 1:
                reduced = sums.to(self.dist_ctx.device)
                dist.all_reduce(reduced)
                sums = reduced.cpu()
            self.nll += sums[0].tolist()
            self.nelbo += sums[1].tolist()
            seen = self.images_in(0, stop)
            bar.set_postfix(nll=f"{math.fsum(self.nll) / seen:.3f}")
            if main and self.partial is not None and stop < n_batches:
                _write_partial(Path(self.partial.path), self.args, world, seen, self.nll, self.nelbo)
        bar.close()
        if main and self.partial is not None:
            Path(self.partial.path).unlink(missing_ok=True)

    def batch_sums(self, x: torch.Tensor, index: int,
                   on_chunk: Optional[Callable[[int], object]] = None) -> torch.Tensor:
        """(sum of -log p(x) estimates, sum of NELBOs) of global batch ``index``, in float64; ``on_chunk(k)`` after
        each chunk of ``k`` samples per image."""
        g = torch.Generator(self.device).manual_seed(derived_seed(EVAL_BATCH, self.seed, index))
        x = prepare_batch(x.to(self.device), self.model.config, g)
        score = self.posterior_pass or self.model.posterior_pass

        def counted(xs: torch.Tensor, bottom_up, generator):
            result = score(xs, bottom_up, generator)
            if on_chunk is not None:
                on_chunk(xs.shape[0] // x.shape[0])
            return result

        log_w, nelbo = self.model.importance_sample(x, self.config.num_samples, self.max_batch, g,
                                                    posterior_pass=counted)
        return torch.stack([-iw_bound(log_w.double()).sum(), nelbo.double().mean(0).sum()]).cpu()


def _read_partial(path: Path, args: dict, resume: bool, n_batches: int, total: int) -> Optional[dict]:
    """The state in partial file ``path`` if ``resume`` and it matches ``args``; None to start over."""
    if not path.exists():
        return None
    if not resume:
        log.warning("%s holds the partial sums of an earlier evaluation; starting over and replacing it "
                    "(resume it instead with resume=True, `nvae eval --resume`)", path)
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the partial evaluation {path} ({e}); delete it to start over") from None
    if not isinstance(state, dict) or state.get("format") != PARTIAL_FORMAT:
        raise ValueError(f"{path} is not a partial evaluation of nvae; delete it or choose another output")
    if state.get("version") != PARTIAL_VERSION:
        raise ValueError(f"{path} has partial-evaluation version {state.get('version')!r}, this nvae reads "
                         f"{PARTIAL_VERSION}; delete it to start over")
    stored, wanted = state.get("args"), json.loads(json.dumps(args))
    if stored != wanted:
        stored = stored if isinstance(stored, dict) else {}
        diffs = [f"{k}: {stored.get(k)!r} there, {wanted.get(k)!r} now" for k in sorted(set(stored) | set(wanted))
                 if stored.get(k) != wanted.get(k)]
        raise ValueError(f"{path} holds a partial evaluation with other arguments ({'; '.join(diffs)}); "
                         "rerun with its arguments to continue it, or delete it to start over")
    done, nll_b, nelbo_b = state.get("batches_done"), state.get("batch_nll_sums"), state.get("batch_nelbo_sums")
    valid = (isinstance(done, int) and 0 <= done <= n_batches and isinstance(nll_b, list) and isinstance(nelbo_b, list)
             and len(nll_b) == len(nelbo_b) == done
             and all(isinstance(v, float) for v in nll_b + nelbo_b)
             and state.get("images_done") == min(done * args["batch_size"], total))
    if not valid:
        raise ValueError(f"{path} is damaged (inconsistent batch counts or sums); delete it to start over")
    return state


def _write_partial(path: Path, args: dict, world: int, images_done: int, nll_b: list, nelbo_b: list) -> None:
    """Write the partial sums atomically."""
    state = {"format": PARTIAL_FORMAT, "version": PARTIAL_VERSION, "args": args, "world_size": world,
             "batches_done": len(nll_b), "images_done": images_done, "nll_sum": math.fsum(nll_b),
             "nelbo_sum": math.fsum(nelbo_b), "batch_nll_sums": nll_b, "batch_nelbo_sums": nelbo_b}
    text = json.dumps(state) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


@dataclass
class KLStats:
    """Average KL per latent group over a split (nats per image) and active units per group:
    latent channels whose average KL exceeds ``threshold`` (0.1 nats, the official threshold)."""

    kl_per_group: list
    active_units: list
    units_per_group: int
    threshold: float
    num_images: int
    kl_per_channel: Optional[list] = None   #: (groups, channels) average KL of each latent channel

    def to_dict(self) -> dict:
        return {**asdict(self), "units": {"kl_per_group": "nats/image"}}


@torch.no_grad()
def kl_statistics(model: NVAE, data: Dataset, batch_size: int = 64, max_images: Optional[int] = None,
                  threshold: float = 0.1, generator: Optional[torch.Generator] = None,
                  progress: bool = True) -> KLStats:
    """Per-group KL and active units of ``model`` over ``data`` (paper, Figure 5b), in eval mode."""
    from tqdm import tqdm
    cfg = model.config
    model.eval()
    loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    total = len(data) if max_images is None else min(max_images, len(data))
    kl_channels, seen = None, 0
    for (x,) in tqdm(loader, desc="kl-stats", disable=not progress, total=math.ceil(total / batch_size)):
        if seen >= total:
            break
        # on the model's device first, so that one generator of that device serves binarisation and posterior
        x = prepare_batch(x[: total - seen].to(next(model.parameters()).device), cfg, generator)
        part = model(x, generator=generator).kl_per_channel.double().sum(0)
        kl_channels = part if kl_channels is None else kl_channels + part
        seen += x.shape[0]
    mean = kl_channels / seen                                   # (L, channels)
    return KLStats(kl_per_group=mean.sum(1).tolist(), active_units=(mean > threshold).sum(1).tolist(),
                   units_per_group=mean.shape[1], threshold=threshold, num_images=seen,
                   kl_per_channel=mean.tolist())


def plot_kl_stats(stats: KLStats, path) -> None:
    """Bar plot of the KL per group (decoder order, coarsest first), written atomically as PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    path = Path(path)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.3 * len(stats.kl_per_group)), 3))
    ax.bar(range(len(stats.kl_per_group)), stats.kl_per_group)
    ax.set_xlabel("latent group (coarsest first)")
    ax.set_ylabel("KL (nats per image)")
    ax.set_title(f"KL per group over {stats.num_images} images")
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    finally:
        plt.close(fig)
