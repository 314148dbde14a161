"""The ``nvae`` command line: a thin layer over the library."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _cmd_presets(args: argparse.Namespace) -> int:
    from . import NVAE, PRESETS
    for name, cfg in PRESETS.items():
        line = f"{name:12s} {cfg.image_size:>3d}px  groups/scale {list(cfg.groups_per_scale)}  flows {cfg.num_nf}"
        if args.count:
            line += f"  params {sum(p.numel() for p in NVAE(cfg).parameters()):,}"
        print(line)
    return 0


def _parse_overrides(items: List[str], cls) -> dict:
    """``KEY=VALUE`` strings -> typed field values of the dataclass ``cls``."""
    import dataclasses
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"bad override {item!r}: expected KEY=VALUE with KEY one of {sorted(fields)}")
        default = getattr(cls(), key) if key != "dataset" else ""
        if isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"override {key} needs true or false, got {value!r}")
            out[key] = value.lower() in ("true", "1", "yes")
        elif isinstance(default, int):
            out[key] = int(value)
        elif isinstance(default, float):
            out[key] = float(value)
        else:
            out[key] = value
    return out


def _cmd_train(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from . import NVAEConfig
    from .train import TRAIN_PRESETS, TrainConfig, train

    model_cfg = NVAEConfig.preset(args.preset, **_parse_overrides(args.model, NVAEConfig))
    base = TrainConfig.preset(args.preset) if args.preset in TRAIN_PRESETS else TrainConfig()
    explicit = {k: v for k, v in dict(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
                                         max_steps=args.max_steps, seed=args.seed, precision=args.precision).items()
                if v is not None}
    if args.channels_last:
        explicit["channels_last"] = True
    if args.checkpointing:
        explicit["checkpointing"] = True
    train_cfg = TrainConfig.from_dict({**base.to_dict(), **explicit, **_parse_overrides(args.train, TrainConfig)})
    run_dir = Path(args.run_dir or Path("runs") / f"{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    if (run_dir / "checkpoint.pt").exists():
        raise ValueError(f"{run_dir} already holds a run (checkpoint.pt); choose another --run-dir")
    if args.tune_allocator:
        from .runtime import tune_cpu_allocator
        tune_cpu_allocator()
    print(f"training {args.preset} on {train_cfg.dataset} -> {run_dir}")
    train(model_cfg, train_cfg, run_dir, data_root=args.data, device=args.device)
    print(f"done: {run_dir / 'checkpoint.pt'}, samples in {run_dir / 'samples.png'}, "
          f"TensorBoard: tensorboard --logdir {run_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nvae", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("presets", help="list the architecture presets")
    p.add_argument("--count", action="store_true", help="also build each model and count its parameters")
    p.set_defaults(func=_cmd_presets)

    p = sub.add_parser("train", help="train a model (default: the digits preset, no download needed)")
    p.add_argument("--preset", default="digits", help="architecture and recipe preset (see `nvae presets`)")
    p.add_argument("--data", default=None, help="folder holding the data set's files (not needed for digits)")
    p.add_argument("--run-dir", default=None, help="where to write the run (default: runs/PRESET-TIMESTAMP)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after N steps")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--learning-rate", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None)
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format (faster on CPU)")
    p.add_argument("--checkpointing", action="store_true", help="recompute cells in backward to save memory")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--no-tune-allocator", dest="tune_allocator", action="store_false",
                   help="leave glibc malloc settings alone")
    p.add_argument("--model", action="append", default=[], metavar="KEY=VALUE", help="override an NVAEConfig field")
    p.add_argument("--train", action="append", default=[], metavar="KEY=VALUE", help="override a TrainConfig field")
    p.set_defaults(func=_cmd_train)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("nvae: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as e:
        if args.debug:
            raise
        print(f"nvae: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
