"""A checkpoint read once: ours or the official code's, with what every command asks of it.

:func:`open_checkpoint` resolves a run directory to its ``checkpoint.pt``, reads the file
(one ``torch.load``, tensors and plain data only) and says what it holds: whose format,
the architecture, the weights (raw or the run's EMA), the training configuration and the
data it trained on. Commands take the :class:`OpenedCheckpoint` instead of a path, so a
checkpoint of several gigabytes is read once per command, however many things they need
from it.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch

from ..config import NVAEConfig
from .checkpoint import CheckpointError, check_ours, safe_load, upgrade
from .official import OFFICIAL_DATASETS, config_from_args, official_model

#: What :meth:`OpenedCheckpoint.model` may be asked for: the EMA when there is one, the EMA, or the raw weights.
WEIGHTS = ("auto", "ema", "raw")


def checkpoint_file(path: Union[str, Path]) -> Path:
    """``path`` itself, or ``path/checkpoint.pt`` for a run directory."""
    p = Path(path)
    return p / "checkpoint.pt" if p.is_dir() else p


def _is_official(state: Any) -> bool:
    return isinstance(state, dict) and isinstance(state.get("args"), argparse.Namespace) and "state_dict" in state


@dataclass(frozen=True)
class OpenedCheckpoint:
    """One checkpoint file's contents, read once (:func:`open_checkpoint`)."""

    path: Path      #: the checkpoint file (``RUN/checkpoint.pt`` for a run directory)
    kind: str       #: ``"ours"`` or ``"official"``
    state: Dict[str, Any]   #: the dict as read

    @property
    def is_official(self) -> bool:
        return self.kind == "official"

    @property
    def config(self) -> NVAEConfig:
        """The architecture the weights belong to."""
        if self.is_official:
            return config_from_args(self.state["args"])
        return NVAEConfig.from_dict(self.state["config"])

    @property
    def train_config(self) -> Optional[dict]:
        """Our training configuration as stored (None for an official checkpoint or a bare model file)."""
        tc = self.state.get("train_config")
        return tc if isinstance(tc, dict) else None

    @property
    def ema(self) -> Optional[Dict[str, torch.Tensor]]:
        """The EMA of the weights the run kept, or None (trained without one, an official or older file)."""
        ema = self.state.get("ema")
        if self.is_official or not isinstance(ema, dict) or not isinstance(ema.get("state_dict"), dict) \
                or not ema["state_dict"]:
            return None
        return ema["state_dict"]

    def data(self) -> Tuple[str, Optional[str]]:
        """``(data set, data folder or None)`` the weights were trained on: our training config and the data
        the run recorded, or the official ``--dataset`` and ``--data``."""
        if self.train_config is not None:
            root = (self.state.get("data") or {}).get("root")
            return self.train_config["dataset"], root if isinstance(root, str) else None
        if self.is_official:
            args = vars(self.state["args"])
            if args.get("dataset") in OFFICIAL_DATASETS:
                root = args.get("data")
                return OFFICIAL_DATASETS[args["dataset"]], root if isinstance(root, str) else None
        raise ValueError(f"{self.path} does not say which data set it was trained on; pass --dataset")

    def model(self, weights: str = "auto", device: Union[str, torch.device] = "cpu"):
        """``(plain NVAE in eval mode on device, "ema" or "raw")`` from the weights read.

        ``weights="auto"`` takes the run's EMA of the weights when it kept one and the raw weights
        otherwise; ``"ema"`` insists on the EMA, ``"raw"`` never uses it.
        """
        from ..model.network import NVAE
        if weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
        if weights == "ema" and self.ema is None:
            raise ValueError(f"{self.path} holds no EMA of the weights (the run was trained without --train "
                             "ema_rate=..., or by the official code); use the raw weights")
        if self.is_official:
            return official_model(NVAE, self.state).to(device).eval(), "raw"
        try:
            model = NVAE(self.config)
            used = "raw" if weights == "raw" or self.ema is None else "ema"
            model.load_state_dict(self.ema if used == "ema" else upgrade(self.state, model)["state_dict"])
        except (TypeError, ValueError, RuntimeError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{self.path} is damaged or inconsistent: {str(e).splitlines()[0][:300]}") from None
        return model.to(device).eval(), used


def open_checkpoint(path: Union[str, Path, OpenedCheckpoint], map_location="cpu") -> OpenedCheckpoint:
    """Read the checkpoint at ``path`` (a file, or a run directory holding ``checkpoint.pt``) once.

    An :class:`OpenedCheckpoint` passes through unread. Anything that is neither our checkpoint nor the
    official code's is a :class:`~nvae.formats.checkpoint.CheckpointError` naming the file.
    """
    if isinstance(path, OpenedCheckpoint):
        return path
    p = checkpoint_file(path)
    if not p.is_file():
        raise FileNotFoundError(f"no checkpoint at {p}; pass a run directory or a checkpoint file")
    state = safe_load(p, map_location, allowed_globals=[argparse.Namespace])
    if _is_official(state):
        return OpenedCheckpoint(p, "official", state)
    return OpenedCheckpoint(p, "ours", check_ours(state, p))
