"""One command for a CUDA machine: training-step time and memory of the paper's GPU presets under
every precision and memory option, then importance-weighted evaluation at K = 1000, as one table.

    python benchmarks/gpu_check.py                       # cifar10 (batch 32), celeba64 (16), celebahq256 (4)
    python benchmarks/gpu_check.py --presets cifar10 --budget-minutes 3

Each row builds the preset's model as ``nvae train`` does (``TrainState.create``: the
official optimiser and the memory options of ``TrainConfig``), takes ``--warmup`` steps,
then times ``--steps`` steps of ``nvae.training.step.train_step`` (forward, objective with KL
balancing and the regularisers, backward, gradient guard, Adamax). ``max alloc`` is
``torch.cuda.max_memory_allocated`` over those steps. The rows: fp32, fp16 (with the
grad scaler) and bf16; then, in bf16, channels-last, recompute-BN, checkpointing of the
post-process cells, all three, and ``nvae train --compile``'s step (``TrainConfig.compile``: the forward pass and
loss as one graph, see ``nvae.speedups.compile``; ``--no-compile`` leaves it out; the first two steps, the eager one
and the compiling one, are a column of their own). The evaluation row folds the K
samples into batches of ``--eval-max-batch`` images.

Any error stops the command with a traceback and exit status 1; so do rows that would
not fit in ``--budget-minutes`` (the default matrix takes about 5 minutes on one H100-class
GPU). ``--device cpu`` runs the same code on the CPU (for tests of the script itself).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import List, NamedTuple, Optional

import torch

from _common import describe_cpu

from nvae import NVAE, PRESETS, NVAEConfig, speedups
from nvae.config import TrainConfig, parse_overrides
from nvae.distributed import DistributedContext
from nvae.training.objective import kl_balance_alpha
from nvae.training.state import TrainState
from nvae.training.step import Coefficients, train_step

#: preset -> per-GPU batch of the official recipe.
PRESET_BATCH = {"cifar10": 32, "celeba64": 16, "celebahq256": 4}


class Option(NamedTuple):
    name: str
    precision: str
    channels_last: bool = False
    recompute_bn: bool = False
    checkpointing: bool = False
    compile: bool = False


OPTIONS = [Option("fp32", "fp32"), Option("fp16", "fp16"), Option("bf16", "bf16"),
           Option("bf16 channels-last", "bf16", channels_last=True),
           Option("bf16 recompute-bn", "bf16", recompute_bn=True),
           Option("bf16 checkpointing post", "bf16", checkpointing=True),
           Option("bf16 channels-last recompute-bn checkpointing", "bf16", True, True, True),
           Option("bf16 compile", "bf16", compile=True)]


class Row(NamedTuple):
    preset: str
    batch: int
    option: str
    s_per_step: float
    max_alloc_gb: Optional[float]
    compile_s: Optional[float] = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch(cfg: NVAEConfig, n: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    if cfg.decoder == "bernoulli":
        return torch.bernoulli(x, generator=g).to(device)
    levels = 2 ** cfg.num_x_bits - 1
    return (torch.round(x * levels) / levels).to(device)


def time_steps(preset: str, cfg: NVAEConfig, batch: int, option: Option, device: torch.device, warmup: int,
               steps: int) -> Row:
    """Median seconds per training step and peak allocated memory for one option."""
    train_cfg = TrainConfig(precision=option.precision, channels_last=option.channels_last,
                            recompute_bn=option.recompute_bn, checkpointing=option.checkpointing,
                            checkpointing_roles=("normal_post", "up_post") if option.checkpointing else None,
                            compile=option.compile)
    torch.manual_seed(0)
    state = TrainState.create(cfg, train_cfg, DistributedContext(device=device))
    x = _batch(cfg, batch, device)
    if option.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    coeffs = Coefficients(0.5, 1e-2, kl_balance_alpha(cfg.groups_per_scale).to(device))
    compile_s = None
    if option.compile:   # the first step runs eagerly (one-time initialisations), the second compiles
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(2):
            train_step(state, x, coeffs, max_grad_norm=float("inf"))
        _sync(device)
        compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        train_step(state, x, coeffs, max_grad_norm=float("inf"))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        out = train_step(state, x, coeffs, max_grad_norm=float("inf"))
        _sync(device)
        times.append(time.perf_counter() - t0)
        if not torch.isfinite(out.loss.loss):
            raise RuntimeError(f"{preset} {option.name}: the loss is not finite ({out.loss.loss.item()})")
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    del state
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Row(preset, batch, option.name, sorted(times)[len(times) // 2], peak, compile_s)


@torch.no_grad()
def eval_speed(cfg: NVAEConfig, device: torch.device, k: int, images: int, max_batch: int, precision: str):
    """Images per second of the importance-weighted bound at K = ``k``, and the mean NLL estimate."""
    torch.manual_seed(0)
    model = speedups.apply(NVAE(cfg)).to(device).eval()
    x = _batch(cfg, images, device)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    _sync(device)
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        nll = -model.log_likelihood(x, num_samples=k, max_batch=max_batch)
    _sync(device)
    return images / (time.perf_counter() - t0), nll.float().mean().item()


def table(rows: List[Row]) -> str:
    lines = ["| preset | batch | options | s/step | max alloc (GB) | compile (s) |", "|---|---|---|---|---|---|"]
    for r in rows:
        mem = "n/a" if r.max_alloc_gb is None else f"{r.max_alloc_gb:.2f}"
        comp = "" if r.compile_s is None else f"{r.compile_s:.0f}"
        lines.append(f"| `{r.preset}` | {r.batch} | {r.option} | {r.s_per_step:.3f} | {mem} | {comp} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--presets", default=",".join(PRESET_BATCH), help="comma-separated presets")
    p.add_argument("--batch", type=int, default=None, help="one batch for every preset (default: the official ones)")
    p.add_argument("--options", default=None,
                   help=f"comma-separated option rows (default all): {', '.join(o.name for o in OPTIONS)}")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile row")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--eval-k", type=int, default=1000)
    p.add_argument("--eval-images", type=int, default=8)
    p.add_argument("--eval-max-batch", type=int, default=1024)
    p.add_argument("--eval-precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--budget-minutes", type=float, default=8.0)
    p.add_argument("--model", action="append", default=[], metavar="KEY=VALUE",
                   help="override an NVAEConfig field of every preset (tests use tiny models)")
    a = p.parse_args(argv)
    unknown = [n for n in a.presets.split(",") if n not in PRESETS]
    if unknown:
        p.error(f"unknown preset(s) {unknown}; see `nvae presets`")
    names = {o.name for o in OPTIONS}
    if a.options is not None and not set(a.options.split(",")) <= names:
        p.error(f"unknown option row(s) {sorted(set(a.options.split(',')) - names)}; choose from {sorted(names)}")
    for name in ("warmup", "steps", "eval_k", "eval_images", "eval_max_batch"):
        if getattr(a, name) < (0 if name == "warmup" else 1):
            p.error(f"--{name.replace('_', '-')} must be {'>= 0' if name == 'warmup' else 'positive'}")
    if a.budget_minutes <= 0:
        p.error("--budget-minutes must be positive")
    a.device = torch.device(a.device)
    if a.device.type == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device here; this check is for a GPU machine (--device cpu runs it on the CPU)")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    overrides = parse_overrides(a.model, NVAEConfig)
    options = [o for o in OPTIONS if (a.options is None or o.name in a.options.split(","))
               and not (o.compile and a.no_compile)]
    where = torch.cuda.get_device_name(a.device) if a.device.type == "cuda" else describe_cpu()
    print(f"# {where}; torch {torch.__version__}; {a.steps} timed steps after {a.warmup}", flush=True)
    deadline = time.perf_counter() + 60 * a.budget_minutes
    rows: List[Row] = []
    for preset in a.presets.split(","):
        cfg = dataclasses.replace(NVAEConfig.preset(preset), **overrides)
        batch = a.batch or PRESET_BATCH.get(preset, 8)
        for option in options:
            if time.perf_counter() > deadline:
                print(table(rows))
                print(f"gpu_check: out of the {a.budget_minutes:g}-minute budget before {preset} {option.name}",
                      file=sys.stderr)
                return 1
            rows.append(time_steps(preset, cfg, batch, option, a.device, a.warmup, a.steps))
            print(f"  {preset} {option.name}: {rows[-1].s_per_step:.3f} s/step", file=sys.stderr, flush=True)
    print(table(rows))
    cfg = dataclasses.replace(NVAEConfig.preset(a.presets.split(",")[0]), **overrides)
    rate, nll = eval_speed(cfg, a.device, a.eval_k, a.eval_images, a.eval_max_batch, a.eval_precision)
    print(f"\nIW evaluation `{a.presets.split(',')[0]}` K={a.eval_k} ({a.eval_precision}, {a.eval_images} images, "
          f"max batch {a.eval_max_batch}): {rate:.2f} images/s (untrained model, NLL {nll:.1f} nats)")
    if time.perf_counter() > deadline:
        print(f"gpu_check: took longer than the {a.budget_minutes:g}-minute budget", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
