"""Training-step time of several memory options, as ratios measured in one process.

Step times on a shared machine drift by 10-20% over minutes, more than the
differences between these options, so separate runs of ``train_step.py``
cannot rank them. Here one model takes its steps under each option in turn,
round after round, and each option's median is divided by the first's. (Peak
memory is per process: measure it with ``train_step.py``.)

    python benchmarks/step_ratios.py --preset mnist_small --channels-last \\
        plain recompute-bn recompute-bn+checkpointing=normal_post,up_post

An option is ``plain`` or ``+``-joined parts: ``recompute-bn``,
``checkpointing`` (every cell) or ``checkpointing=ROLE,ROLE``,
``onednn-depthwise`` (every depthwise weight gradient by oneDNN, none summed by
kernel offset: what :mod:`nvae.speedups.depthwise` saves), and ``adamax-foreach``
(Adamax's multi-tensor implementation instead of torch's per-tensor loop on CPU).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import List, Optional, Tuple

import torch

from _common import describe_cpu, setup

from nvae import speedups
from nvae.config import cell_roles
from nvae.speedups import depthwise
from nvae.speedups.cpu import tune_cpu_allocator
from nvae.training.objective import nvae_loss

DEFAULT_OPTIONS = ["plain", "recompute-bn", "recompute-bn+checkpointing=normal_post,up_post",
                   "recompute-bn+checkpointing=normal_post,up_post,normal_dec,up_dec"]


def parse_option(text: str) -> Tuple[bool, bool, Optional[List[str]], int, bool]:
    """``(recompute_bn, checkpointing, roles, small_map, foreach)`` of an option string (``small_map``:
    :data:`nvae.speedups.depthwise.SMALL_MAP` for the option; ``foreach``: Adamax's multi-tensor implementation)."""
    recompute, ckpt, roles, small_map, foreach = False, False, None, depthwise.SMALL_MAP, False
    if text != "plain":
        for part in text.split("+"):
            name, _, value = part.partition("=")
            if name == "recompute-bn" and not value:
                recompute = True
            elif name == "onednn-depthwise" and not value:
                small_map = 0
            elif name == "adamax-foreach" and not value:
                foreach = True
            elif name == "checkpointing":
                try:
                    ckpt, roles = True, (list(cell_roles(value)) if value else None)
                except ValueError as e:
                    raise SystemExit(f"error: {e}") from None
            else:
                raise SystemExit(f"error: unknown option part {part!r} in {text!r}; use plain, recompute-bn, "
                                 "checkpointing, checkpointing=ROLE,ROLE, onednn-depthwise or adamax-foreach")
    return recompute, ckpt, roles, small_map, foreach


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("options", nargs="*", default=DEFAULT_OPTIONS)
    p.add_argument("--preset", default="mnist_small")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=10, help="timed rounds (one step per option each)")
    p.add_argument("--channels-last", action="store_true")
    a = p.parse_args(argv)
    default = depthwise.SMALL_MAP
    options = [(text, *parse_option(text)) for text in a.options]
    tune_cpu_allocator()
    _, model, opt, alpha, x = setup(a.preset, a.batch, torch.device("cpu"), a.channels_last)
    times = {text: [] for text, *_ in options}
    for round_ in range(a.rounds + 1):          # round 0 warms every option up
        for text, recompute, ckpt, roles, small_map, foreach in options:
            speedups.apply(model, recompute_bn=recompute,
                           checkpointing=(tuple(roles) if roles else True) if ckpt else False)
            depthwise.SMALL_MAP = small_map
            for group in opt.param_groups:
                group["foreach"] = foreach
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            nvae_loss(model, x, beta=0.5, lam=1e-2, alpha=alpha).loss.backward()
            opt.step()
            if round_:
                times[text].append(time.perf_counter() - t0)
    depthwise.SMALL_MAP = default
    base = statistics.median(times[options[0][0]])
    print(f"# {describe_cpu()}")
    print(f"preset={a.preset} batch={a.batch}{' channels-last' if a.channels_last else ''} rounds={a.rounds}")
    for text, ts in times.items():
        med = statistics.median(ts)
        print(f"{text:70s} median {med:.3f} s  x{med / base:.2f}")


if __name__ == "__main__":
    sys.exit(main())
