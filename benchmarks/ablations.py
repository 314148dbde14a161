"""The paper's ablations on one small model, one data set and one budget per row, beside the paper's numbers.

    OMP_NUM_THREADS=1 python benchmarks/ablations.py --data ../shared/data --tables 2,3,5 \\
        --minutes-per-run 2 --out benchmarks/results/ablations.md

Tables (paper numbers: CIFAR-10 bits/dim, Tables 1-5 of the paper; "n/a" where our reference has none):

  2  normalisation and activation of the cells (WN + ELU, BN + ELU, BN + Swish: arch_instance res_elu,
     res_bnelu, res_bnswish) at each of --depths (num_groups_per_scale)
  3  regular or separable cells in encoder x decoder (res_bnswish, res_mbconv, mbconv_res, mbconv_sep):
     test NLL, time per step, peak training memory
  4  residual Normal posterior on / off (res_dist)          [not run unless asked for]
  5  spectral regularisation (SR) and squeeze-and-excitation (SE) on / off
  kl KL balancing on / off                                   [not run unless asked for]

Every row (a "variant") trains in a fresh subprocess with ``nvae.training.loop.train``: the same model (``--preset``,
``--model`` overrides), the same data (the first ``--train-images`` training images, ``--test-images``
evenly spaced test images, binarised once with a fixed seed for MNIST) and the same budget. Before training,
each subprocess times a few training steps and measures their peak memory (CPU: peak RSS above the RSS before
the model was built; CUDA: peak allocated). With ``--minutes-per-run`` alone, the schedules (LR warm-up and
cosine, KL warm-up) are laid over the number of epochs that variant is expected to reach in the budget, and
training stops at the budget. On CPU the budget is CPU time (``--budget cpu``): a variant gets the steps its
timed steps say it takes in that many minutes on a core of its own, so other jobs on a shared machine do not
change how far it trains; elsewhere (``--budget wall``) training stops at that wall-clock time. With
``--epochs`` the schedules follow that fixed number of epochs (the paper's way).
"Without SR" sets ``weight_decay_norm = 0``, which, as in the official code, drops both the spectral and the
BN regulariser. Test NLL: importance-weighted bound with K = ``--num-samples``.

Rows are deduplicated across tables (Table 3's residual/residual row is Table 2's BN + Swish at the same
depth). ``--json`` (default: ``results.json`` in ``--work-dir``) receives every row's raw result as it
finishes; ``--resume`` reuses the rows of that JSON that were produced under the same settings, so an
interrupted run continues where it stopped and a finished one can be re-rendered without training.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

# The paper's numbers (its Tables 1-5): CIFAR-10, bits/dim, lower is better.
# Anything not listed prints as "n/a"; never fill in a number from memory.
PAPER_SOURCE = "Vahdat & Kautz 2020, Tables 1-5 (CIFAR-10, bits/dim)"
PAPER_TABLE2 = {("WN + ELU", 40): 3.31, ("BN + Swish", 40): 3.16}
PAPER_TABLE2_DEPTHS = (10, 20, 40)
PAPER_TABLE5 = {"SR + SE": 3.16, "without SR": 3.18, "without SE": 3.22}

TABLE2_CELLS = (("WN + ELU", "res_elu"), ("BN + ELU", "res_bnelu"), ("BN + Swish", "res_bnswish"))
TABLE3_CELLS = (("regular", "regular", "res_bnswish"), ("regular", "separable", "res_mbconv"),
                ("separable", "regular", "mbconv_res"), ("separable", "separable", "mbconv_sep"))
TABLES = ("2", "3", "4", "5", "kl")

#: Small CPU bases: an NVAEConfig preset plus overrides (num_groups_per_scale is set by each row).
BASES = {
    "cpu_mnist": ("mnist_small", dict(num_channels_enc=8, num_channels_dec=8, num_preprocess_blocks=1,
                                      num_preprocess_cells=2, num_postprocess_blocks=1, num_postprocess_cells=2,
                                      num_cell_per_cond_enc=1, num_cell_per_cond_dec=1)),
    "cpu_cifar10": ("cifar10", dict(num_channels_enc=8, num_channels_dec=8, num_latent_scales=2, ada_groups=True,
                                    num_cell_per_cond_enc=1, num_cell_per_cond_dec=1, num_nf=0)),
}
SHAPES = {"mnist": (1, 32, 32), "cifar10": (3, 32, 32)}


@dataclass(frozen=True)
class Variant:
    """One row: a cell table, a depth and the ablation switches."""

    arch: str = "res_mbconv"
    groups: int = 4             #: num_groups_per_scale
    use_se: bool = True
    spectral: bool = True       #: SR and BN regularisation (weight_decay_norm > 0)
    res_dist: bool = True
    kl_balance: bool = True

    @property
    def key(self) -> str:
        off = [name for name, on in (("SE", self.use_se), ("SR", self.spectral), ("resdist", self.res_dist),
                                     ("klbal", self.kl_balance)) if not on]
        return "-".join([self.arch, f"g{self.groups}"] + [f"no{name}" for name in off])


@dataclass(frozen=True)
class Settings:
    """What every row shares."""

    dataset: str = "mnist"
    data: Optional[str] = None
    preset: str = "cpu_mnist"
    model: Tuple[Tuple[str, object], ...] = ()
    batch_size: int = 32
    train_images: Optional[int] = 2048
    test_images: Optional[int] = 256
    num_samples: int = 20
    minutes: Optional[float] = 2.0
    budget: str = "cpu"           #: "cpu": minutes of CPU time (steps fixed by the probe); "wall": wall-clock
    epochs: Optional[int] = None
    warmup_epochs: int = 1
    max_steps: Optional[int] = None
    device: str = "cpu"
    threads: int = 1
    channels_last: bool = True
    precision: str = "fp32"
    seed: int = 1
    probe_steps: int = 6


# ----------------------------------------------------------------------------- planning
def plan(tables: List[str], depths: List[int], groups: int) -> Dict[str, List[Tuple[tuple, Variant]]]:
    """Rows of each requested table: (labels, variant)."""
    base = Variant("res_mbconv", groups)
    out: Dict[str, List[Tuple[tuple, Variant]]] = {}
    for t in tables:
        if t == "2":
            out[t] = [((label, g), Variant(arch, g)) for label, arch in TABLE2_CELLS for g in depths]
        elif t == "3":
            out[t] = [((enc, dec), Variant(arch, groups)) for enc, dec, arch in TABLE3_CELLS]
        elif t == "4":
            out[t] = [(("residual Normal",), base), (("plain Normal",), dataclasses.replace(base, res_dist=False))]
        elif t == "5":
            out[t] = [(("SR + SE",), base), (("without SR",), dataclasses.replace(base, spectral=False)),
                      (("without SE",), dataclasses.replace(base, use_se=False))]
        elif t == "kl":
            out[t] = [(("KL balancing",), base), (("no KL balancing",), dataclasses.replace(base, kl_balance=False))]
        else:
            raise ValueError(f"unknown table {t!r}; choose from {', '.join(TABLES)}")
    return out


def unique_variants(tables: Dict[str, List[Tuple[tuple, Variant]]]) -> List[Variant]:
    seen: Dict[str, Variant] = {}
    for rows in tables.values():
        for _, v in rows:
            seen.setdefault(v.key, v)
    return list(seen.values())


def model_config(settings: Settings, variant: Variant):
    from nvae import NVAEConfig
    if settings.preset in BASES:
        name, overrides = BASES[settings.preset]
    else:
        name, overrides = settings.preset, {}
    overrides = {**overrides, **dict(settings.model)}
    return NVAEConfig.preset(name, **overrides, arch_instance=variant.arch, num_groups_per_scale=variant.groups,
                             use_se=variant.use_se, res_dist=variant.res_dist)


# ----------------------------------------------------------------------------- one row (in its own process)
def _register_subset(settings: Settings) -> str:
    """Register the benchmark's fixed subsets of ``settings.dataset`` as a data set of its own."""
    import torch
    from torch.utils.data import Subset

    from nvae.data import available, build_dataset, register
    name = f"{settings.dataset}_ablation"
    if name in available():
        return name

    @register(name, shape=SHAPES[settings.dataset])
    def _subset(split, root=None, download=False):
        full = build_dataset(settings.dataset, split, root)
        n = settings.train_images if split == "train" else settings.test_images
        if n is None or n >= len(full):
            return full
        if split == "train":
            return Subset(full, list(range(n)))
        # Evenly spaced: the CIFAR-10 test file in ../shared/data is sorted by class.
        return Subset(full, torch.linspace(0, len(full) - 1, n).long().tolist())
    return name


def _status_mb(field: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _reset_peak_rss() -> bool:
    """Start the peak-RSS mark afresh (Linux), so that loading the data does not count."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb(was_reset: bool) -> float:
    if was_reset:
        return _status_mb("VmHWM")
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 ** 2 if sys.platform == "darwin" else peak / 1024


def probe(model_cfg, variant: Variant, settings: Settings, x, device) -> dict:
    """Median seconds per training step and peak memory of those steps (forward, objective, backward, Adamax)."""
    import statistics

    import torch

    from nvae import NVAE, speedups
    from nvae.training.objective import kl_balance_alpha
    from nvae.distributed import DistributedContext
    from nvae.training.state import AUTOCAST, TrainState
    from nvae.config import TrainConfig
    from nvae.training.step import Coefficients, train_step
    was_reset = _reset_peak_rss()
    base_rss = _status_mb("VmRSS")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base_cuda = torch.cuda.memory_allocated(device)
    torch.manual_seed(settings.seed)
    model = speedups.apply(NVAE(model_cfg)).to(device).train()   # as training builds it
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    defaults = TrainConfig.preset(settings.dataset)
    opt = torch.optim.Adamax(model.parameters(), lr=1e-4, eps=1e-3, weight_decay=defaults.weight_decay)
    state = TrainState(model, opt, scaler=torch.amp.GradScaler(device.type, enabled=settings.precision == "fp16"),
                       dist=DistributedContext(device=device), autocast_dtype=AUTOCAST[settings.precision])
    alpha = kl_balance_alpha(model_cfg.groups_per_scale).to(device)
    coeffs = Coefficients(0.5, defaults.weight_decay_norm if variant.spectral else 0.0, alpha, variant.kl_balance)
    times, cpu_times = [], []
    for i in range(2 + settings.probe_steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0, c0 = time.perf_counter(), time.process_time()
        train_step(state, x, coeffs, max_grad_norm=float("inf"))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    if device.type == "cuda":
        peak, where = (torch.cuda.max_memory_allocated(device) - base_cuda) / 1024 ** 2, "CUDA allocated"
    else:
        # The kernel keeps RSS counts approximately (per-CPU or per-thread caches folded in by batches of pages), so
        # VmHWM can read some KB under the VmRSS taken a moment earlier (CI saw -0.02 MB): below that, no growth.
        peak, where = max(0.0, _peak_rss_mb(was_reset) - base_rss), "RSS"
    params = sum(p.numel() for p in model.parameters())
    del model, opt
    return {"s_per_step": statistics.median(times), "cpu_s_per_step": statistics.median(cpu_times),
            "peak_mb": peak, "memory": where, "params": params}


def run_variant(variant: Variant, settings: Settings, run_dir: Path) -> dict:
    """Probe, train and evaluate one row; returns its result as plain data."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from nvae.data import build_dataset, prepare_batch
    from nvae.analysis.likelihood import EvalConfig, evaluate
    from nvae.config import TrainConfig
    from nvae.speedups.cpu import tune_cpu_allocator
    from nvae.training.loop import train

    if settings.threads:
        torch.set_num_threads(settings.threads)
    tune_cpu_allocator()
    device = torch.device(settings.device)
    model_cfg = model_config(settings, variant)
    name = _register_subset(settings)
    train_set = build_dataset(name, "train", settings.data)
    if len(train_set) < settings.batch_size:
        raise ValueError(f"{len(train_set)} training images is fewer than one batch of {settings.batch_size}")
    x = next(iter(DataLoader(train_set, batch_size=settings.batch_size)))[0]
    x = prepare_batch(x, model_cfg, torch.Generator().manual_seed(0)).to(device)
    speed = probe(model_cfg, variant, settings, x, device)

    steps_per_epoch = len(train_set) // settings.batch_size
    max_steps, max_minutes = settings.max_steps, settings.minutes
    if settings.epochs:
        epochs = settings.epochs
    elif settings.max_steps:
        epochs = max(1, -(-settings.max_steps // steps_per_epoch))
    elif settings.budget == "cpu":
        # The steps this variant takes in the budget on a core of its own (measured in CPU time, which other
        # jobs on a shared machine hardly change); the schedules span them and training stops there.
        max_steps, max_minutes = max(1, int(settings.minutes * 60 / speed["cpu_s_per_step"])), None
        epochs = max(2, -(-max_steps // steps_per_epoch))
    else:
        expected = settings.minutes * 60 / speed["s_per_step"]
        epochs = max(2, round(expected / steps_per_epoch))
    base = TrainConfig.preset(settings.dataset)
    cfg = dataclasses.replace(
        base, dataset=name, epochs=epochs, warmup_epochs=min(settings.warmup_epochs, epochs),
        batch_size=settings.batch_size, weight_decay_norm=base.weight_decay_norm if variant.spectral else 0.0,
        weight_decay_norm_anneal=base.weight_decay_norm_anneal and variant.spectral, kl_balance=variant.kl_balance,
        seed=settings.seed, max_minutes=max_minutes, max_steps=max_steps,
        channels_last=settings.channels_last, precision=settings.precision, log_every=25, image_every=10 ** 9,
        checkpoint_every=10 ** 9, eval_every=0, final_eval_samples=0)   # timed: no validation inside
    t0, c0 = time.perf_counter(), time.process_time()
    model = train(model_cfg, cfg, run_dir, data_root=settings.data, device=device, progress=False)
    train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    state = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    nelbo_log = re.findall(r"nelbo ([-0-9.naif]+)", (run_dir / "log.txt").read_text())

    # The test images, binarised once with a fixed seed: every row scores the very same images.
    test = build_dataset(name, "test", settings.data)
    xs = torch.stack([test[i][0] for i in range(len(test))])
    if model_cfg.decoder == "bernoulli":
        xs = torch.bernoulli(xs, generator=torch.Generator().manual_seed(settings.seed))
    t0 = time.perf_counter()
    torch.manual_seed(0)
    # A CPU generator cannot drive sampling on a CUDA device: there the seeded global stream does.
    gen = torch.Generator().manual_seed(0) if device.type == "cpu" else None
    result = evaluate(model.to(device), TensorDataset(xs), EvalConfig(num_samples=settings.num_samples), generator=gen,
                      progress=False)
    eval_s = time.perf_counter() - t0
    return {"key": variant.key, "variant": dataclasses.asdict(variant), "ok": True,
            "num_groups": model_cfg.num_groups, "groups_per_scale": list(model_cfg.groups_per_scale), **speed,
            "steps": int(state["step"]), "epochs_scheduled": epochs, "steps_per_epoch": steps_per_epoch,
            "skipped_steps": int(state["guard"]["total"]), "rollbacks": int(state["run"]["rollbacks"]),
            "train_minutes": train_s / 60, "train_cpu_minutes": train_cpu_s / 60, "eval_minutes": eval_s / 60,
            "train_nelbo_last": float(nelbo_log[-1]) if nelbo_log else None, **result.to_dict()}


def _worker(payload: str, out_path: str) -> int:
    spec = json.loads(payload)
    settings = Settings(**{**spec["settings"], "model": tuple(map(tuple, spec["settings"]["model"]))})
    variant = Variant(**spec["variant"])
    result = run_variant(variant, settings, Path(spec["run_dir"]))
    Path(out_path).write_text(json.dumps(result, indent=1) + "\n")
    return 0


# ----------------------------------------------------------------------------- the driver
def run_in_subprocess(variant: Variant, settings: Settings, work_dir: Path, timeout: Optional[float]) -> dict:
    run_dir = work_dir / variant.key
    out = work_dir / f"{variant.key}.json"
    log = work_dir / f"{variant.key}.log"
    for stale in (out,):
        if stale.exists():
            stale.unlink()
    if run_dir.exists():   # a half-finished attempt: train() refuses a directory that holds a run
        import shutil
        shutil.rmtree(run_dir)
    payload = json.dumps({"variant": dataclasses.asdict(variant), "settings": dataclasses.asdict(settings),
                          "run_dir": str(run_dir)})
    env = dict(os.environ)
    if settings.threads:
        env.update(OMP_NUM_THREADS=str(settings.threads), MKL_NUM_THREADS=str(settings.threads))
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", payload,
                                 "--worker-out", str(out)],
                                stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - t0
    if rc == 0 and out.exists():
        result = json.loads(out.read_text())
    else:
        tail = log.read_text().strip().splitlines()[-1:] if log.exists() else []
        result = {"key": variant.key, "variant": dataclasses.asdict(variant), "ok": False,
                  "error": f"exit {rc}: {tail[0][:300] if tail else 'no output'} (log: {log})"}
    result["wall_minutes"] = wall / 60
    return result


def _fmt(value, digits=2) -> str:
    if value is None or value != value:
        return "n/a"
    return f"{value:.{digits}f}"


def _metric(result: Optional[dict], settings: Settings) -> str:
    if result is None:
        return "not run"
    if not result.get("ok"):
        return "failed"
    return _fmt(result["bpd"], 3) if settings.dataset != "mnist" else _fmt(result["nll"], 2)


def budget_text(settings: Settings) -> str:
    if settings.epochs:
        b = f"{settings.epochs} epochs" + (f" (cap {settings.minutes:g} min)" if settings.minutes else "")
    elif settings.max_steps:
        b = f"{settings.max_steps} steps"
    elif settings.budget == "cpu":
        b = f"{settings.minutes:g} CPU-min"
    else:
        b = f"{settings.minutes:g} min"
    n_train = "all" if settings.train_images is None else settings.train_images
    n_test = "all" if settings.test_images is None else settings.test_images
    return (f"{b}, {settings.dataset} train[{n_train}] test[{n_test}], batch {settings.batch_size}, "
            f"K={settings.num_samples}, {settings.device}"
            + (f" x{settings.threads} thread" + ("s" if settings.threads > 1 else "") if settings.threads else ""))


def render(tables: Dict[str, List[Tuple[tuple, Variant]]], results: Dict[str, dict], settings: Settings,
           command: str, meta: dict) -> str:
    unit = "nats per image (28x28)" if settings.dataset == "mnist" else "bits/dim"
    base_name, base_over = BASES.get(settings.preset, (settings.preset, {}))
    over = {**base_over, **dict(settings.model)}
    lines = ["# NVAE ablations: ours beside the paper's", ""]
    lines += [f"Ours: test NLL in {unit} (importance-weighted, K = {settings.num_samples}; lower is better), one "
              f"seed ({settings.seed}) per row. Every row: {budget_text(settings)}; model `{settings.preset}` = "
              f"preset `{base_name}`" + (f" with {', '.join(f'{k}={v}' for k, v in over.items())}" if over else "")
              + "; arch_instance, num_groups_per_scale and the switches per row.",
              f"Training subset: the first {settings.train_images or 'all'} training images; test subset: "
              f"{settings.test_images or 'all'} evenly spaced test images"
              + (", binarised once (seed fixed), the same for every row." if settings.dataset == "mnist" else "."),
              f"Paper: {PAPER_SOURCE}; n/a = not in our reference. The scales differ (paper: CIFAR-10, "
              "hundreds of GPU-hours per row), so compare the order of rows, not the values.",
              f"Machine: {meta.get('machine', '?')}; torch {meta.get('torch', '?')}; {meta.get('date', '')}; "
              f"{meta.get('total_minutes', 0):.0f} min for all rows (training, evaluation, start-up); "
              f"torch threads and OMP_NUM_THREADS per run: {settings.threads or 'default'}; 1-minute load average "
              f"at the start: {_fmt(meta.get('load_average'), 1)}." + (f" {meta['note']}" if meta.get("note") else ""),
              f"Command: `{command}`", ""]

    def r(v: Variant) -> Optional[dict]:
        return results.get(v.key)

    if "2" in tables:
        rows = tables["2"]
        depths = sorted({v.groups for _, v in rows})
        L = {g: next((r(v)["num_groups"] for _, v in rows if v.groups == g and r(v) and r(v).get("ok")), None)
             for g in depths}
        head = [f"ours L={L[g] if L[g] else '?'} (groups/scale {g})" for g in depths]
        head += [f"paper L={d}" for d in PAPER_TABLE2_DEPTHS]
        lines += ["## Table 2: normalisation and activation in the cells", "",
                  "| cells | " + " | ".join(head) + " |", "|---" * (1 + len(head)) + "|"]
        for label, arch in TABLE2_CELLS:
            ours = [_metric(r(next(v for (lb, g), v in rows if lb == label and g == d)), settings) for d in depths]
            paper = [_fmt(PAPER_TABLE2.get((label, d))) for d in PAPER_TABLE2_DEPTHS]
            lines.append(f"| {label} (`{arch}`) | " + " | ".join(ours + paper) + " |")
        lines.append("")
    step_key = "cpu_s_per_step" if settings.budget == "cpu" else "s_per_step"
    if "3" in tables:
        lines += ["## Table 3: regular or separable cells in encoder and decoder", "",
                  f"| encoder | decoder | arch | ours NLL | ours {'CPU ' if settings.budget == 'cpu' else ''}s/step"
                  " | ours steps | ours peak memory (MB) | "
                  "paper NLL | paper train time (h) | paper memory (GB) |", "|---" * 10 + "|"]
        for (enc, dec), v in tables["3"]:
            res = r(v) or {}
            ok = res.get("ok")
            lines.append(f"| {enc} | {dec} | `{v.arch}` | {_metric(r(v), settings)} | "
                         f"{_fmt(res.get(step_key), 3) if ok else '-'} | {res.get('steps', '-') if ok else '-'} | "
                         f"{_fmt(res.get('peak_mb'), 0) if ok else '-'} | n/a | n/a | n/a |")
        lines += ["", "s/step and memory: a few training steps timed before each run"
                  + (" (CPU time of the one thread; " if settings.budget == "cpu" else " (")
                  + "memory: "
                  + ("peak CUDA memory allocated" if settings.device.startswith("cuda") else
                     "peak RSS above the RSS before the model was built")
                  + "); the paper's train time is for a whole run at a fixed number of epochs.", ""]
    for t, title, paper in (("4", "Table 4: residual Normal posterior", {}),
                            ("5", "Table 5: spectral regularisation (SR) and squeeze-and-excitation (SE)",
                             PAPER_TABLE5),
                            ("kl", "KL balancing", {})):
        if t not in tables:
            continue
        lines += [f"## {title}", "", "| model | variant | ours NLL | ours steps | paper NLL |", "|---" * 5 + "|"]
        for (label,), v in tables[t]:
            res = r(v) or {}
            lines.append(f"| {label} | `{v.key}` | {_metric(r(v), settings)} | "
                         f"{res.get('steps', '-') if res.get('ok') else '-'} | {_fmt(paper.get(label))} |")
        lines.append("")
    lines += ["## Every run", "", "| variant | L | params | s/step (CPU, wall) | steps (epochs scheduled) | "
              "skipped | train min (CPU, wall) | last train NELBO | test NELBO | test NLL | budget, data |",
              "|---" * 11 + "|"]
    for v in unique_variants(tables):
        res = r(v)
        if res is None or not res.get("ok"):
            why = "not run" if res is None else res.get("error", "failed")
            lines.append(f"| `{v.key}` | | | | | | | | | {why} | {budget_text(settings)} |")
            continue
        metric = _fmt(res["nll"], 2) if settings.dataset == "mnist" else f"{_fmt(res['bpd'], 3)} bpd"
        nelbo = _fmt(res["nelbo"], 2) if settings.dataset == "mnist" else f"{_fmt(res['bpd_elbo'], 3)} bpd"
        lines.append(f"| `{v.key}` | {res['num_groups']} | {res['params']:,} | "
                     f"{_fmt(res.get('cpu_s_per_step'), 3)}, {_fmt(res['s_per_step'], 3)} | "
                     f"{res['steps']} ({res['epochs_scheduled']}) | {res['skipped_steps']} | "
                     f"{_fmt(res.get('train_cpu_minutes'), 1)}, {_fmt(res['train_minutes'], 1)} | "
                     f"{_fmt(res.get('train_nelbo_last'), 1)} | {nelbo} | "
                     f"{metric} | {budget_text(settings)} |")
    lines.append("")
    return "\n".join(lines)


def _count(value: str) -> Optional[int]:
    return None if value.lower() == "all" else int(value)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tables", default="2,3,5", help=f"comma-separated, from {', '.join(TABLES)}")
    p.add_argument("--dataset", choices=sorted(SHAPES), default="mnist")
    p.add_argument("--data", default=None, help="data folder (e.g. ../shared/data)")
    p.add_argument("--preset", default=None,
                   help=f"base model: an NVAEConfig preset or one of {sorted(BASES)} (default cpu_<dataset>)")
    p.add_argument("--model", action="append", default=[], metavar="KEY=VALUE", help="NVAEConfig overrides")
    p.add_argument("--depths", default="2,4", help="Table 2's num_groups_per_scale values")
    p.add_argument("--groups", type=int, default=None,
                   help="num_groups_per_scale of Tables 3, 4, 5 (default: the last of --depths)")
    p.add_argument("--minutes-per-run", type=float, default=None,
                   help="training wall-clock budget per row (default 2, or no cap with --epochs)")
    p.add_argument("--budget", choices=["cpu", "wall"], default=None,
                   help="what --minutes-per-run counts: 'cpu' (default on CPU) gives each row the steps it takes in "
                        "that much CPU time (of all its threads), timed before training, so other jobs on the "
                        "machine do not change them; 'wall' (default elsewhere) stops training at that wall-clock "
                        "time")
    p.add_argument("--epochs", type=int, default=None, help="fixed epochs per row instead of a fitted schedule")
    p.add_argument("--warmup-epochs", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="stop every row after this many steps (smoke tests)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--train-images", type=_count, default=2048, help="first N training images, or 'all'")
    p.add_argument("--test-images", type=_count, default=256, help="N evenly spaced test images, or 'all'")
    p.add_argument("--num-samples", type=int, default=20, help="K of the importance-weighted NLL")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (and OMP_NUM_THREADS); 0: default")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default=None, help="markdown file to write")
    p.add_argument("--json", default=None, help="every row's raw result (default: results.json in --work-dir)")
    p.add_argument("--work-dir", default=None, help="where the runs go (default: a temporary folder)")
    p.add_argument("--resume", action="store_true",
                   help="reuse the rows of --json (or --work-dir's results.json) made under the same settings")
    p.add_argument("--timeout-minutes", type=float, default=None, help="kill a row after this long")
    p.add_argument("--note", default=None, help="free text for the header of the output")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def settings_from(a: argparse.Namespace) -> Settings:
    from nvae import NVAEConfig
    from nvae.config import parse_overrides
    minutes = a.minutes_per_run if a.minutes_per_run is not None else (None if (a.epochs or a.steps) else 2.0)
    return Settings(dataset=a.dataset, data=a.data, preset=a.preset or f"cpu_{a.dataset}",
                    model=tuple(parse_overrides(a.model, NVAEConfig).items()), batch_size=a.batch_size,
                    train_images=a.train_images, test_images=a.test_images, num_samples=a.num_samples,
                    minutes=minutes, budget=a.budget or ("cpu" if a.device == "cpu" else "wall"), epochs=a.epochs,
                    warmup_epochs=a.warmup_epochs, max_steps=a.steps,
                    device=a.device, threads=a.threads, channels_last=not a.no_channels_last, precision=a.precision,
                    seed=a.seed)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker:
        return _worker(a.worker, a.worker_out)
    import platform

    import torch
    settings = settings_from(a)
    depths = [int(d) for d in a.depths.split(",")]
    tables = plan([t.strip() for t in a.tables.split(",") if t.strip()], depths, a.groups or depths[-1])
    variants = unique_variants(tables)
    for v in variants:   # fail fast on a configuration the library refuses
        model_config(settings, v)
    out = Path(a.out) if a.out else None
    work_dir = Path(a.work_dir) if a.work_dir else Path(tempfile.mkdtemp(prefix="nvae-ablations-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    json_path = Path(a.json) if a.json else work_dir / "results.json"
    results: Dict[str, dict] = {}
    previous: dict = {}
    settings_dict = json.loads(json.dumps(dataclasses.asdict(settings)))
    if a.resume and json_path.exists():
        stored = json.loads(json_path.read_text())
        if stored.get("settings") == settings_dict:
            results = {k: v for k, v in stored["rows"].items() if v.get("ok")}
            previous = stored
            print(f"resuming: {len(results)} row(s) reused from {json_path}", file=sys.stderr)
        else:
            print(f"{json_path} was made under other settings; starting afresh", file=sys.stderr)
    command = "python benchmarks/ablations.py " + " ".join(shlex.quote(x) for x in (sys.argv[1:] if argv is None
                                                                                    else argv))
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores"
            + (f", {torch.cuda.get_device_name(0)}" if settings.device.startswith("cuda") else ""),
            "torch": torch.__version__, "date": datetime.date.today().isoformat(), "total_minutes": 0.0,
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None, "note": a.note}
    # A resumed run keeps the command and machine of the run it continues.
    command, meta = previous.get("command", command), previous.get("meta", meta)
    timeout = a.timeout_minutes * 60 if a.timeout_minutes else None
    print(f"{len(variants)} run(s): {budget_text(settings)}; runs in {work_dir}", file=sys.stderr)
    for i, v in enumerate(variants, 1):
        if v.key in results:
            continue
        res = run_in_subprocess(v, settings, work_dir, timeout)
        results[v.key] = res
        if res.get("ok"):
            print(f"[{i}/{len(variants)}] {v.key}: {res['steps']} steps, {res['cpu_s_per_step']:.3f} CPU-s/step, "
                  f"NLL {res['nll']:.2f} nats ({res['bpd']:.4f} bpd), {res['wall_minutes']:.1f} min", file=sys.stderr)
        else:
            print(f"[{i}/{len(variants)}] {v.key}: FAILED {res['error']}", file=sys.stderr)
        meta["total_minutes"] = meta.get("total_minutes", 0.0) + res["wall_minutes"]
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"settings": settings_dict, "meta": meta, "command": command,
                                         "rows": results}, indent=1) + "\n")
    text = render(tables, results, settings, command, meta)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    return 0 if all(results.get(v.key, {}).get("ok") for v in variants) else 1


if __name__ == "__main__":
    sys.exit(main())
