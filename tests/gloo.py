"""Run a test's worker in two CPU processes joined by a gloo process group."""
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def spawn(worker, tmp: Path, *args, timeout: float = 60) -> list:
    """``worker(rank, *args)`` in ``WORLD`` gloo processes (one thread each, collectives giving up
    after ``timeout`` seconds); what each returned."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")   # inherited by the spawned workers
        mp.spawn(_entry, args=(worker, str(tmp), args, timeout), nprocs=WORLD, join=True)
    return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _entry(rank: int, worker, tmp: str, args: tuple, timeout: float) -> None:
    torch.set_num_threads(1)
    # A file store: no port to pick, nothing to collide with. A mismatched collective
    # fails the test after a minute instead of hanging it.
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=timeout))
    try:
        torch.save(worker(rank, *args), Path(tmp) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
