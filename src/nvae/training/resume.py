"""What a run needs to continue as if it had never stopped.

The official code checkpoints once per epoch without random-number state, so a
restarted run sees other batches and other noise. Here a checkpoint also holds
every generator's state (torch, CUDA, NumPy, Python and the data stream's own)
and the position in the epoch, and :class:`ResumableSampler` continues an
epoch's permutation from the batch where the run stopped without loading the
batches it skips.
"""
from __future__ import annotations

import random
from typing import Dict, Optional

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

__all__ = ["capture_rng", "restore_rng", "ResumableSampler", "StopSignal"]


def capture_rng(data_generator: Optional[torch.Generator] = None,
                device: Optional[torch.device] = None) -> Dict[str, object]:
    """Every random state of this process, as tensors and plain data (loadable with ``weights_only``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }
    if data_generator is not None:
        state["data"] = data_generator.get_state()
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: Dict[str, object], data_generator: Optional[torch.Generator] = None,
                device: Optional[torch.device] = None) -> None:
    """Put back what :func:`capture_rng` recorded."""
    torch.set_rng_state(state["torch"])
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss_next"]))
    if data_generator is not None and "data" in state:
        data_generator.set_state(state["data"])
    if device is not None and device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class ResumableSampler(DistributedSampler):
    """A shuffling sampler whose order is a function of (seed, epoch) alone, that can start mid-epoch.

    It is torch's :class:`~torch.utils.data.DistributedSampler` (so one process
    is ``num_replicas=1``), plus :meth:`start`, which drops the first batches of
    the epoch's share: a resumed run then loads exactly the batches the
    uninterrupted run would have loaded next.
    """

    def __init__(self, dataset: Dataset, batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self._skip = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // self.batch_size

    def start(self, epoch: int, batch: int = 0) -> None:
        """Begin ``epoch`` at its ``batch``-th batch."""
        self.set_epoch(epoch)
        self._skip = batch * self.batch_size

    def __iter__(self):
        indices = list(super().__iter__())
        return iter(indices[self._skip:])

    def __len__(self) -> int:
        return self.num_samples - self._skip


class StopSignal:
    """Turns SIGTERM and SIGINT into a flag the training loop checks between steps.

    The loop then writes a checkpoint and stops. A second signal of the same
    kind gets the default behaviour (the atomic write keeps the previous
    checkpoint whole), so a stuck save can still be interrupted.
    """

    def __init__(self):
        self.received: Optional[int] = None
        self._previous = {}

    def _handle(self, signum, frame):
        import signal
        self.received = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __enter__(self) -> "StopSignal":
        import signal
        import threading
        if threading.current_thread() is threading.main_thread():   # handlers only work there
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        import signal
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def name(self) -> str:
        import signal
        return signal.Signals(self.received).name if self.received else ""
