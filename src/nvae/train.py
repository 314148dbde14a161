"""Training: the official recipe (NVAE.md sections 2-3) as a readable loop.

``train(model_config, train_config, run_dir)`` writes a run directory: both
configs as JSON, ``checkpoint.pt``, TensorBoard ``events.*``, sample and
reconstruction grids, and ``log.txt``.

Started by ``torchrun --nproc_per_node N -m nvae train ...`` every process runs
the same loop on its own ``batch_size`` images (the official per-GPU batch)
with DistributedDataParallel and synchronised BN (:mod:`nvae.distributed`);
only rank 0 writes the run directory.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from .cells import cell_roles
from .checkpoint import CheckpointError, read_checkpoint, save_png
from .config import TRAIN_PRESETS, NVAEConfig, TrainConfig  # noqa: F401  (re-exported)
from .data import build_dataset, prepare_batch
from .distributed import DistributedContext, init_distributed, wrap_model
from .model import NVAE
from .objective import Loss, kl_balance_alpha, kl_coefficient, nvae_loss, regularization_coefficient
from .resume import ResumableSampler, StopSignal, capture_rng, restore_rng
from .stability import GradientGuard, TrainingDiverged

log = logging.getLogger("nvae.train")


def learning_rate(step: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup_epochs``, then per-epoch cosine decay to ``learning_rate_min``."""
    warmup = cfg.warmup_epochs * steps_per_epoch
    if step < warmup:
        return cfg.learning_rate * step / warmup
    span = max(cfg.epochs - cfg.warmup_epochs - 1, 1)
    done = min(max(step // steps_per_epoch - cfg.warmup_epochs, 0), span)
    return cfg.learning_rate_min + (cfg.learning_rate - cfg.learning_rate_min) * (1 + math.cos(math.pi * done / span)) / 2


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _save_grid(images: torch.Tensor, path: Path, min_side: int = 128) -> None:
    """A PNG grid, scaled up (nearest) so small images stay visible; written atomically."""
    scale = max(1, min_side // (images.shape[-1] * 8))
    if scale > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
    save_png(images, path, nrow=int(math.sqrt(images.shape[0])), padding=1)


def _rank_seed(seed: int, rank: int) -> int:
    """A seed of its own for each process, derived from the run's seed."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def train_step(net, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, x: torch.Tensor, beta: float,
               lam: float, alpha: Optional[torch.Tensor], balance: bool = True, dtype: Optional[torch.dtype] = None,
               dist_ctx: Optional[DistributedContext] = None, max_grad_norm: float = math.inf):
    """One optimisation step: loss, backward, gradient norm, and the update unless the step is bad.

    ``net`` is what :func:`~nvae.objective.nvae_loss` takes: the model, or its
    DDP wrapper (:func:`~nvae.distributed.wrap_model`). A step is bad when its
    loss or gradient norm is not finite, or the gradient norm exceeds
    ``max_grad_norm``, on *any* process; it is then skipped on all of them, so
    the replicas never drift apart. A skipped step leaves no trace: its forward
    pass already moved the BN running statistics and power-iteration vectors
    (and, on the first step, the data-dependent initialisation), so every buffer
    is put back as it was.

    Returns the loss terms (of this process's images), the gradient norm (of the
    gradients averaged over the processes) and whether the optimiser stepped.
    """
    buffers = [b for b in net.buffers()]
    before = [b.detach().clone() for b in buffers]
    opt.zero_grad(set_to_none=True)
    amp = torch.autocast(x.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    with amp:
        out = nvae_loss(net, x, beta, lam, alpha, balance)
    scaler.scale(out.loss).backward()
    scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), float("inf"))
    bad = not (torch.isfinite(out.loss) and torch.isfinite(grad_norm) and grad_norm <= max_grad_norm)
    if dist_ctx is not None:
        bad = dist_ctx.any(bad)
    if bad:
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for b, old in zip(buffers, before):
                b.copy_(old)
    else:
        scaler.step(opt)
    scaler.update()
    return out, grad_norm, not bad


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGTERM or SIGINT after writing a checkpoint; ``nvae train --resume`` continues it."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path):
        super().__init__(f"{signal_name} at step {step}; checkpoint written to {checkpoint}")
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint


class RunDirError(ValueError):
    """The run directory does not fit the request (holds another run, or nothing to resume)."""


#: Options that only steer a run (when to stop, log, write): a resumed run may change them.
RUN_CONTROL = ("max_steps", "max_minutes", "log_every", "image_every", "checkpoint_every")


def check_same_run(stored_model: dict, stored_train: dict, model_config: NVAEConfig, cfg: TrainConfig,
                   where: Path) -> None:
    """Refuse to continue a run under a different configuration (only :data:`RUN_CONTROL` may change)."""
    model_diff = sorted(k for k, v in model_config.to_dict().items() if stored_model.get(k, v) != v)
    model_diff += sorted(set(stored_model) - set(model_config.to_dict()))
    train_diff = sorted(k for k, v in cfg.to_dict().items()
                        if k not in RUN_CONTROL and stored_train.get(k, v) != v)
    if model_diff or train_diff:
        parts = [f"model {', '.join(model_diff)}" if model_diff else "", f"training {', '.join(train_diff)}"
                 if train_diff else ""]
        raise RunDirError(f"{where} holds a run with a different configuration ({'; '.join(p for p in parts if p)} "
                          f"differ); resume it without those overrides, or train into another --run-dir")


def stored_run_configs(run_dir: Path):
    """(model config dict, train config dict, checkpoint dict or None) of an existing run directory."""
    ckpt = run_dir / "checkpoint.pt"
    if ckpt.is_file():
        state = read_checkpoint(ckpt)
        if not isinstance(state.get("train_config"), dict):
            raise CheckpointError(f"{ckpt} holds a model but no training state; it cannot be resumed")
        return state["config"], state["train_config"], state
    try:
        return (json.loads((run_dir / "model_config.json").read_text()),
                json.loads((run_dir / "train_config.json").read_text()), None)
    except FileNotFoundError:
        raise RunDirError(f"{run_dir} holds no run to resume (no checkpoint.pt or configs); check the path, "
                          "or start a new run without --resume") from None
    except json.JSONDecodeError as e:
        raise RunDirError(f"{run_dir} holds damaged configs ({e}); start a new run in another --run-dir") from None


def holds_run(run_dir: Path) -> bool:
    return (run_dir / "checkpoint.pt").exists() or (run_dir / "model_config.json").exists()


def train(model_config: NVAEConfig, train_config: TrainConfig, run_dir: str | Path, data_root: Optional[str] = None,
          device: str | torch.device = "cpu", progress: bool = True, resume: bool = False) -> NVAE:
    """Train a model as the official code does and return it (in eval mode).

    With ``resume=True`` the run in ``run_dir`` continues from its
    ``checkpoint.pt`` exactly as if it had never stopped (same batches, same
    noise); its configs must equal the given ones except :data:`RUN_CONTROL`.
    Without it, a ``run_dir`` that already holds a run is an error.

    Every ``checkpoint_every`` steps, at the end and on SIGTERM/SIGINT, the
    complete training state is written atomically to ``run_dir/checkpoint.pt``.
    After a signal, :class:`TrainingInterrupted` is raised once the checkpoint
    is on disk.

    Under torchrun (``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set) every process
    calls this: each trains on ``batch_size`` images per step from its share of
    the data set (the global batch is ``batch_size`` x processes), CUDA processes
    on ``cuda:LOCAL_RANK``, and only rank 0 writes ``run_dir`` (which every
    process must be able to read, for resuming and roll-backs).
    """
    run_dir = Path(run_dir)
    dist_ctx = init_distributed(device)
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        if train_config.deterministic:
            torch.use_deterministic_algorithms(True)
        with StopSignal() as stop:
            return _train(model_config, train_config, run_dir, data_root, dist_ctx, progress, resume, stop)
    finally:
        torch.use_deterministic_algorithms(previous)
        dist_ctx.close()


class _Run:
    """The mutable state of a run beyond model and optimiser, as it is checkpointed."""

    def __init__(self):
        self.step = 0
        self.elapsed = 0.0      # seconds of training before this process started
        self.lr_scale = 1.0     # lowered by each roll-back
        self.rollbacks = 0

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        for key in vars(self):
            setattr(self, key, type(getattr(self, key))(state[key]))


def _train(model_config: NVAEConfig, cfg: TrainConfig, run_dir: Path, data_root: Optional[str],
           dist_ctx: DistributedContext, progress: bool, resume: bool, stop: StopSignal) -> NVAE:
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    device, main, world = dist_ctx.device, dist_ctx.is_main, dist_ctx.world_size
    ckpt_path = run_dir / "checkpoint.pt"
    # Problems with the run directory and the data are reported before anything is written.
    state = None
    if resume:
        stored_model, stored_train, state = stored_run_configs(run_dir)
        check_same_run(stored_model, stored_train, model_config, cfg, run_dir)
    elif holds_run(run_dir):
        raise RunDirError(f"{run_dir} already holds a run; continue it with --resume, or choose another --run-dir")
    opts = dict(image_size=model_config.image_size, channels=model_config.in_channels, flip=cfg.flip,
                strict=cfg.strict_data or None)
    data = build_dataset(cfg.dataset, "train", data_root, **opts)
    test_data = build_dataset(cfg.dataset, "test", data_root, **opts)
    if len(data) // world < cfg.batch_size:
        share = f" ({len(data) // world} per process for {world} processes)" if world > 1 else ""
        raise ValueError(f"the training set has {len(data)} images{share}, fewer than batch_size {cfg.batch_size}")
    shape = tuple(data[0][0].shape)
    expected = (model_config.in_channels, model_config.image_size, model_config.image_size)
    if shape != expected:
        raise ValueError(f"data set {cfg.dataset!r} yields images of shape {shape} but the model expects "
                         f"{expected}; pick the matching preset or override in_channels / image_size")

    handler = None
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in run_dir.glob(".checkpoint.pt.*.tmp"):   # left by a process killed while writing
            stale.unlink()
        model_config.to_json(run_dir / "model_config.json")
        (run_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        handler = logging.FileHandler(run_dir / "log.txt")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)

    # Seeded identically on every process, so all build the same initial model.
    seed_everything(cfg.seed)
    rank_seed = _rank_seed(cfg.seed, dist_ctx.rank) if dist_ctx.enabled else cfg.seed
    # The data stream (binarisation) has a generator of its own; the sampler's
    # order depends on (seed, epoch) only, so a resumed run can start mid-epoch.
    gen = torch.Generator().manual_seed(rank_seed)
    sampler = ResumableSampler(data, cfg.batch_size, num_replicas=world, rank=dist_ctx.rank, seed=cfg.seed)
    # The loader draws a seed for its workers from `generator` at every epoch: a
    # private one, so that draw never touches the global stream.
    loader = DataLoader(data, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                        generator=torch.Generator().manual_seed(cfg.seed))
    steps_per_epoch = sampler.batches_per_epoch
    total_steps = steps_per_epoch * cfg.epochs
    last_step = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps

    model = NVAE(model_config).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.set_checkpointing(cfg.checkpointing, cfg.checkpointing_roles)
    model.set_recompute_bn(cfg.recompute_bn)
    net = wrap_model(model, dist_ctx)
    opt = torch.optim.Adamax(model.parameters(), lr=cfg.learning_rate, eps=1e-3, weight_decay=cfg.weight_decay)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    guard = GradientGuard(cfg.skip_grad_factor, cfg.skip_grad_quantile, cfg.skip_grad_window,
                          max_consecutive=cfg.max_consecutive_skips)
    alpha = kl_balance_alpha(model_config.groups_per_scale).to(device)
    fixed = next(iter(DataLoader(test_data, batch_size=16)))[0]
    if dist_ctx.enabled:
        # Posterior noise: independent across processes (their images differ too).
        torch.manual_seed(rank_seed)
    run = _Run()
    if state is not None:
        _restore(state, model, opt, scaler, guard, run, gen, dist_ctx)
    elif resume and main:
        log.info("no checkpoint in %s yet: starting the run from the beginning", run_dir)
    writer = SummaryWriter(str(run_dir), purge_step=run.step + 1 if state is not None else None) if main else None
    if main:
        log.info("model %s params, %s groups per scale, %d steps (%d per epoch)",
                 f"{sum(p.numel() for p in model.parameters()):,}", list(model_config.groups_per_scale), last_step,
                 steps_per_epoch)
        if state is not None:
            log.info("resumed at step %d from %s", run.step, ckpt_path)
        if dist_ctx.enabled:
            log.info("%d processes (%s), %d images per process, global batch %d", world, dist.get_backend(),
                     cfg.batch_size, world * cfg.batch_size)

    def save_checkpoint() -> None:
        rng = capture_rng(gen, device)
        rngs = [None] * world
        if dist_ctx.enabled:
            dist.all_gather_object(rngs, rng)
        else:
            rngs = [rng]
        if main:
            model.save(ckpt_path, train_config=cfg.to_dict(), step=run.step, optimizer=opt.state_dict(),
                       scaler=scaler.state_dict(), guard=guard.state_dict(), run=run.state_dict(), rng=rngs,
                       world_size=world)

    bar = tqdm(total=last_step, initial=run.step, desc="train", unit="step", disable=not (progress and main),
               dynamic_ncols=True)
    t_start, start_step = time.perf_counter(), run.step
    net.train()
    while run.step < last_step:
        epoch, batch = divmod(run.step, steps_per_epoch)
        sampler.start(epoch, batch)
        for (x,) in loader:
            x = prepare_batch(x, model_config.decoder, model_config.num_x_bits, gen).to(device)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            lr = learning_rate(run.step, steps_per_epoch, cfg) * run.lr_scale
            for group in opt.param_groups:
                group["lr"] = lr
            beta = kl_coefficient(run.step, total_steps, cfg.kl_anneal_portion, cfg.kl_const_portion,
                                  cfg.kl_const_coeff)
            lam = regularization_coefficient(beta, cfg.weight_decay_norm, cfg.weight_decay_norm_init,
                                             cfg.weight_decay_norm_anneal)
            out, grad_norm, stepped = train_step(net, opt, scaler, x, beta, lam, alpha, cfg.kl_balance, dtype,
                                                 dist_ctx, max_grad_norm=guard.threshold())
            guard.update(grad_norm.item(), stepped)
            run.step += 1
            if not stepped and main:
                log.warning("step %d skipped: loss %.4g, gradient norm %.4g (threshold %.4g); %d skipped so far",
                            run.step, out.loss.item(), grad_norm.item(), guard.threshold(), guard.total)
            if guard.needs_rollback:
                _roll_back(ckpt_path, model, opt, scaler, guard, run, cfg, main)
            # Every process stops at the same step, whichever of them was signalled.
            over_time = cfg.max_minutes is not None and \
                run.elapsed + time.perf_counter() - t_start > 60 * cfg.max_minutes
            if dist_ctx.enabled:
                flags = dist_ctx.mean(torch.tensor([float(over_time), float(stop.received is not None)],
                                                   device=device))
                over_time, signalled = bool(flags[0] > 0), bool(flags[1] > 0)
            else:
                signalled = stop.received is not None
            if over_time:
                last_step = run.step
            stats = _batch_means(out, dist_ctx)
            nelbo = stats["nelbo"].item()
            bar.update(1)
            bar.set_postfix(nelbo=f"{nelbo:.2f}", kl=f"{stats['kl'].item():.2f}", skipped=guard.total,
                            steps_s=f"{(run.step - start_step) / (time.perf_counter() - t_start):.1f}")
            if main and (run.step % cfg.log_every == 0 or run.step == last_step):
                _log_scalars(writer, run.step, out, stats, beta, lr, lam, grad_norm, guard.total)
                log.info("step %d nelbo %.4f recon %.4f kl %.4f beta %.4f lr %.2e", run.step, nelbo,
                         stats["recon"].item(), stats["kl"].item(), beta, lr)
            if main and (run.step % cfg.image_every == 0 or run.step == last_step):
                _write_images(model, fixed.to(device), run_dir, writer, run.step)
                model.train()
            if signalled or run.step % cfg.checkpoint_every == 0 or run.step == last_step:
                run.elapsed += time.perf_counter() - t_start
                t_start, start_step = time.perf_counter(), run.step
                save_checkpoint()
            if signalled:
                bar.close()
                name = stop.name or "a signal on another process"
                if main:
                    log.info("stopped by %s at step %d; checkpoint written", name, run.step)
                    _close_logs(writer, handler)
                raise TrainingInterrupted(name, run.step, ckpt_path)
            if run.step >= last_step:
                break
    bar.close()
    if main:
        if getattr(data, "skipped", 0):
            log.warning("%d unreadable training image(s) were skipped: %s", data.skipped,
                        ", ".join(map(str, list(data.skipped_files)[:10])))
        _close_logs(writer, handler)
    return model.eval()


def _close_logs(writer, handler) -> None:
    writer.close()
    log.removeHandler(handler)
    handler.close()


def _restore(state: dict, model: NVAE, opt, scaler, guard: GradientGuard, run: _Run, gen: torch.Generator,
             dist_ctx: DistributedContext) -> None:
    """Load a training checkpoint into this process's model, optimiser, counters and random generators."""
    try:
        model.load_state_dict(state["state_dict"])
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state.get("scaler") or {})
        guard.load_state_dict(state["guard"])
        run.load_state_dict(state["run"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"the checkpoint cannot be resumed ({type(e).__name__}: {str(e).splitlines()[0][:200]});"
                              " it may come from an older nvae; start a new run from its weights instead") from None
    rngs = state.get("rng") or []
    if len(rngs) == dist_ctx.world_size:
        restore_rng(rngs[dist_ctx.rank], gen, dist_ctx.device)
    else:
        # Another number of processes: the data shards differ anyway; fresh, distinct streams.
        log.warning("checkpoint written by %d process(es), resumed by %d: random streams re-seeded, so the run "
                    "continues correctly but not bit-identically", len(rngs), dist_ctx.world_size)
        seed = _rank_seed(run.step, dist_ctx.rank)
        torch.manual_seed(seed)
        gen.manual_seed(seed + 1)


def _roll_back(ckpt_path: Path, model: NVAE, opt, scaler, guard: GradientGuard, run: _Run, cfg: TrainConfig,
               main: bool) -> None:
    """Back to the last checkpoint's weights and optimiser, with a lower learning rate; data and step go on."""
    if not ckpt_path.is_file():
        raise TrainingDiverged(
            f"{guard.consecutive} consecutive steps were skipped (non-finite or exploding gradients) before the "
            f"first checkpoint; lower the learning rate (now {cfg.learning_rate * run.lr_scale:g}) or check the data")
    state = read_checkpoint(ckpt_path)
    model.load_state_dict(state["state_dict"])
    opt.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state.get("scaler") or {})
    run.lr_scale *= cfg.rollback_lr_factor
    run.rollbacks += 1
    guard.consecutive = 0
    if main:
        log.warning("rolled back to the weights of step %d after %d consecutive skipped steps; learning rate now "
                    "x%g of the schedule (roll-back %d)", state["step"], cfg.max_consecutive_skips, run.lr_scale,
                    run.rollbacks)


def _batch_means(out: Loss, dist_ctx: DistributedContext) -> dict:
    """Per-image averages of the loss terms over the whole batch (all processes; equal shares)."""
    parts = {"nelbo": out.nelbo.mean(), "recon": out.recon.mean(), "kl": out.kl.sum(1).mean(),
             "kl_groups": out.kl.mean(0), "kl_channels": out.kl_per_channel.mean(0)}
    if not dist_ctx.enabled:
        return {k: v.detach() for k, v in parts.items()}
    # One collective for all of them.
    flat = dist_ctx.mean(torch.cat([v.detach().float().reshape(-1) for v in parts.values()]))
    sizes = [v.numel() for v in parts.values()]
    return {k: chunk.view(v.shape) for (k, v), chunk in zip(parts.items(), flat.split(sizes))}


def _log_scalars(writer, step, out, stats, beta, lr, lam, grad_norm, skipped) -> None:
    writer.add_scalar("train/nelbo", stats["nelbo"].item(), step)
    writer.add_scalar("train/recon", stats["recon"].item(), step)
    writer.add_scalar("train/kl", stats["kl"].item(), step)
    writer.add_scalar("train/kl_coeff", beta, step)
    writer.add_scalar("train/lr", lr, step)
    writer.add_scalar("train/lambda", lam, step)
    writer.add_scalar("train/spectral_loss", out.spectral.item(), step)
    writer.add_scalar("train/bn_loss", out.batchnorm.item(), step)
    writer.add_scalar("train/grad_norm", grad_norm.item(), step)
    writer.add_scalar("train/skipped_steps", skipped, step)
    kl_groups = stats["kl_groups"]
    active = (stats["kl_channels"] > 0.1).sum(1)   # the official threshold, per latent channel
    for i in range(kl_groups.shape[0]):
        writer.add_scalar(f"kl/group_{i}", kl_groups[i].item(), step)
        writer.add_scalar(f"active/group_{i}", active[i].item(), step)
        writer.add_scalar(f"kl_balance/group_{i}", out.kl_coeffs[i].item(), step)


@torch.no_grad()
def _write_images(model: NVAE, fixed: torch.Tensor, run_dir: Path, writer, step: int) -> None:
    from torchvision.utils import make_grid
    model.eval()
    # A generator of its own: writing images must not move the training's random streams.
    gen = torch.Generator(device=fixed.device).manual_seed(step)
    samples = model.sample(64, temperature=1.0, generator=gen, mean=True)
    _save_grid(samples, run_dir / "samples.png")
    writer.add_image("samples", make_grid(samples, nrow=8), step)
    x = prepare_batch(fixed, model.config.decoder, model.config.num_x_bits, gen)
    recon = model.output_distribution(model(x, temperature=0.0).logits).mean()
    pairs = torch.stack([x, recon], dim=1).flatten(0, 1)
    _save_grid(pairs, run_dir / "reconstructions.png")
    writer.add_image("reconstructions", make_grid(pairs, nrow=8), step)
