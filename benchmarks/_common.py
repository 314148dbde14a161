"""What the benchmark scripts share: the CPU a figure was measured on, timing, the per-shape
arguments, a training step's set-up, and the convolution shapes of a model.

Every script imports it the same way, ``from _common import ...``: ``python benchmarks/NAME.py``
puts ``benchmarks/`` first on ``sys.path``, and the tests load the scripts through
``load_benchmark`` of ``tests/conftest.py``, which does the same. No script imports another.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from typing import Dict, List, NamedTuple, Tuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from nvae import NVAE, NVAEConfig, speedups
from nvae.config import parse_overrides
from nvae.training.objective import kl_balance_alpha


# ----------------------------------------------------------------------------- the machine
#: oneDNN's instruction-set levels, narrowest first (the names ``ONEDNN_MAX_CPU_ISA`` takes).
ONEDNN_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
               "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512",
               "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "ALL", "DEFAULT")


def _cpu_flags_and_model() -> tuple:
    """(x86 feature flags, CPU model name) from /proc/cpuinfo; no flags where it cannot be read."""
    try:
        lines = open("/proc/cpuinfo").read().splitlines()
    except OSError:
        return set(), platform.processor() or platform.machine()
    fields = {}
    for line in lines:
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return set(fields.get("flags", "").split()), fields.get("model name", platform.machine())


def cpu_description() -> dict:
    """What a CPU figure depends on: the CPU model, its widest x86 vector ISA, the ISA oneDNN is
    allowed (``ONEDNN_MAX_CPU_ISA`` caps it, e.g. ``AVX2`` on an AVX-512 machine) and torch's threads.

    oneDNN picks different convolution kernels per ISA, so speed (and, where a kernel is
    wrong, correctness) can differ between machines of the same architecture.
    """
    flags, model = _cpu_flags_and_model()
    if "avx512f" in flags and "avx512bw" in flags:
        native = "AVX512_CORE"
    elif "avx2" in flags:
        native = "AVX2"
    elif flags:
        native = "SSE41" if "sse4_1" in flags else "older x86"
    else:
        native = platform.machine()
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    onednn = native
    if cap and native in ONEDNN_ISAS and cap.upper() in ONEDNN_ISAS:
        onednn = min(native, cap.upper(), key=ONEDNN_ISAS.index)
    return {"cpu": model, "cpu_isa": native, "onednn_isa": onednn, "onednn_max_cpu_isa": cap,
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def describe_cpu() -> str:
    """:func:`cpu_description` as one line, for printing beside a figure."""
    d = cpu_description()
    capped = f" (ONEDNN_MAX_CPU_ISA={d['onednn_max_cpu_isa']})" if d["onednn_max_cpu_isa"] else ""
    return (f"{d['cpu']}, {d['cpu_isa']}; oneDNN {d['onednn_isa']}{capped}; {d['threads']} thread(s); "
            f"torch {d['torch']}")


def peak_rss_gb() -> float:
    """This process's peak resident memory so far, in GB."""
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 ** 3 if sys.platform == "darwin" else peak / 1024 ** 2


# ----------------------------------------------------------------------------- timing and arguments
def median_ms(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` in ms over ``repeats`` calls, after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def shape_benchmark_args(argv, description: str, repeats: int):
    """``(arguments, NVAEConfig)`` of a per-shape benchmark (preset, overrides, batch, threads, repeats);
    sets the thread count."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mnist_small")
    p.add_argument("--model", action="append", default=[], metavar="KEY=VALUE", help="override an NVAEConfig field")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--repeats", type=int, default=repeats)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    return a, NVAEConfig.preset(a.preset, **parse_overrides(a.model, NVAEConfig))


# ----------------------------------------------------------------------------- a training step
def setup(preset: str, batch: int, device: torch.device, channels_last: bool):
    """``(config, model in training mode, Adamax as in training, KL-balance alpha, a random batch)``."""
    torch.manual_seed(0)
    cfg = NVAEConfig.preset(preset)
    model = speedups.apply(NVAE(cfg)).to(device)      # as training builds it
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.Adamax(model.parameters(), lr=1e-2, eps=1e-3, weight_decay=3e-4)
    alpha = kl_balance_alpha(cfg.groups_per_scale).to(device)
    x = (torch.rand(batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=device) > 0.5).float()
    if cfg.decoder != "bernoulli":
        x = torch.floor(x * 255) / 255
    return cfg, model, opt, alpha, x


# ----------------------------------------------------------------------------- a model's convolutions
class ConvShape(NamedTuple):
    batch: int
    c_in: int
    c_out: int
    size: Tuple[int, int]
    kernel: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    groups: int
    bias: bool
    input_strided: bool     #: the input was a strided view (the sub-grids of FactorizedReduce)

    def label(self) -> str:
        k, s, p, d = self.kernel, self.stride, self.padding, self.dilation
        extra = f" d{d[0]}" if d != (1, 1) else ""
        extra += f" g{self.groups}" if self.groups > 1 else ""
        extra += " strided-view" if self.input_strided else ""
        return (f"{self.batch}x{self.c_in}x{self.size[0]}x{self.size[1]} -> {self.c_out}  k{k[0]} s{s[0]} p{p[0]}"
                f"{extra}{'' if self.bias else ' no-bias'}")


class _RecordConvs(TorchFunctionMode):
    """Records the shape of every 2-d convolution called while active (modules or functional)."""

    def __init__(self):
        super().__init__()
        self.seen: Dict[ConvShape, int] = {}    #: shape -> number of calls

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.conv2d, torch.conv2d):
            names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
            call = dict(zip(names, args), **kwargs)
            x, w = call["input"], call["weight"]
            pair = lambda v, d: tuple(v) if isinstance(v, (tuple, list)) else (v, v) if v is not None else d  # noqa: E731
            strided = not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
            groups = call.get("groups", 1)
            shape = ConvShape(x.shape[0], x.shape[1], w.shape[0], tuple(x.shape[-2:]), tuple(w.shape[-2:]),
                              pair(call.get("stride"), (1, 1)), pair(call.get("padding"), (0, 0)),
                              pair(call.get("dilation"), (1, 1)), groups, call.get("bias") is not None, strided)
            self.seen[shape] = self.seen.get(shape, 0) + 1
        return func(*args, **kwargs)


def model_conv_shapes(cfg: NVAEConfig, batch: int) -> List[ConvShape]:
    """The distinct convolutions one training forward pass of ``NVAE(cfg)`` applies."""
    return list(model_conv_counts(cfg, batch))


def model_conv_counts(cfg: NVAEConfig, batch: int) -> Dict[ConvShape, int]:
    """Each distinct convolution of one training forward pass of ``NVAE(cfg)``, and how often it runs."""
    torch.manual_seed(0)
    model = NVAE(cfg).train()
    x = torch.rand(batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    x = torch.bernoulli(x) if cfg.decoder == "bernoulli" else x
    with torch.no_grad(), _RecordConvs() as record:
        model(x)
    return dict(record.seen)
