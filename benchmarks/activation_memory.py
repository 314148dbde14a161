"""Memory per image, and the batch it allows.

What one training step of each preset keeps for its backward pass, per image, under each memory option in fp32
and under bf16 autocast; the fixed costs of a step (weights, gradients, Adamax's state); and from these the largest
per-GPU batch that fits a 16, 32 or 80 GB card, beside the official recipe's per-GPU batch on its GPUs.

    python benchmarks/activation_memory.py                                  # celebahq256, celeba64, cifar10, mnist
    python benchmarks/activation_memory.py --presets cifar10 --options plain,all --precisions bf16
    python benchmarks/activation_memory.py --policy cuda --precisions fp16  # CUDA's fp16 autocast, no GPU needed
    python benchmarks/activation_memory.py --device cuda                    # + torch.cuda.max_memory_allocated
    python benchmarks/activation_memory.py --presets mnist_small --cpu-check 16,32   # + the CPU peak, measured
    python benchmarks/activation_memory.py --quick                          # the tiny 'digits' model (CI smoke)

**Saved for backward.** The training forward pass and objective (``nvae.training.objective.nvae_loss``, KL
balancing and both regularisers) runs under ``torch.autograd.graph.saved_tensors_hooks``; every tensor autograd
saves is noted, and when the pass returns, the tensors autograd still holds are summed, each underlying storage
once (keyed by its ``data_ptr``; two views of one storage count once), parameters and buffers left out (they are
counted as fixed costs). Per image = bytes(batch 2) - bytes(batch 1): what does not grow with the batch (the
weight-normalised weights, bf16 copies of the weights under autocast, BN statistics) cancels, and is reported as
the fixed part, 2 bytes(1) - bytes(2).

**Fake tensors.** By default the passes run on fake tensors (``torch._subclasses.FakeTensorMode``): the same
Python, the same autograd graph and the same saved tensors with their shapes, dtypes and storages, but no memory
and no arithmetic, so the 256x256 model at batch 2 (about 30 GB in fp32) is counted on a 24 GB machine.
``--tensors real`` counts real tensors instead (the tests check that both agree on a small model; on CPU, BN's
saved batch statistics under bf16 autocast are fp32 on real tensors and bf16 on fake ones: a few kB, not per image).

**Whose autocast.** Autocast keeps other tensors in low precision on a CPU than on a GPU. ``--policy cuda`` counts
on fake CUDA tensors under CUDA's autocast, which is switched on without a GPU (``torch.autocast`` refuses to when
none is present; the switches it sets are set directly): the CUDA kernels' saved tensors and the policy of the
official recipe's fp16 runs (``--precisions fp16``), on a machine without a GPU. The cells' passes (below) are
measured on real CPU tensors either way.

**One cell's pass, and checkpointing.** In backward, the gradients inside a cell, and whatever the cell
recomputes, come on top of the saved tensors that are still held. A checkpointed cell saves only its input in the
forward pass; in backward, when the gradient of its output arrives, it runs again and holds what it saves until its
own backward is done; recompute-BN computes BN and Swish outputs a second time inside a cell's backward. So the
estimate adds to the saved tensors one cell's pass beyond them, the largest over the cells. The script finds the
cells that save the most per image (the option run with checkpointing off, each saved storage given to the cell
that saved it first, the cell's input excluded: it is already held), and for the three largest kinds measures, on
real CPU tensors at batches 1 and 2, the most bytes the cell's forward and backward hold at once
(``peak_allocated``: the profiler's allocation events) minus what it saves and its output (counted already). For a
checkpointed cell the table also shows what it saves with checkpointing off: its recomputation alone would
understate its backward.

**The peak and the batch.** Estimated peak of a step at batch B = fixed + B x per image, with fixed = parameters +
gradients + Adamax's two state tensors per parameter + buffers twice (``train_step`` keeps a copy of every buffer to
undo a skipped step) + the fixed part of the saved tensors (and of the cell's pass). Not in it: the data batch
(under 1 MB per image at 256x256) and Adamax's temporaries (about two parameter-sized tensors, after backward has
freed the activations). The activation gradients alive in backward replace saved tensors that backward has already
freed; checked against the measured peak of the whole forward and backward pass on real CPU tensors
(``--cpu-check``: ``mnist_small`` at batches 16 and 32), the estimate is within 10% above to 1% below it for every
option (benchmarks/README.md). A card of M GB lends ``(M - reserve) x (1 - fragmentation)`` to this peak:
``--reserve-gb`` (default 1.5) for the CUDA context, cuDNN and cuBLAS workspaces and what the driver keeps,
``--fragmentation`` (default 0.1) for the caching allocator's unused blocks. GB here is 2^30 bytes.

**On a GPU** (``--device cuda``) each row also takes real training steps (``TrainState.create`` and
``nvae.training.step.train_step``, as ``nvae train`` runs them) at two batch sizes (``--cuda-batches``, default 1,2)
and prints ``torch.cuda.max_memory_allocated`` of the second step at each beside the estimate for that batch.
``--tensors real`` there counts the saved tensors on the GPU itself (CUDA's autocast policy); the cells' passes are
measured on the CPU either way.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import os
import sys
import time
import weakref
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

os.environ.setdefault("KINETO_LOG_LEVEL", "6")   # quiet: no profiler start/stop lines (set before torch loads)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode, is_fake  # noqa: E402

from _common import describe_cpu, peak_rss_gb  # noqa: E402

from nvae import NVAE, PRESETS, NVAEConfig, speedups  # noqa: E402
from nvae.config import parse_overrides  # noqa: E402
from nvae.model.cells import Cell  # noqa: E402
from nvae.training.objective import kl_balance_alpha, nvae_loss  # noqa: E402
from nvae.training.run_dir import write_json  # noqa: E402

GB = 2 ** 30
MB = 2 ** 20

DEFAULT_PRESETS = ("celebahq256", "celeba64", "cifar10", "mnist")

#: preset -> (per-GPU batch, GB per GPU) of the official recipe (NVAE.md section 5; the official README's GPUs:
#: 16 GB V100s for MNIST, CIFAR-10, CelebA 64 and ImageNet 32, 32 GB V100s for the 256x256 sets).
OFFICIAL = {"mnist": (200, 16), "cifar10": (32, 16), "celeba64": (16, 16), "imagenet32": (24, 16),
            "celebahq256": (4, 32), "ffhq256": (4, 32)}

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# What a card keeps from a training step's tensors: a fixed reserve for the CUDA context (about 0.5 GB), cuDNN and
# cuBLAS handles and workspaces, and the part of the nominal size the driver does not hand out (a "16 GB" V100
# reports 15.8 GiB); then a fraction of the rest for the caching allocator's fragmentation (blocks cached but too
# small or split for the next request). Both are guesses on the safe side, printed with every table.
RESERVE_GB = 1.5
FRAGMENTATION = 0.1


class Option(NamedTuple):
    """A memory option as ``nvae train`` takes it (``TrainConfig``'s fields of the same names)."""

    name: str
    channels_last: bool = False
    recompute_bn: bool = False
    checkpointing: bool = False     #: every cell recomputed in backward

    def without_checkpointing(self) -> "Option":
        return self._replace(name=f"{self.name} (no checkpointing)", checkpointing=False)


OPTIONS = {o.name: o for o in [
    Option("plain"), Option("channels-last", channels_last=True), Option("recompute-bn", recompute_bn=True),
    Option("checkpointing", checkpointing=True), Option("all", True, True, True)]}


# ----------------------------------------------------------------------------- counting saved tensors
def storage_key(t: torch.Tensor) -> int:
    """What identifies the memory under ``t``: its storage's ``data_ptr`` (the storage object's address for a
    fake tensor, which has no data)."""
    storage = t.untyped_storage()
    return storage._cdata if is_fake(t) else storage.data_ptr()


class Saved(NamedTuple):
    total: int                  #: bytes autograd holds for backward, each storage once
    by_cell: Dict[str, int]     #: bytes of the storages each cell saved first (the cell's input excluded)
    inputs: Dict[str, Tuple[tuple, torch.dtype, bool]]  #: each cell's input: shape, dtype, channels-last


class _Held:
    """One tensor as autograd saved it (a saved-tensor hook's packed value)."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


def saved_for_backward(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = (),
                       cells: Optional[Dict[str, nn.Module]] = None) -> Saved:
    """Bytes of the tensors autograd saves for backward while ``fn()`` runs and still holds when it returns.

    Each storage is counted once, however many saved tensors view it; the storages of ``exclude`` (parameters,
    buffers) not at all. A tensor saved by a graph that was dropped before ``fn`` returned is not counted.
    ``cells`` (name -> module): also the bytes of the storages each of them saved first while running (nested
    cells go to the outermost), its input's storage excluded, and the shape, dtype and layout of its input.
    """
    excluded = {storage_key(t) for t in exclude}
    noted: List[Tuple[weakref.ref, int, int, Optional[str]]] = []
    running: List[Optional[str]] = [None]
    cell_inputs: Dict[str, set] = {}
    inputs: Dict[str, Tuple[tuple, torch.dtype, bool]] = {}

    def pack(t: torch.Tensor) -> _Held:
        held = _Held(t)     # autograd keeps this object, and only autograd: while it lives, t is saved
        noted.append((weakref.ref(held), storage_key(t), t.untyped_storage().nbytes(), running[-1]))
        return held

    handles = []
    for name, cell in (cells or {}).items():
        def enter(module, args, name=name):
            if running[-1] is None:
                cell_inputs.setdefault(name, set()).update(storage_key(a) for a in args if torch.is_tensor(a))
                x = args[0]
                inputs[name] = (tuple(x.shape), x.dtype, x.dim() == 4 and not x.is_contiguous()
                                and x.is_contiguous(memory_format=torch.channels_last))
                running.append(name)
            else:
                running.append(running[-1])

        def leave(*_) -> None:     # (a forward hook's return value would replace the cell's output)
            running.pop()

        handles.append(cell.register_forward_pre_hook(enter))
        handles.append(cell.register_forward_hook(leave))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda held: held.tensor):
            result = fn()   # noqa: F841  (holds the graph while the saved tensors are summed)
    finally:
        for h in handles:
            h.remove()
    alive: Dict[int, Tuple[int, Optional[str]]] = {}
    for ref, key, nbytes, cell in noted:
        if ref() is not None and key not in excluded and key not in alive:
            alive[key] = (nbytes, cell)
    by_cell: Dict[str, int] = {}
    for key, (nbytes, cell) in alive.items():
        if cell is not None and key not in cell_inputs.get(cell, ()):
            by_cell[cell] = by_cell.get(cell, 0) + nbytes
    return Saved(sum(n for n, _ in alive.values()), by_cell, inputs)


# ----------------------------------------------------------------------------- a model and a batch
def to_channels_last(model: nn.Module) -> nn.Module:
    """What ``model.to(memory_format=torch.channels_last)`` does (every 4-d parameter and buffer in that layout),
    also for fake tensors, which ``Module.to`` cannot swap."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.dim() == 4:
            t.data = t.data.contiguous(memory_format=torch.channels_last)
    return model


@contextlib.contextmanager
def autocast(device_type: str, dtype: Optional[torch.dtype]):
    """``torch.autocast(device_type, dtype)`` (nothing for ``dtype=None``); CUDA's also where no GPU is present, for
    fake CUDA tensors: ``torch.autocast`` would switch itself off with a warning, so its switches are set here."""
    if dtype is None:
        yield
    elif device_type != "cuda" or torch.cuda.is_available():
        with torch.autocast(device_type, dtype=dtype):
            yield
    else:
        enabled, previous = torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
        torch.set_autocast_enabled(device_type, True)
        torch.set_autocast_dtype(device_type, dtype)
        torch.autocast_increment_nesting()
        try:
            yield
        finally:
            if torch.autocast_decrement_nesting() == 0:
                torch.clear_autocast_cache()
            torch.set_autocast_enabled(device_type, enabled)
            torch.set_autocast_dtype(device_type, previous)


def build(cfg: NVAEConfig, option: Option, batch: int, device: torch.device = torch.device("cpu")):
    """``(model in training mode with the option's speed-ups, a batch of images, KL-balance alpha)`` as training
    builds them (``TrainState.create``), on ``device``, under whatever fake mode is active."""
    torch.manual_seed(0)
    with device:
        model = NVAE(cfg)
    if device.type != "cpu" and is_fake(next(model.parameters())):
        # The first-call flags (spectral `initialized`, data-init `init_done`) are read as Python bools; a fake
        # scalar on another device has no value to read, a fake CPU scalar keeps the one it was made with (False).
        for m in model.modules():
            for name, b in m._buffers.items():
                if b is not None and b.dim() == 0:
                    m._buffers[name] = torch.tensor(0, dtype=b.dtype, device="cpu")   # (made from data: tracked)
    if option.channels_last:
        to_channels_last(model)
    speedups.apply(model, recompute_bn=option.recompute_bn, checkpointing=option.checkpointing)
    model.train()
    x = make_batch(cfg, batch, option.channels_last).to(device)
    return model, x, kl_balance_alpha(cfg.groups_per_scale).to(device)


def make_batch(cfg: NVAEConfig, batch: int, channels_last: bool) -> torch.Tensor:
    """Random images as the data loader gives them (binarised or quantised), in the training loop's layout."""
    x = torch.rand(batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    levels = 2 ** cfg.num_x_bits - 1
    x = torch.bernoulli(x) if cfg.decoder == "bernoulli" else torch.round(x * levels) / levels
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def measure(cfg: NVAEConfig, option: Option, precision: str, batch: int, fake: bool = True,
            device: torch.device = torch.device("cpu"), per_cell: bool = False) -> Saved:
    """:func:`saved_for_backward` of one training forward pass and objective at ``batch``, on fake tensors (no
    memory) or real ones on ``device``."""
    with FakeTensorMode() if fake else contextlib.nullcontext():
        saved = _count(cfg, option, precision, batch, device, per_cell)
    if not fake:
        gc.collect()    # (a node that saved its own output through the hooks is in a reference cycle with it)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return saved


def _count(cfg: NVAEConfig, option: Option, precision: str, batch: int, device: torch.device, per_cell: bool) -> Saved:
    model, x, alpha = build(cfg, option, batch, device)
    dtype = PRECISIONS[precision]

    def step():
        with autocast(device.type, dtype):
            return nvae_loss(model, x, beta=0.5, lam=1e-2, alpha=alpha)

    cells = {name: m for name, m in model.named_modules() if isinstance(m, Cell)} if per_cell else None
    return saved_for_backward(step, list(model.parameters()) + list(model.buffers()), cells)


# ----------------------------------------------------------------------------- one cell's pass, measured
def peak_allocated(fn: Callable[[], object]) -> int:
    """The most bytes of CPU tensor memory allocated at once while ``fn()`` runs, above what was allocated before
    it (the profiler's allocation events, summed in time order; what ``torch.cuda.max_memory_allocated`` measures on
    a GPU). Frees of memory allocated before ``fn`` are not seen, so anything ``fn`` frees of that counts as held."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
                     and e.device_type() == torch._C._autograd.DeviceType.CPU), key=lambda e: e.start_ns())
    held = peak = 0
    for e in events:
        held += e.nbytes()
        peak = max(peak, held)
    return peak


def cells_beyond_saved(cfg: NVAEConfig, option: Option, precision: str,
                       cells: Dict[str, Tuple[tuple, torch.dtype, bool]], batches: Sequence[int] = (1, 2)
                       ) -> Dict[str, List[int]]:
    """Per cell (name -> its input's shape, dtype and layout) and batch: the most bytes its forward and backward pass
    hold at once beyond what the whole-model count already has of it (the tensors it saves for backward, and its
    output), on real CPU tensors (:func:`peak_allocated`). That is the gradients inside the cell, its input's
    gradient, the arriving gradient, and whatever it recomputes in backward: the whole cell when checkpointed, BN
    and Swish outputs with recompute-BN."""
    model, _, _ = build(cfg, option, 1)
    modules = dict(model.named_modules())
    exclude = list(model.parameters()) + list(model.buffers())
    return {name: [_beyond_saved(modules[name], (b,) + tuple(shape[1:]), dtype, channels_last,
                                 PRECISIONS[precision], exclude) for b in batches]
            for name, (shape, dtype, channels_last) in cells.items()}


def _beyond_saved(cell: nn.Module, shape: tuple, dtype: torch.dtype, channels_last: bool,
                  autocast_dtype: Optional[torch.dtype], exclude: List[torch.Tensor]) -> int:
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    x.requires_grad_(True)
    kept: List[torch.Tensor] = []
    saved: List[Saved] = []

    def forward_and_backward():
        with autocast("cpu", autocast_dtype):
            saved.append(saved_for_backward(lambda: kept.append(cell(x)), exclude + [x]))
        y = kept[0]
        y.backward(torch.randn_like(y))

    peak = peak_allocated(forward_and_backward)
    return max(peak - saved[0].total - kept[0].untyped_storage().nbytes(), 0)


def step_peak(cfg: NVAEConfig, option: Option, precision: str, batch: int) -> int:
    """:func:`peak_allocated` of a whole training forward pass, objective and backward on real CPU tensors (a fresh
    model: its weights exist before, their gradients are allocated inside): the check of the estimate."""
    model, x, alpha = build(cfg, option, batch)
    dtype = PRECISIONS[precision]

    def step():
        with autocast("cpu", dtype):
            loss = nvae_loss(model, x, beta=0.5, lam=1e-2, alpha=alpha).loss
        loss.backward()

    return peak_allocated(step)


# ----------------------------------------------------------------------------- fixed costs
class Fixed(NamedTuple):
    parameters: int     #: count
    weights: int        #: bytes (fp32)
    gradients: int
    adamax: int         #: exp_avg and exp_inf (the step counters live on the CPU)
    buffers: int        #: BN statistics, power-iteration vectors; twice (train_step's copy)

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.adamax + self.buffers


def fixed_costs(cfg: NVAEConfig) -> Fixed:
    """What a step holds whatever the batch, before any activation."""
    with FakeTensorMode():
        model = NVAE(cfg)
        params = list(model.parameters())
        size = sum(p.numel() * p.element_size() for p in params)
        grads = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
        buffers = sum(b.numel() * b.element_size() for b in model.buffers())
        return Fixed(sum(p.numel() for p in params), size, grads, 2 * grads, 2 * buffers)


# ----------------------------------------------------------------------------- per image
class Row(NamedTuple):
    preset: str
    option: str
    precision: str
    saved: Tuple[int, int]          #: saved bytes at batches 1 and 2
    cell_saved: Tuple[int, int]     #: what ``cell`` saves at batches 1 and 2 with checkpointing off
    cell_extra: Tuple[int, int]     #: what ``cell`` holds beyond the saved tensors at batches 1 and 2, measured
    cell: str                       #: the cell that needs the most beyond the saved tensors, of those measured
    fixed: Fixed                    #: weights, gradients, Adamax, buffers

    @property
    def saved_per_image(self) -> int:
        return self.saved[1] - self.saved[0]

    @property
    def cell_per_image(self) -> int:
        return self.cell_extra[1] - self.cell_extra[0]

    @property
    def per_image(self) -> int:
        """Estimated bytes per image at the peak: the saved tensors, and one cell's forward and backward."""
        return self.saved_per_image + self.cell_per_image

    @property
    def fixed_total(self) -> int:
        """Estimated bytes of the peak that do not grow with the batch."""
        return (self.fixed.total + max(2 * self.saved[0] - self.saved[1], 0)
                + max(2 * self.cell_extra[0] - self.cell_extra[1], 0))

    def peak(self, batch: int) -> int:
        """Estimated peak bytes of a training step at ``batch``."""
        return self.fixed_total + batch * self.per_image


#: How many of the cells that save the most (one of each kind) are measured.
PROBED_CELLS = 3


def measure_row(preset: str, cfg: NVAEConfig, option: Option, precision: str, fixed: Fixed, fake: bool,
                device: torch.device, cache: Dict[tuple, Tuple[Saved, Saved]]) -> Row:
    """Saved bytes at batches 1 and 2 of ``option``; the saved bytes per cell of the option without checkpointing;
    and what the cells that save the most hold beyond that, measured."""

    def both(opt: Option) -> Tuple[Saved, Saved]:
        key = (preset, opt.channels_last, opt.recompute_bn, opt.checkpointing, precision)
        if key not in cache:
            cache[key] = tuple(measure(cfg, opt, precision, b, fake, device, per_cell=not opt.checkpointing)
                               for b in (1, 2))
        return cache[key]

    one, two = both(option)
    c1, c2 = both(option.without_checkpointing()) if option.checkpointing else (one, two)
    growth = {c: c2.by_cell[c] - c1.by_cell.get(c, 0) for c in c2.by_cell}
    kinds: Dict[tuple, str] = {}      # one cell of each kind (place, input, bytes), those that save the most first
    for c in sorted(growth, key=growth.get, reverse=True):
        kinds.setdefault((c.split(".")[0], c2.inputs[c], growth[c]), c)
    extra = cells_beyond_saved(cfg, option, precision, {c: c2.inputs[c] for c in list(kinds.values())[:PROBED_CELLS]})
    cell = max(extra, key=lambda c: (extra[c][1] - extra[c][0], extra[c][1]))
    return Row(preset, option.name, precision, (one.total, two.total), (c1.by_cell.get(cell, 0), c2.by_cell[cell]),
               tuple(extra[cell]), cell, fixed)


# ----------------------------------------------------------------------------- the batch that fits
def usable_bytes(memory_gb: float, reserve_gb: float, fragmentation: float) -> float:
    """What a card of ``memory_gb`` lends to a step's tensors: ``(memory - reserve) x (1 - fragmentation)``."""
    return max(memory_gb - reserve_gb, 0.0) * (1.0 - fragmentation) * GB


def largest_batch(row: Row, memory_gb: float, reserve_gb: float, fragmentation: float) -> int:
    """The largest batch whose estimated peak fits ``memory_gb`` (0: not even one image)."""
    room = usable_bytes(memory_gb, reserve_gb, fragmentation) - row.fixed_total
    return max(int(room // row.per_image), 0) if row.per_image > 0 else 0


# ----------------------------------------------------------------------------- measured on a GPU
def cuda_peaks(cfg: NVAEConfig, option: Option, precision: str, batches: Sequence[int],
               device: torch.device = torch.device("cuda")) -> List[Optional[int]]:
    """``torch.cuda.max_memory_allocated`` (bytes; None: out of memory) of a training step at each batch, as
    ``nvae train`` takes it: the second step of a fresh model (the first creates Adamax's state)."""
    from nvae.config import TrainConfig
    from nvae.distributed import DistributedContext
    from nvae.training.state import TrainState
    from nvae.training.step import Coefficients, train_step

    train_cfg = TrainConfig(precision=precision, channels_last=option.channels_last,
                            recompute_bn=option.recompute_bn, checkpointing=option.checkpointing)
    coeffs = Coefficients(0.5, 1e-2, kl_balance_alpha(cfg.groups_per_scale).to(device))
    peaks: List[Optional[int]] = []
    for batch in batches:
        torch.manual_seed(0)
        state = x = None
        try:
            state = TrainState.create(cfg, train_cfg, DistributedContext(device=device))
            x = make_batch(cfg, batch, option.channels_last).to(device)
            train_step(state, x, coeffs, max_grad_norm=float("inf"))
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            train_step(state, x, coeffs, max_grad_norm=float("inf"))
            torch.cuda.synchronize(device)
            peaks.append(torch.cuda.max_memory_allocated(device))
        except torch.cuda.OutOfMemoryError:
            peaks.append(None)
        del state, x
        gc.collect()
        torch.cuda.empty_cache()
    return peaks


# ----------------------------------------------------------------------------- tables
def fixed_table(fixed: Dict[str, Fixed]) -> str:
    lines = ["| preset | parameters | weights | gradients | Adamax state | buffers x2 | total |",
             "|---|---|---|---|---|---|---|"]
    for preset, f in fixed.items():
        lines.append(f"| `{preset}` | {f.parameters / 1e6:.2f}M | {f.weights / MB:.0f} MB | {f.gradients / MB:.0f} MB "
                     f"| {f.adamax / MB:.0f} MB | {f.buffers / MB:.1f} MB | {f.total / GB:.2f} GB |")
    return "\n".join(lines)


def _gb(value: Optional[float]) -> str:
    return "OOM" if value is None else f"{value / GB:.2f}"


def _mb(value: Optional[float]) -> str:
    return "OOM" if value is None else f"{value / MB:.0f}"


def per_image_table(rows: List[Row], checks: Dict[str, tuple]) -> str:
    """``checks``: title -> (batches, row key -> measured bytes per batch, (row, batch) -> the estimate beside,
    the format of a number of bytes)."""
    head = ("| preset | option | precision | saved MB/image | one cell's pass beyond that, MB/image | "
            "est. MB/image | est. fixed GB |")
    rule = "|---|---|---|---|---|---|---|"
    for title, (batches, *_) in checks.items():
        head += "".join(f" B={b}: {title} (est.) |" for b in batches)
        rule += "---|" * len(batches)
    lines = [head, rule]
    for r in rows:
        checkpointed = r.option in OPTIONS and OPTIONS[r.option].checkpointing
        its = f"(its saved: {(r.cell_saved[1] - r.cell_saved[0]) / MB:.1f}) " if checkpointed else ""
        line = (f"| `{r.preset}` | {r.option} | {r.precision} | {r.saved_per_image / MB:.1f} | "
                f"{r.cell_per_image / MB:.1f} {its}`{r.cell}` | {r.per_image / MB:.1f} | {r.fixed_total / GB:.2f} |")
        for batches, values, estimate, fmt in checks.values():
            got = values.get((r.preset, r.option, r.precision), [])
            line += "".join(f" {fmt(v)} ({fmt(estimate(r, b))}) |" for b, v in zip(batches, got))
        lines.append(line)
    return "\n".join(lines)


def batch_table(rows: List[Row], memories: Sequence[float], reserve_gb: float, fragmentation: float) -> str:
    head = "| preset | option | precision | " + " | ".join(f"{m:g} GB" for m in memories) + \
        " | official per GPU | ours / official |"
    lines = [head, "|---|---|---|" + "---|" * len(memories) + "---|---|"]
    for r in rows:
        fits = [largest_batch(r, m, reserve_gb, fragmentation) for m in memories]
        official = OFFICIAL.get(r.preset)
        if official:
            ours = largest_batch(r, official[1], reserve_gb, fragmentation)
            ref, ratio = f"{official[0]} in {official[1]} GB", f"{ours / official[0]:.2f}x"
        else:
            ref = ratio = "n/a"
        lines.append(f"| `{r.preset}` | {r.option} | {r.precision} | " + " | ".join(map(str, fits)) +
                     f" | {ref} | {ratio} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line
def _names(text: str, known: Iterable[str], what: str, p: argparse.ArgumentParser) -> List[str]:
    known = list(known)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        p.error(f"unknown {what} {unknown or text!r}; choose from {', '.join(known)}")
    return names


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default=",".join(DEFAULT_PRESETS), help="comma-separated presets")
    p.add_argument("--options", default=",".join(OPTIONS), help=f"comma-separated: {', '.join(OPTIONS)}")
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16 (autocast)")
    p.add_argument("--policy", choices=["cpu", "cuda"], default="cpu",
                   help="whose kernels and autocast policy the fake tensors follow: cpu, or cuda (fake CUDA tensors "
                        "under CUDA's autocast, without a GPU: the official recipe's fp16)")
    p.add_argument("--tensors", choices=["fake", "real"], default="fake",
                   help="count saved tensors on fake tensors on the CPU (no memory; the default) or on real ones "
                        "on --device")
    p.add_argument("--memories", default="16,32,80", help="card sizes in GB for the batch table")
    p.add_argument("--reserve-gb", type=float, default=RESERVE_GB,
                   help="GB of each card kept for the CUDA context, library workspaces and the driver")
    p.add_argument("--fragmentation", type=float, default=FRAGMENTATION,
                   help="fraction of the rest left to the caching allocator's unused blocks")
    p.add_argument("--model", action="append", default=[], metavar="KEY=VALUE",
                   help="override an NVAEConfig field of every preset (tests use tiny models)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: also measure torch.cuda.max_memory_allocated of real training steps")
    p.add_argument("--cuda-batches", default="1,2", help="the batch sizes measured on the GPU")
    p.add_argument("--cpu-check", default=None, metavar="B,B",
                   help="also measure the whole forward and backward pass's peak on real CPU tensors at these "
                        "batches (small presets: it needs the memory), beside the estimate without the weights, "
                        "Adamax's state and the buffers, which exist before it")
    p.add_argument("--json", default=None, help="also write every figure to this JSON file")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: the tiny 'digits' preset, options plain and all")
    a = p.parse_args(argv)
    if a.quick:
        a.presets, a.options = "digits", "plain,all"
    a.presets = _names(a.presets, sorted(PRESETS), "preset(s)", p)
    a.options = _names(a.options, OPTIONS, "option(s)", p)
    a.precisions = _names(a.precisions, PRECISIONS, "precision(s)", p)
    try:
        a.memories = [float(m) for m in a.memories.split(",")]
        a.cuda_batches = [int(b) for b in a.cuda_batches.split(",")]
        a.cpu_check = [int(b) for b in a.cpu_check.split(",")] if a.cpu_check else []
    except ValueError:
        p.error("--memories, --cuda-batches and --cpu-check take comma-separated numbers")
    if not all(m > 0 for m in a.memories) or not all(b > 0 for b in a.cuda_batches + a.cpu_check):
        p.error("--memories, --cuda-batches and --cpu-check must be positive")
    if not 0 <= a.fragmentation < 1 or a.reserve_gb < 0:
        p.error("--fragmentation must be in [0, 1) and --reserve-gb >= 0")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device here (--device cpu gives the estimates alone)")
    if a.policy == "cuda" and a.tensors == "real" and a.device == "cpu":
        p.error("--policy cuda counts fake CUDA tensors; with --tensors real it needs --device cuda")
    return a


def _in_step(row: Row, batch: int) -> int:
    """The estimate of what :func:`step_peak` measures: the peak less the weights, Adamax's state and the buffers."""
    return row.peak(batch) - row.fixed.weights - row.fixed.adamax - row.fixed.buffers


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    overrides = parse_overrides(a.model, NVAEConfig)
    fake = a.tensors == "fake"
    count_on = torch.device(a.policy) if fake else torch.device(a.device)
    gpu = f"; GPU {torch.cuda.get_device_name()}" if a.device == "cuda" else ""
    print(f"# {describe_cpu()}{gpu}; saved tensors counted on {a.tensors} {count_on.type} tensors", flush=True)
    t0 = time.perf_counter()
    rows: List[Row] = []
    fixed: Dict[str, Fixed] = {}
    measured: Dict[tuple, List[Optional[int]]] = {}
    checked: Dict[tuple, List[int]] = {}
    for preset in a.presets:
        cfg = dataclasses.replace(NVAEConfig.preset(preset), **overrides)
        fixed[preset] = fixed_costs(cfg)
        cache: Dict[tuple, Tuple[Saved, Saved]] = {}
        for precision in a.precisions:
            for name in a.options:
                row = measure_row(preset, cfg, OPTIONS[name], precision, fixed[preset], fake, count_on, cache)
                rows.append(row)
                note = ""
                if a.device == "cuda":
                    peaks = measured[(preset, name, precision)] = cuda_peaks(cfg, OPTIONS[name], precision,
                                                                             a.cuda_batches)
                    note = "; CUDA max alloc " + ", ".join(f"B={b} {_gb(p)} GB (est. {row.peak(b) / GB:.2f})"
                                                           for b, p in zip(a.cuda_batches, peaks))
                if a.cpu_check:
                    peaks = checked[(preset, name, precision)] = [step_peak(cfg, OPTIONS[name], precision, b)
                                                                  for b in a.cpu_check]
                    note += "; CPU peak " + ", ".join(f"B={b} {_mb(p)} MB (est. {_mb(_in_step(row, b))})"
                                                      for b, p in zip(a.cpu_check, peaks))
                # a line per row as it comes (stderr), so a run cut short still shows what it measured
                print(f"#   {preset} {name} {precision}: saved {row.saved_per_image / MB:.1f} MB/image + one cell "
                      f"{row.cell_per_image / MB:.1f} ({row.cell}), est. fixed {row.fixed_total / GB:.2f} GB{note} "
                      f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    print("\nFixed costs of a step (fp32 weights and gradients; Adamax keeps exp_avg and exp_inf per parameter; "
          "train_step keeps a copy of every buffer):\n")
    print(fixed_table(fixed))
    print("\nPer image = saved bytes(batch 2) - saved bytes(batch 1): tensors autograd holds for backward when the "
          "forward pass and objective return, each storage once, parameters and buffers left out. Then one cell's "
          "pass beyond that (real CPU tensors, profiler; the largest of the three kinds of cell that save the most): "
          "the gradients inside it and whatever it recomputes in backward (the whole cell when checkpointed: its "
          "saved tensors with checkpointing off shown beside). est. fixed = the table above + what does not grow with "
          "the batch (weight-normalised weights, bf16 copies of the weights).\n")
    checks = {}
    if measured:
        checks["CUDA max alloc GB"] = (a.cuda_batches, measured, Row.peak, _gb)
    if checked:
        checks["CPU peak of forward and backward, MB"] = (a.cpu_check, checked, _in_step, _mb)
    print(per_image_table(rows, checks))
    print(f"\nLargest per-GPU batch whose estimated peak (est. fixed + B x est. per image) fits a card of M GB, which "
          f"lends (M - {a.reserve_gb:g} GB reserved for the CUDA context and workspaces) x (1 - {a.fragmentation:g} "
          "left to allocator fragmentation). The official runs used fp16 mixed precision: the bf16 rows, and the "
          "fp16 rows under --policy cuda, are the like-for-like comparison.\n")
    print(batch_table(rows, a.memories, a.reserve_gb, a.fragmentation))
    hq = [r for r in rows if r.preset == "celebahq256"]
    if hq:
        official_batch, official_gb = OFFICIAL["celebahq256"]
        best = max(hq, key=lambda r: largest_batch(r, official_gb, a.reserve_gb, a.fragmentation))
        ours = largest_batch(best, official_gb, a.reserve_gb, a.fragmentation)
        print(f"\ncelebahq256 in {official_gb} GB: {ours} images per GPU ({best.option}, {best.precision}), "
              f"{ours / official_batch:.2f}x the official {official_batch}.")
    print(f"\n# {time.perf_counter() - t0:.0f} s; peak RSS {peak_rss_gb():.2f} GB")
    if a.json:
        write_json(a.json, {
            "machine": describe_cpu() + gpu, "tensors": a.tensors, "policy": a.policy, "reserve_gb": a.reserve_gb,
            "fragmentation": a.fragmentation, "cuda_batches": a.cuda_batches, "cpu_check": a.cpu_check,
            "fixed": {k: v._asdict() for k, v in fixed.items()},
            "rows": [dict(r._asdict(), fixed=r.fixed._asdict(), per_image=r.per_image, fixed_total=r.fixed_total,
                          cuda_max_alloc=measured.get((r.preset, r.option, r.precision)),
                          cpu_peak=checked.get((r.preset, r.option, r.precision))) for r in rows]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
