"""Data-parallel training over processes started by ``torchrun`` (the official ``datasets.py``).

The official recipe trains on several GPUs with synchronised BatchNorm: every BN
layer normalises with the statistics of the *whole* batch across processes, so
N processes with B images each compute the same thing as one process with N*B.
``nn.SyncBatchNorm`` only runs on CUDA; :class:`SyncBatchNorm2d` does the same
on any device and backend (gloo on CPU included) and stays an ``nn.BatchNorm2d``,
so BN regularisation, gradient checkpointing (which sets the momentum to 0 while
it recomputes) and checkpoint keys are unaffected.

Use::

    ctx = init_distributed("cuda")       # reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK
    net = wrap_model(model.to(ctx.device), ctx)
    ...
    ctx.close()
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import uuid
from datetime import timedelta
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.autograd.function import once_differentiable
from torch.nn.parallel import DistributedDataParallel

from .model.layers import BN_EPS, BN_MOMENTUM

log = logging.getLogger(__name__)

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")

#: How long a process waits for the others in a collective before giving up (gloo's own default is 30 minutes).
DEFAULT_TIMEOUT = timedelta(minutes=5)


class PeerFailure(RuntimeError):
    """Another process of the job stopped answering; this one stops too, without writing anything.

    Under ``torchrun --max-restarts N`` that non-zero exit is what lets the agent start the
    group again, which then continues from the last checkpoint.
    """


class PeerTimeout(PeerFailure):
    """The other processes did not answer within the process group's timeout."""


class PeerLost(PeerFailure):
    """The connection to another process broke: it died (or its machine did)."""


#: How a collective says that its peer went away: gloo's socket errors, NCCL's abort, a store whose server is gone.
_LOST_WORDS = ("connection reset", "connection closed", "connection refused", "broken pipe", "read error",
               "write error", "socket closed", "nccl communicator was aborted", "connectfullmesh failed")


def peer_failure(error: BaseException, ctx: "DistributedContext", what: str) -> Optional[PeerFailure]:
    """``error`` as a :class:`PeerFailure` saying ``what`` this process was doing, or None when it is
    another kind of error (a bug, a full disk: those keep their own message)."""
    if not ctx.enabled or isinstance(error, PeerFailure) or not isinstance(error, RuntimeError):
        return None
    text = str(error).lower()
    where = f"process {ctx.rank} of {ctx.world_size}"
    if "timed out" in text or "timeout" in text:
        return PeerTimeout(f"{where} got no answer from the others during {what} within the timeout "
                           "(--dist-timeout): one of them has stopped or hangs; this process stops without "
                           "writing anything")
    if any(w in text for w in _LOST_WORDS):
        return PeerLost(f"{where} lost another process during {what} (it died, or its machine did); this "
                        "process stops without writing anything")
    return None


@contextlib.contextmanager
def waiting_for_peers(what: str, ctx: "DistributedContext"):
    """Turn a collective's timeout or broken connection during ``what`` into a :class:`PeerFailure`
    that says so (one line); any other error passes unchanged."""
    try:
        yield
    except RuntimeError as e:
        failure = peer_failure(e, ctx, what)
        if failure is None:
            raise
        raise failure from None


# ------------------------------------------------------------------ process group
def torchrun_env(environ: Optional[Mapping[str, str]] = None) -> Optional[Tuple[int, int, int]]:
    """``(rank, world_size, local_rank)`` when the process was started by torchrun, else None.

    All three variables must be set; a partial set is ignored (with a warning),
    since a stray ``RANK`` in a shell must not turn a run into a hanging one.
    """
    environ = os.environ if environ is None else environ
    present = [k for k in TORCHRUN_VARS if k in environ]
    if not present:
        return None
    if len(present) < len(TORCHRUN_VARS):
        log.warning("ignoring partial torchrun environment (%s set, %s missing); running as one process",
                    ", ".join(present), ", ".join(k for k in TORCHRUN_VARS if k not in environ))
        return None
    try:
        rank, world, local = (int(environ[k]) for k in TORCHRUN_VARS)
    except ValueError:
        values = ", ".join(f"{k}={environ[k]!r}" for k in TORCHRUN_VARS)
        raise ValueError(f"torchrun variables must be integers, got {values}") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(f"inconsistent torchrun variables RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local}")
    return rank, world, local


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a data-parallel run (one process: rank 0 of 1).

    One process is ``DistributedContext()``, which is what every ``dist_ctx`` parameter
    defaults to: the context is immutable (frozen, and a ``torch.device`` is immutable too),
    so one default instance can be shared by every call.
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    #: Whether :func:`init_distributed` created the process group (and :meth:`close` destroys it).
    owns_process_group: bool = False

    @property
    def enabled(self) -> bool:
        """True when there is more than one process to synchronise with."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and shows progress."""
        return self.rank == 0

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The average of ``tensor`` over the processes (detached); the tensor itself for one process."""
        tensor = tensor.detach()
        if not self.enabled:
            return tensor
        total = tensor.to(self.device, copy=True)
        dist.all_reduce(total)
        return total / self.world_size

    def from_main(self, obj):
        """The ``obj`` rank 0 holds, on every process (``obj`` itself for one process); a collective
        every process must reach, each passing its own ``obj`` (ignored but on rank 0)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def any(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on at least one of them."""
        if not self.enabled:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def any_of(self, *flags: bool) -> Tuple[bool, ...]:
        """:meth:`any` of each flag, in one collective."""
        if not self.enabled:
            return tuple(bool(f) for f in flags)
        t = torch.tensor([1.0 if f else 0.0 for f in flags], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return tuple(bool(v > 0) for v in t.tolist())

    def close(self) -> None:
        """Tear down the process group if :func:`init_distributed` created it."""
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device: Union[str, torch.device] = "cpu", backend: Optional[str] = None,
                     environ: Optional[Mapping[str, str]] = None,
                     timeout: timedelta = DEFAULT_TIMEOUT) -> DistributedContext:
    """Join the torchrun job this process belongs to, if any.

    Without torchrun's variables (or with ``WORLD_SIZE=1``) nothing happens and
    the context describes a single process on ``device``. Otherwise the default
    process group is initialised from the environment (``MASTER_ADDR`` /
    ``MASTER_PORT``, set by torchrun's rendezvous, multi-node included), with
    ``backend`` ``nccl`` for CUDA and ``gloo`` for CPU unless given; a CUDA
    process uses ``cuda:LOCAL_RANK``. A process group that already exists (set
    up by the caller) is used as it is and left for the caller to destroy.
    """
    device = torch.device(device)
    environ = os.environ if environ is None else environ
    env = torchrun_env(environ)
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = env[2] if env is not None else rank
        return DistributedContext(rank, local, world, _local_device(device, local, world), False)
    if env is None or env[1] == 1:
        return DistributedContext(device=device)
    rank, world, local = env
    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed; it cannot run under torchrun")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"distributed training runs on cpu (gloo) or cuda (nccl), not {device.type!r}")
    device = _local_device(device, local, world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "TORCHELASTIC_RUN_ID" in environ:
        _stop_with_agent()
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    ctx = DistributedContext(rank, local, world, device, True)
    with waiting_for_peers("the creation of the process group", ctx):
        if environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            store = _round_store(environ["MASTER_ADDR"], int(environ["MASTER_PORT"]), rank, world, timeout)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
        else:
            dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, timeout=timeout)
    return ctx


def _round_store(host: str, port: int, rank: int, world: int, timeout: timedelta) -> "dist.Store":
    """A part of torchrun's store that only the processes of this start of the group use.

    torchrun's agent keeps one store for the whole job, and a group it restarts
    (``--max-restarts``) finds the keys of the group before it there: gloo would read a dead
    process's address and fail, or wait, in ``init_process_group``. The restart count
    cannot name the part (each agent counts its own restarts), so rank 0 takes a new number
    from the store and hands it to each other rank, which proves it is of this start by
    having its own fresh token answered. Every wait ends after ``timeout``.
    """
    store = dist.TCPStore(host, port, world_size=world, is_master=False, timeout=timeout)
    deadline = time.monotonic() + timeout.total_seconds()
    if rank == 0:
        start = str(store.add("nvae/starts", 1))
        store.set("nvae/current", start)
        for other in range(1, world):
            key = f"nvae/{start}/hello/{other}"
            store.wait([key], timedelta(seconds=max(deadline - time.monotonic(), 0.001)))
            store.set(f"nvae/{start}/welcome/{store.get(key).decode()}", "1")
    else:
        token, greeted = uuid.uuid4().hex, None
        while True:
            # Until rank 0 of this start has written its number, "current" is the last start's.
            start = store.get("nvae/current").decode()
            if start != greeted:
                store.set(f"nvae/{start}/hello/{rank}", token)
                greeted = start
            if store.check([f"nvae/{start}/welcome/{token}"]):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("timed out waiting for rank 0 to open this start of the group")
            time.sleep(0.05)
    return dist.PrefixStore(f"nvae/{start}/group", store)


def _stop_with_agent() -> None:
    """Ask the kernel for a SIGTERM when torchrun's agent, this process's parent, dies (Linux only).

    Without it a killed agent leaves its workers training on, and the rerun of the same
    command finds the run directory in use; with it they stop as on any SIGTERM: checkpoint, exit.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    if libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0) != 0:
        log.warning("could not ask to be stopped with torchrun's agent (errno %d)", ctypes.get_errno())
    elif os.getppid() != parent:   # the agent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _local_device(device: torch.device, local_rank: int, world: int) -> torch.device:
    if device.type != "cuda" or world == 1:
        return device
    if device.index is not None and device.index != local_rank:
        log.warning("under torchrun each process uses cuda:LOCAL_RANK; ignoring %s, using cuda:%d",
                    device, local_rank)
    return torch.device("cuda", local_rank)


# ------------------------------------------------------------ synchronised BN
class _AllReduceSum(torch.autograd.Function):
    """Sum over the processes, differentiable: the gradient of a sum is the sum of the gradients.

    (``torch.distributed.nn.functional.all_reduce`` does the same but is
    deprecated in recent PyTorch and warns on every call.)
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        # Each process's loss depends on the global sums, so the gradient reaching
        # one process's local sums is the sum of every process's gradient.
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Differentiable sum of ``tensor`` over the processes of ``group`` (default: all)."""
    return _AllReduceSum.apply(tensor, group)


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics are those of the batch of *all* processes.

    A training-mode forward all-reduces the per-channel sum, sum of squares and
    count (one collective per layer, accumulated in fp64), normalises with the global mean and biased
    variance, and moves the running averages towards the global mean and
    *unbiased* variance (``N / (N - 1)``, N the global count), as BN on the
    concatenated batch would. Gradients flow through the global statistics, so
    N processes compute the gradients of one process with all the images.
    In eval mode, or without a process group of more than
    one process, it is plain ``nn.BatchNorm2d``.

    Every process of ``process_group`` (default: all) must run the same BN
    layers in the same order in training mode, as with ``nn.SyncBatchNorm``.
    """

    def __init__(self, num_features: int, eps: float = BN_EPS, momentum: Optional[float] = BN_MOMENTUM,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _group_size(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self._group_size() == 1:
            return super().forward(x)
        self._check_input_dim(x)
        c = self.num_features
        xs = x if x.dtype in (torch.float32, torch.float64) else x.float()
        # Sums accumulated in fp64: the variance E[x^2] - mean^2 cancels digits when
        # |mean| >> std, and fp32 sums would lose them (autograd keeps nothing extra).
        acc = torch.float64
        local = torch.cat([xs.sum(dim=(0, 2, 3), dtype=acc), xs.square().sum(dim=(0, 2, 3), dtype=acc),
                           torch.full((1,), float(xs.numel() // c), dtype=acc, device=xs.device)])
        total = all_reduce_sum(local, self.process_group)
        count = total[2 * c:]
        mean = total[:c] / count
        var = (total[c:2 * c] / count - mean.square()).clamp_min(0.0)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), count.detach())
        # Folded into one scale and shift per channel, so autograd keeps only x
        # (and per-channel vectors) alive, as the native kernel does.
        mean, var = mean.to(xs.dtype), var.to(xs.dtype)
        scale = torch.rsqrt(var + self.eps)
        shift = -mean * scale
        if self.affine:
            scale = scale * self.weight
            shift = shift * self.weight + self.bias
        out = torch.addcmul(shift.view(1, c, 1, 1), xs, scale.view(1, c, 1, 1))
        return out.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        # With more than one process every one contributes at least one value, so N >= 2.
        unbiased = var * (count / (count - 1).clamp_min(1.0))
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` in ``module`` by a :class:`SyncBatchNorm2d`, in place.

    The new layers take over the old ones' parameters and buffers (the same
    tensors, so an optimiser built before the conversion still works and the
    state dict is unchanged) and their mode. Returns
    ``module``, or the replacement if ``module`` itself is a BN layer.
    """
    replaced: Dict[nn.Module, nn.Module] = {}
    return _swap_batchnorm(module, process_group, replaced)


def _swap_batchnorm(module: nn.Module, process_group, replaced: Dict[nn.Module, nn.Module]) -> nn.Module:
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, SyncBatchNorm2d):
        new = SyncBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats, process_group)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        if module.track_running_stats:
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        replaced[module] = new
        return new
    for name, child in module.named_children():
        new_child = _swap_batchnorm(child, process_group, replaced)
        if new_child is not child:
            module.add_module(name, new_child)
    return module


# ----------------------------------------------------------------------- DDP
class DistributedNVAE(DistributedDataParallel):
    """DDP around an :class:`~nvae.model.network.NVAE` that :func:`~nvae.training.objective.nvae_loss` accepts.

    Calling it runs the forward through DDP (gradients are averaged over the
    processes in backward); the regularisers are computed on the wrapped model,
    from weights and power-iteration vectors that are identical on every process.
    """

    def spectral_loss(self) -> torch.Tensor:
        return self.module.spectral_loss()

    def batchnorm_loss(self) -> torch.Tensor:
        return self.module.batchnorm_loss()


def wrap_model(model: nn.Module, ctx: DistributedContext) -> nn.Module:
    """Synchronise ``model``'s BN and wrap it in :class:`DistributedNVAE`; ``model`` itself for one process.

    ``model`` must already be on ``ctx.device``. DDP broadcasts rank 0's weights
    and buffers at construction, so every process starts from the same model.
    """
    if not ctx.enabled:
        return model
    convert_sync_batchnorm(model)
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedNVAE(model, device_ids=device_ids)
