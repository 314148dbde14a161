"""Every file the package reads or writes: atomic files, our checkpoint and its upgrades, the official checkpoint."""

from .opened import OpenedCheckpoint, open_checkpoint

__all__ = ["OpenedCheckpoint", "open_checkpoint"]
