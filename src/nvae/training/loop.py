"""Training: the official recipe (paper, Appendix A; the official ``train.py``) as a loop that reads top to bottom.

``train(model_config, train_config, run_dir)`` writes a run directory
(:mod:`nvae.training.run_dir`): both configs, ``checkpoint.pt``, TensorBoard events, image grids
and ``log.txt``. The pieces it puts together live beside it: the state of a run
(:mod:`nvae.training.state`), one optimisation step and the schedules (:mod:`nvae.training.step`),
which steps to skip (:mod:`nvae.training.skip_guard`), resuming mid-epoch (:mod:`nvae.training.resume`),
validation during training (:mod:`nvae.training.validation`).

Started by ``torchrun --nproc_per_node N -m nvae train ...`` every process runs
the same loop on its own ``batch_size`` images (the official per-GPU batch)
with DistributedDataParallel and synchronised BN (:mod:`nvae.distributed`);
only rank 0 writes the run directory.
"""
from __future__ import annotations

import random
import time
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from ..formats.checkpoint import read_checkpoint
from ..config import NVAEConfig, TrainConfig
from ..data import build_dataset, check_images_fit, prepare_batch
from ..distributed import DistributedContext, init_distributed, peer_failure, waiting_for_peers
from ..model.network import NVAE
from ..seeds import sequence_seed
from .objective import Loss, kl_balance_alpha
from .resume import ResumableSampler, StopSignal
from .run_dir import RunDirectory, RunLog, data_identity
from .skip_guard import TrainingDiverged
from .state import TrainState
from .step import Coefficients, schedule, train_step
from .validation import Validation


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGTERM or SIGINT after writing a checkpoint; ``nvae train --resume`` continues it."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path):
        super().__init__(f"{signal_name} at step {step}; checkpoint written to {checkpoint}")
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(model_config: NVAEConfig, train_config: TrainConfig, run_dir: str | Path, data_root: Optional[str] = None,
          device: str | torch.device = "cpu", progress: bool = True, resume: bool = False) -> NVAE:
    """Train a model as the official code does and return it (in eval mode).

    With ``resume=True`` the run in ``run_dir`` continues from its
    ``checkpoint.pt`` exactly as if it had never stopped (same batches, same
    noise); its configs must equal the given ones except :data:`~nvae.training.run_dir.RUN_CONTROL`.
    Without it, a ``run_dir`` that already holds a run is an error.

    Every ``checkpoint_every`` steps, at the end and on SIGTERM/SIGINT, the
    complete training state is written atomically to ``run_dir/checkpoint.pt``.
    After a signal, :class:`TrainingInterrupted` is raised once the checkpoint
    is on disk.

    The run validates on the official schedule and evaluates with K = ``final_eval_samples``
    once the schedule is complete (:mod:`nvae.training.validation`; ``eval_every`` and friends change it).

    Under torchrun (``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set) every process
    calls this: each trains on ``batch_size`` images per step from its share of
    the data set (the global batch is ``batch_size`` x processes), CUDA processes
    on ``cuda:LOCAL_RANK``, and only rank 0 writes ``run_dir`` (which every
    process must be able to read, for resuming and roll-backs).
    """
    run = RunDirectory(run_dir)
    dist_ctx = init_distributed(device, timeout=timedelta(minutes=train_config.dist_timeout_minutes))
    run.is_main = dist_ctx.is_main     # rank 0 owns the folder: the others only read what they resume from
    previous = torch.are_deterministic_algorithms_enabled()
    log = state = None
    try:
        if train_config.deterministic:
            torch.use_deterministic_algorithms(True)
        with StopSignal() as stop:
            # Problems with the run directory and the data are reported before anything is written.
            stored = run.to_resume(model_config, train_config, resume) if run.is_main or resume else None
            data, test_data = training_data(model_config, train_config, data_root, dist_ctx)
            identity = data_identity(train_config.dataset, data_root, len(data))
            run.check_data(stored, identity, train_config.allow_data_change)
            if run.is_main:
                stored = run.claim(model_config, train_config, resume, stored)
            state, batches = _start(model_config, train_config, data, test_data, dist_ctx, stored, identity)
            log = run.open_log(purge_step=state.step + 1 if stored is not None else None)
            _describe(log, state, train_config, batches, stored, run.path, resume)
            validation = Validation(train_config, test_data, log, run.path, batches.sampler.batches_per_epoch,
                                    progress)
            validation.start(state)
            _loop(state, train_config, batches._replace(validation=validation), log, run.path, progress, stop)
        # Outside the signal handler: a signal stops the (resumable) final evaluation at once.
        validation.final(state, train_config.dataset)
        if getattr(data, "skipped", 0):
            log.warning("%d unreadable training image(s) were skipped: %s", data.skipped,
                        ", ".join(map(str, list(data.skipped_files)[:10])))
        return state.model.eval()
    except RuntimeError as e:
        # A peer that died mid-collective: one line naming the step, so torchrun can restart the group.
        where = "the start of the run" if state is None else f"the run at step {state.step}"
        failure = peer_failure(e, dist_ctx, where)
        if failure is None:
            raise
        raise failure from None
    finally:
        if log is not None:
            log.close()
        run.release()
        torch.use_deterministic_algorithms(previous)
        dist_ctx.close()


class TrainingData(NamedTuple):
    data: Dataset
    sampler: ResumableSampler
    loader: DataLoader
    fixed: torch.Tensor         #: test images whose reconstructions the run shows
    identity: dict              #: what identifies the data (:func:`~nvae.training.run_dir.data_identity`)
    validation: Optional[Validation] = None     #: validation during training (:mod:`nvae.training.validation`)


def training_data(model_config: NVAEConfig, cfg: TrainConfig, data_root: Optional[str],
                  dist_ctx: DistributedContext) -> tuple:
    """``(train split, test split)``, checked against the batch size and the model's input shape."""
    opts = dict(image_size=model_config.image_size, channels=model_config.in_channels, flip=cfg.flip,
                strict=cfg.strict_data or None)
    data = build_dataset(cfg.dataset, "train", data_root, **opts)
    test_data = build_dataset(cfg.dataset, "test", data_root, **opts)
    world = dist_ctx.world_size
    if len(data) // world < cfg.batch_size:
        share = f" ({len(data) // world} per process for {world} processes)" if world > 1 else ""
        raise ValueError(f"the training set has {len(data)} images{share}, fewer than batch_size {cfg.batch_size}")
    return check_images_fit(data, model_config, cfg.dataset), test_data


def _start(model_config: NVAEConfig, cfg: TrainConfig, data: Dataset, test_data: Dataset,
           dist_ctx: DistributedContext, stored: Optional[dict], identity: dict):
    """The run's state and its batches, seeded (and restored from ``stored``) as every process needs."""
    # Seeded identically on every process, so all build the same initial model.
    seed_everything(cfg.seed)
    seed = sequence_seed(cfg.seed, dist_ctx.rank) if dist_ctx.enabled else cfg.seed
    # The data stream (binarisation) has a generator of its own; the sampler's
    # order depends on (seed, epoch) only, so a resumed run can start mid-epoch.
    generator = torch.Generator().manual_seed(seed)
    sampler = ResumableSampler(data, cfg.batch_size, num_replicas=dist_ctx.world_size, rank=dist_ctx.rank,
                               seed=cfg.seed)
    # The loader draws a seed for its workers from `generator` at every epoch: a
    # private one, so that draw never touches the global stream.
    loader = DataLoader(data, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                        generator=torch.Generator().manual_seed(cfg.seed))
    state = TrainState.create(model_config, cfg, dist_ctx, generator)
    fixed = next(iter(DataLoader(test_data, batch_size=16)))[0].to(dist_ctx.device)
    if dist_ctx.enabled:
        # Posterior noise: independent across processes (their images differ too).
        torch.manual_seed(seed)
    if stored is not None:
        state.load_state_dict(stored)
    return state, TrainingData(data, sampler, loader, fixed, identity)


def _describe(log: RunLog, state: TrainState, cfg: TrainConfig, batches: TrainingData, stored: Optional[dict],
              run_dir: Path, resume: bool) -> None:
    if resume and stored is None:
        log.info("no checkpoint in %s yet: starting the run from the beginning", run_dir)
    per_epoch = batches.sampler.batches_per_epoch
    log.info("model %s params, %s groups per scale, %d steps (%d per epoch)",
             f"{sum(p.numel() for p in state.model.parameters()):,}", list(state.model.config.groups_per_scale),
             _last_step(cfg, per_epoch), per_epoch)
    if stored is not None:
        log.info("resumed at step %d from %s", state.step, run_dir / "checkpoint.pt")
    if state.dist.enabled:
        log.info("%d processes (%s), %d images per process, global batch %d", state.dist.world_size,
                 dist.get_backend(), cfg.batch_size, state.dist.world_size * cfg.batch_size)


def _last_step(cfg: TrainConfig, steps_per_epoch: int) -> int:
    total = steps_per_epoch * cfg.epochs
    return min(total, cfg.max_steps) if cfg.max_steps else total


def _loop(state: TrainState, cfg: TrainConfig, batches: TrainingData, log: RunLog, run_dir: Path,
          progress: bool, stop: StopSignal) -> None:
    from tqdm import tqdm
    per_epoch, device = batches.sampler.batches_per_epoch, state.dist.device
    last_step = _last_step(cfg, per_epoch)
    alpha = kl_balance_alpha(state.model.config.groups_per_scale).to(device)
    ckpt_path = run_dir / "checkpoint.pt"
    bar = tqdm(total=last_step, initial=state.step, desc="train", unit="step",
               disable=not (progress and state.dist.is_main), dynamic_ncols=True)
    t_start, start_step = time.perf_counter(), state.step
    state.net.train()
    while state.step < last_step:
        batches.sampler.start(*divmod(state.step, per_epoch))
        for (x,) in batches.loader:
            x = prepare_batch(x, state.model.config, state.data_generator).to(device)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            coeffs = schedule(state.step, per_epoch, cfg, alpha, state.lr_scale)
            with waiting_for_peers(f"training step {state.step + 1}", state.dist):
                out, grad_norm, stepped = train_step(state, x, coeffs)
            if not stepped:
                log.warning("step %d skipped: loss %.4g, gradient norm %.4g (threshold %.4g); %d skipped so far",
                            state.step, out.loss.item(), grad_norm.item(), state.guard.threshold(),
                            state.guard.total)
            if state.guard.needs_rollback:
                roll_back(state, ckpt_path, cfg, log)
            # Every process stops at the same step, whichever of them was signalled.
            minutes = (state.elapsed + time.perf_counter() - t_start) / 60
            with waiting_for_peers(f"the bookkeeping after step {state.step}", state.dist):
                over_time, signalled = state.dist.any_of(cfg.max_minutes is not None and minutes > cfg.max_minutes,
                                                         stop.received is not None)
                stats = _batch_means(out, state.dist)
            if over_time:
                last_step = state.step
            bar.update(1)
            bar.set_postfix(nelbo=f"{stats['nelbo'].item():.2f}", kl=f"{stats['kl'].item():.2f}",
                            skipped=state.guard.total,
                            steps_s=f"{(state.step - start_step) / (time.perf_counter() - t_start):.1f}")
            if state.step % cfg.log_every == 0 or state.step == last_step:
                _log_step(log, state, out, stats, coeffs, grad_norm)
            if state.step % cfg.image_every == 0 or state.step == last_step:
                log.images(state.model, batches.fixed, state.step)
            if batches.validation is not None and not signalled:   # a signalled run validates when resumed
                batches.validation.after_step(state)
            if signalled or state.step % cfg.checkpoint_every == 0 or state.step == last_step:
                state.elapsed += time.perf_counter() - t_start
                t_start, start_step = time.perf_counter(), state.step
                with waiting_for_peers(f"the checkpoint of step {state.step}", state.dist):
                    state.save(ckpt_path, cfg, batches.identity)
            if signalled:
                bar.close()
                name = stop.name or "a signal on another process"
                log.info("stopped by %s at step %d; checkpoint written", name, state.step)
                raise TrainingInterrupted(name, state.step, ckpt_path)
            if state.step >= last_step:
                break
    bar.close()


def roll_back(state: TrainState, ckpt_path: Path, cfg: TrainConfig, log: RunLog) -> None:
    """Back to the last checkpoint's weights and optimiser, with a lower learning rate; data and step go on."""
    if not ckpt_path.is_file():
        raise TrainingDiverged(
            f"{state.guard.consecutive} consecutive steps were skipped (non-finite or exploding gradients) before "
            f"the first checkpoint; lower the learning rate (now {cfg.learning_rate * state.lr_scale:g}) or check "
            "the data")
    stored = read_checkpoint(ckpt_path)
    state.load_state_dict(stored, progress=False)
    state.lr_scale *= cfg.rollback_lr_factor
    state.rollbacks += 1
    state.guard.consecutive = 0
    log.warning("rolled back to the weights of step %d after %d consecutive skipped steps; learning rate now "
                "x%g of the schedule (roll-back %d)", stored["step"], cfg.max_consecutive_skips, state.lr_scale,
                state.rollbacks)


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


def _log_step(log: RunLog, state: TrainState, out: Loss, stats: dict, coeffs: Coefficients,
              grad_norm: torch.Tensor) -> None:
    log.scalars(state.step, {**stats, "kl_coeffs": out.kl_coeffs},
                {"kl_coeff": coeffs.beta, "lr": coeffs.learning_rate, "lambda": coeffs.lam,
                 "spectral_loss": out.spectral.item(), "bn_loss": out.batchnorm.item(),
                 "grad_norm": grad_norm.item(), "skipped_steps": state.guard.total,
                 "clipped_steps": state.clipped_steps})
    log.info("step %d nelbo %.4f recon %.4f kl %.4f beta %.4f lr %.2e", state.step, stats["nelbo"].item(),
             stats["recon"].item(), stats["kl"].item(), coeffs.beta, coeffs.learning_rate)
