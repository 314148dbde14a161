"""The state of a training run: everything a step changes, and everything a checkpoint holds.

One :class:`TrainState` is saved by checkpointing, restored by resuming, and
partly restored by a roll-back, all through :meth:`TrainState.state_dict` and
:meth:`TrainState.load_state_dict`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ..formats.checkpoint import CheckpointError, save_model, upgrade
from ..config import NVAEConfig, TrainConfig
from ..distributed import DistributedContext, wrap_model
from .ema import WeightEMA
from .. import speedups
from ..speedups.compile import compile_loss
from ..model.network import NVAE
from .objective import nvae_loss
from ..seeds import sequence_seed
from .resume import capture_rng, restore_rng
from .skip_guard import GradientGuard

log = logging.getLogger("nvae.training.loop")

#: Autocast dtypes of ``TrainConfig.precision``.
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainState:
    """Model, optimiser, grad scaler, gradient guard, EMA of the weights, counters and the data stream's generator.

    ``net`` is what the loss runs: the model, or its DistributedDataParallel wrapper.
    ``ema`` (None: off) is updated after every applied step; ``grad_clip`` (0: off) bounds
    the gradient norm of each step (:func:`nvae.training.step.train_step`). ``loss_fn`` computes
    the step's loss: :func:`~nvae.training.objective.nvae_loss`, or it compiled
    (:func:`nvae.speedups.compile.compile_loss`, ``TrainConfig.compile``).
    """

    model: NVAE
    optimizer: torch.optim.Optimizer
    net: Optional[nn.Module] = None
    scaler: Optional[torch.amp.GradScaler] = None
    guard: GradientGuard = field(default_factory=GradientGuard)
    dist: DistributedContext = field(default_factory=DistributedContext)
    data_generator: torch.Generator = field(default_factory=torch.Generator)
    autocast_dtype: Optional[torch.dtype] = None
    step: int = 0
    lr_scale: float = 1.0       #: lowered by each roll-back
    rollbacks: int = 0
    elapsed: float = 0.0        #: seconds of training before this process started
    ema: Optional[WeightEMA] = None
    grad_clip: float = 0.0
    clipped_steps: int = 0      #: applied steps whose gradients were clipped
    loss_fn: Callable = nvae_loss

    COUNTERS = ("step", "elapsed", "lr_scale", "rollbacks", "clipped_steps")
    #: counters an older checkpoint may lack, and the value they start from
    NEWER_COUNTERS = {"clipped_steps": 0}

    def __post_init__(self):
        if self.net is None:
            self.net = self.model
        if self.scaler is None:
            self.scaler = torch.amp.GradScaler(self.dist.device.type, enabled=False)

    @classmethod
    def create(cls, model_config: NVAEConfig, cfg: TrainConfig, dist_ctx: DistributedContext = DistributedContext(),
               data_generator: Optional[torch.Generator] = None) -> "TrainState":
        """A fresh model on the process's device with ``cfg``'s memory options, DDP-wrapped under
        torchrun, and the official optimiser (Adamax, eps 1e-3); with ``cfg.compile`` the loss compiled."""
        model = NVAE(model_config).to(dist_ctx.device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        checkpointing = (tuple(cfg.checkpointing_roles) if cfg.checkpointing_roles else True) if cfg.checkpointing else False
        speedups.apply(model, recompute_bn=cfg.recompute_bn, checkpointing=checkpointing)
        net = wrap_model(model, dist_ctx)
        opt = torch.optim.Adamax(model.parameters(), lr=cfg.learning_rate, eps=1e-3, weight_decay=cfg.weight_decay)
        guard = GradientGuard(cfg.skip_grad_factor, cfg.skip_grad_quantile, cfg.skip_grad_window,
                              max_consecutive=cfg.max_consecutive_skips)
        return cls(model, opt, net, torch.amp.GradScaler(dist_ctx.device.type, enabled=cfg.precision == "fp16"),
                   guard, dist_ctx, data_generator or torch.Generator(), AUTOCAST[cfg.precision],
                   ema=WeightEMA(cfg.ema_rate) if cfg.ema_rate > 0 else None, grad_clip=cfg.grad_clip,
                   loss_fn=compile_loss(model, nvae_loss) if cfg.compile else nvae_loss)

    # ------------------------------------------------------------ save / load
    def state_dict(self) -> Dict[str, Any]:
        """Weights, optimiser, scaler, guard, counters (``run``), the EMA (when on) and this process's random
        streams."""
        state = {"state_dict": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scaler": self.scaler.state_dict(), "guard": self.guard.state_dict(),
                 "run": {k: getattr(self, k) for k in self.COUNTERS},
                 "rng": capture_rng(self.data_generator, self.dist.device)}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state: Dict[str, Any], progress: bool = True) -> None:
        """Load a checkpoint (:meth:`save`'s file, read by :func:`~nvae.formats.checkpoint.read_checkpoint`).

        With ``progress=False`` (a roll-back) only weights, EMA, optimiser and scaler are
        loaded: the step, the guard's history and the random streams go on. A checkpoint
        without an EMA (older, or from a run without one) leaves the EMA empty: it starts
        again from the weights at the next applied step.
        """
        try:
            state = upgrade(state, self.model)
            self.model.load_state_dict(state["state_dict"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state.get("scaler") or {})
            if self.ema is not None:
                self.ema.load_state_dict(state.get("ema") or {"state_dict": {}, "updates": 0}, self.model)
            if progress:
                self.guard.load_state_dict(state["guard"])
                for k in self.COUNTERS:
                    value = state["run"][k] if k in state["run"] else self.NEWER_COUNTERS[k]
                    setattr(self, k, type(getattr(self, k))(value))
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"the checkpoint cannot be resumed ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200]}); it may come from an older nvae; start a new run "
                                  "from its weights instead") from None
        if progress:
            self._load_rng(state.get("rng") or [])

    def _load_rng(self, rngs: list) -> None:
        if len(rngs) == self.dist.world_size:
            restore_rng(rngs[self.dist.rank], self.data_generator, self.dist.device)
            return
        # Another number of processes: the data shards differ anyway; fresh, distinct streams.
        log.warning("checkpoint written by %d process(es), resumed by %d: random streams re-seeded, so the run "
                    "continues correctly but not bit-identically", len(rngs), self.dist.world_size)
        seed = sequence_seed(self.step, self.dist.rank)
        torch.manual_seed(seed)
        self.data_generator.manual_seed(seed + 1)

    def save(self, path: Path, train_config: TrainConfig, data: Optional[dict] = None) -> None:
        """Write the state of every process to ``path`` atomically (rank 0 writes; a collective under torchrun),
        with ``data``, what identifies the training data (:func:`nvae.training.run_dir.data_identity`)."""
        state = self.state_dict()
        rngs = [state.pop("rng")]
        if self.dist.enabled:
            mine, rngs = rngs[0], [None] * self.dist.world_size
            dist.all_gather_object(rngs, mine)
        if self.dist.is_main:
            state.pop("state_dict")
            save_model(self.model, path, train_config=train_config.to_dict(), step=self.step, rng=rngs,
                       world_size=self.dist.world_size, data=data, **state)
