"""Train for a fixed wall-clock budget, then print the test NLL (importance-weighted).

    python benchmarks/quality.py --preset mnist_small --minutes 60 --data ../shared/data --num-samples 100

The recipe is the preset's official one, with the schedules (LR cosine, KL
warm-up) laid out over ``--epochs`` (default: what the budget is expected to
reach, so warm-up completes inside it) and training stopped at the budget.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time

import torch

from nvae import NVAEConfig
from nvae.config import TrainConfig
from nvae.data import build_dataset
from nvae.analysis.likelihood import EvalConfig, evaluate
from nvae.speedups.cpu import tune_cpu_allocator
from nvae.training.loop import train


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mnist_small")
    p.add_argument("--minutes", type=float, default=60.0, help="training wall-clock budget")
    p.add_argument("--data", default=None, help="data folder (e.g. ../shared/data)")
    p.add_argument("--epochs", type=int, default=None, help="epochs the schedules span (default: preset's)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--num-samples", type=int, default=100, help="K of the importance-weighted bound")
    p.add_argument("--test-images", type=int, default=None, help="evaluate on the first N test images")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--run-dir", default=None)
    p.add_argument("--train", action="append", default=[], metavar="KEY=VALUE",
                   help="TrainConfig overrides, as in `nvae train`")
    a = p.parse_args(argv)
    tune_cpu_allocator()
    from nvae.config import parse_overrides
    model_cfg = NVAEConfig.preset(a.preset)
    base = TrainConfig.preset(a.preset)
    # timed training: no validation inside it unless --train asks for it (the evaluation follows)
    overrides = {**dict(max_minutes=a.minutes, channels_last=a.channels_last, eval_every=0, final_eval_samples=0),
                 **parse_overrides(a.train, TrainConfig)}
    if a.epochs:
        overrides["epochs"] = a.epochs
        overrides.setdefault("warmup_epochs", min(base.warmup_epochs, a.epochs))   # an explicit --train wins
    if a.batch_size:
        overrides["batch_size"] = a.batch_size
    cfg = dataclasses.replace(base, **overrides)
    run_dir = a.run_dir or tempfile.mkdtemp(prefix=f"quality-{a.preset}-")
    t0 = time.perf_counter()
    model = train(model_cfg, cfg, run_dir, data_root=a.data, progress=sys.stderr.isatty())
    trained = time.perf_counter() - t0
    step = torch.load(f"{run_dir}/checkpoint.pt", weights_only=True)["step"]
    test = build_dataset(cfg.dataset, "test", a.data)
    result = evaluate(model, test, EvalConfig(num_samples=a.num_samples, max_images=a.test_images),
                      generator=torch.Generator().manual_seed(0), progress=sys.stderr.isatty())
    unit = "nats (28x28)" if model_cfg.crop_output else "nats"
    print(json.dumps({"preset": a.preset, "data": cfg.dataset, "minutes": round(trained / 60, 1), "steps": step,
                      "epochs_scheduled": cfg.epochs, "batch_size": cfg.batch_size, **result.to_dict()}, indent=1))
    print(f"{a.preset}: {trained / 60:.1f} min, {step} steps -> test NLL {result.nll:.2f} {unit} "
          f"(NELBO {result.nelbo:.2f}; {result.bpd:.4f} bits/dim; K={a.num_samples}, {result.num_images} images)")


if __name__ == "__main__":
    sys.exit(main())
