"""``nvae presets`` and ``nvae train``."""
from __future__ import annotations

import argparse
import sys

from .common import count, device, non_negative, positive


def _cmd_presets(args: argparse.Namespace) -> int:
    from .. import NVAE, PRESETS
    for name, cfg in PRESETS.items():
        line = f"{name:16s} {cfg.image_size:>3d}px  groups/scale {list(cfg.groups_per_scale)}  flows {cfg.num_nf}"
        if args.count:
            line += f"  params {sum(p.numel() for p in NVAE(cfg).parameters()):,}"
        print(line)
    return 0


def _train_overrides(args: argparse.Namespace) -> dict:
    """The training options given as flags (those left unset keep the preset's or the stored run's)."""
    explicit = {k: v for k, v in dict(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
                                         max_steps=args.max_steps, max_minutes=args.max_minutes, seed=args.seed,
                                         precision=args.precision, checkpoint_every=args.checkpoint_every,
                                         dist_timeout_minutes=args.dist_timeout, eval_every=args.eval_every,
                                         eval_samples=args.eval_samples,
                                         final_eval_samples=args.final_eval_samples).items()
                if v is not None}
    for flag in ("channels_last", "recompute_bn", "deterministic", "strict_data", "allow_data_change"):
        if getattr(args, flag):
            explicit[flag] = True
    if args.checkpointing:
        explicit["checkpointing"] = True
        if args.checkpointing != "all":
            explicit["checkpointing_roles"] = args.checkpointing   # TrainConfig splits the commas
    return explicit


def _cmd_train(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from .. import NVAEConfig
    from ..config import TrainConfig, parse_overrides
    from ..training.run_dir import new_run_dir, run_configs
    from ..training.loop import TrainingInterrupted, train

    run_dir = Path(args.run_dir) if args.run_dir else None
    if args.resume:
        if isinstance(args.resume, str):
            if run_dir is not None and run_dir.resolve() != Path(args.resume).resolve():
                raise ValueError(f"--resume {args.resume} and --run-dir {args.run_dir} name different runs; give one")
            run_dir = Path(args.resume)
        if run_dir is None:
            raise ValueError("--resume needs the run to continue: nvae train --resume RUN_DIR")
    train_over = {**_train_overrides(args), **parse_overrides(args.train, TrainConfig)}
    name, model_cfg, train_cfg = run_configs(args.preset, run_dir if args.resume else None,
                                             parse_overrides(args.model, NVAEConfig), train_over)
    run_dir = run_dir or new_run_dir(name)
    if args.tune_allocator:
        from ..speedups.cpu import tune_cpu_allocator
        tune_cpu_allocator()
    main_process = os.environ.get("RANK", "0") == "0"   # under torchrun only rank 0 talks
    if main_process:
        print(f"{'resuming' if args.resume else 'training'} {name} on {train_cfg.dataset} -> {run_dir}")
    try:
        train(model_cfg, train_cfg, run_dir, data_root=args.data, device=args.device, resume=bool(args.resume),
              progress=args.progress)
    except TrainingInterrupted as e:
        if main_process:
            print(f"nvae: stopped by {e.signal_name} at step {e.step}; checkpoint written to {e.checkpoint}. "
                  f"Continue with: nvae train --resume {run_dir}", file=sys.stderr)
        return 128 + {"SIGTERM": 15, "SIGINT": 2}.get(e.signal_name, 2)
    if main_process:
        print(f"done: {run_dir / 'checkpoint.pt'}, samples in {run_dir / 'samples.png'}, "
              f"TensorBoard: tensorboard --logdir {run_dir}")
    return 0


def add_parsers(sub) -> None:
    """Add the commands that train to ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser("presets", help="list the architecture presets")
    p.add_argument("--count", action="store_true", help="also build each model and count its parameters")
    p.set_defaults(func=_cmd_presets)

    p = sub.add_parser("train", help="train a model (default: the digits preset, no download needed)")
    p.add_argument("--preset", default=None,
                   help="architecture and recipe preset (see `nvae presets`; default digits, or the resumed run's)")
    p.add_argument("--data", default=None, help="folder holding the data set's files (not needed for digits)")
    p.add_argument("--run-dir", default=None, help="where to write the run (default: runs/PRESET-TIMESTAMP)")
    p.add_argument("--max-steps", type=count, default=None, help="stop after N steps")
    p.add_argument("--max-minutes", type=positive, default=None, help="stop after M minutes of training")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="RUN",
                   help="continue the run in RUN (or --run-dir) from its last checkpoint, exactly")
    p.add_argument("--checkpoint-every", type=count, default=None, help="write checkpoint.pt every N steps")
    p.add_argument("--deterministic", action="store_true", help="deterministic algorithms only")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--strict-data", action="store_true",
                   help="stop on an unreadable image or a wrong channel count (default: skip or convert, and warn)")
    p.add_argument("--epochs", type=count, default=None)
    p.add_argument("--batch-size", type=count, default=None)
    p.add_argument("--learning-rate", type=positive, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None)
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format (faster on CPU)")
    p.add_argument("--checkpointing", nargs="?", const="all", default=None, metavar="ROLES",
                   help="recompute cells in backward to save memory: every cell, or only the comma-separated "
                        "cell roles given (e.g. normal_post,up_post)")
    p.add_argument("--recompute-bn", action="store_true",
                   help="store only BN inputs and recompute BN + Swish in backward (less memory, a little slower)")
    p.add_argument("--device", type=device, default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--allow-data-change", action="store_true",
                   help="with --resume: continue on other data than the run trained on (its schedules change)")
    p.add_argument("--dist-timeout", type=positive, default=None, metavar="MINUTES",
                   help="under torchrun: how long a process waits for the others (default 5)")
    p.add_argument("--eval-every", type=non_negative, default=None, metavar="N",
                   help="validate every N epochs (0: never; default: the official schedule, every epoch up to "
                        "50 epochs, else every 20)")
    p.add_argument("--eval-samples", type=count, default=None, metavar="K",
                   help="K of each validation's importance-weighted NLL (default 10)")
    p.add_argument("--final-eval-samples", type=non_negative, default=None, metavar="K",
                   help="K of the evaluation after the last epoch, into validation_final.json (default 1000, "
                        "digits 50; 0: none)")
    p.add_argument("--no-tune-allocator", dest="tune_allocator", action="store_false",
                   help="leave glibc malloc settings alone")
    p.add_argument("--model", action="append", default=[], metavar="KEY=VALUE", help="override an NVAEConfig field")
    p.add_argument("--train", action="append", default=[], metavar="KEY=VALUE", help="override a TrainConfig field")
    p.set_defaults(func=_cmd_train)
