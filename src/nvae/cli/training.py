"""``nvae presets`` and ``nvae train``."""
from __future__ import annotations

import argparse
import shlex
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
    from ..config import TrainConfig
    explicit = {}
    for f, flag in TrainConfig.flags():
        value = getattr(args, f.name)
        if value is None or value is False:   # not given (a switch's default is False)
            continue
        explicit.update(flag.to_config(value) if flag.to_config else {f.name: value})
    return explicit


#: The value checks a :class:`~nvae.config.Flag` names.
_PARSERS = {"count": count, "positive": positive, "non_negative": non_negative}
_TYPES = {"int": int, "float": float, "str": None}   # argparse keeps a string as given


def _add_config_flags(p: argparse.ArgumentParser, taken) -> None:
    """One flag per TrainConfig field that declares one (its metadata's :class:`~nvae.config.Flag`), under
    a heading per group; each is left unset (None, or False for a switch) unless given. ``taken``: the
    destinations of the hand-written flags, which a field must not share."""
    from ..config import TRAIN_GROUPS, TrainConfig
    sections = {}
    for f, flag in sorted(TrainConfig.flags(), key=lambda ff: list(TRAIN_GROUPS).index(ff[0].metadata["group"])):
        if f.name in taken:
            raise AssertionError(f"nvae train has a flag --{f.name.replace('_', '-')} already; rename one")
        group = f.metadata["group"]
        if group not in sections:
            sections[group] = p.add_argument_group(f"{group.replace('_', ' ')} options", TRAIN_GROUPS[group])
        kind = str(f.type).replace("Optional[", "").rstrip("]")
        kw = dict(dest=f.name, help=flag.help)
        if kind == "bool" and flag.optional_value is None:
            kw.update(action="store_true")
        else:
            if kind not in _TYPES and flag.to_config is None:
                raise AssertionError(f"the flag of {f.name} needs a to_config converter for a {kind} field")
            kw.update(default=None, metavar=flag.metavar, choices=flag.choices,
                      type=_PARSERS[flag.parse] if flag.parse else _TYPES.get(kind))
            if flag.optional_value is not None:
                kw.update(nargs="?", const=flag.optional_value)
        sections[group].add_argument(flag.option(f.name), **kw)


def _cmd_train(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from ..config import TrainConfig, parse_overrides
    from ..distributed import init_distributed

    # Under torchrun the processes join first, so rank 0 alone decides whether --resume auto starts or
    # continues the run (the others could look while it writes the configs), and that wait is bounded too.
    timeout = parse_overrides(args.train, TrainConfig).get("dist_timeout_minutes", args.dist_timeout_minutes)
    ctx = init_distributed(args.device, timeout=timedelta(minutes=timeout or TrainConfig.dist_timeout_minutes))
    try:
        return _train_command(args, ctx)
    finally:
        ctx.close()


def _train_command(args: argparse.Namespace, ctx) -> int:
    from pathlib import Path

    from .. import NVAEConfig
    from ..config import TrainConfig, parse_overrides
    from ..training.run_dir import holds_run, new_run_dir, run_configs
    from ..training.loop import TrainingInterrupted, train

    run_dir = Path(args.run_dir) if args.run_dir else None
    if args.resume == "auto":   # the same command line starts the run or continues it
        if run_dir is None:
            raise ValueError("--resume auto needs the run's directory: nvae train --resume auto --run-dir RUN "
                             "(a directory named auto is given as --resume ./auto)")
        args.resume = True if ctx.from_main(holds_run(run_dir)) else None
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
    # Every process must write into the same folder: rank 0's timestamp names a new one.
    run_dir = run_dir or ctx.from_main(new_run_dir(name))
    if args.tune_allocator:
        from ..speedups.cpu import tune_cpu_allocator
        tune_cpu_allocator()
    if ctx.is_main:   # under torchrun only rank 0 talks
        print(f"{'resuming' if args.resume else 'training'} {name} on {train_cfg.dataset} -> {run_dir}")
    try:
        train(model_cfg, train_cfg, run_dir, data_root=args.data, device=args.device, resume=bool(args.resume),
              progress=args.progress)
    except TrainingInterrupted as e:
        if ctx.is_main:
            print(f"nvae: stopped by {e.signal_name} at step {e.step}; checkpoint written to {e.checkpoint}. "
                  f"Continue with: nvae train --resume {shlex.quote(str(run_dir))}", file=sys.stderr)
        return 128 + {"SIGTERM": 15, "SIGINT": 2}.get(e.signal_name, 2)
    if ctx.is_main:
        print(f"done: {run_dir / 'checkpoint.pt'}, samples in {run_dir / 'samples.png'}, "
              f"TensorBoard: tensorboard --logdir {shlex.quote(str(run_dir))}")
        final = _final_validation_line(run_dir)
        if final:
            print(final)
    return 0


def _final_validation_line(run_dir) -> str:
    """The final validation's NLL and bits/dim from ``RUN/validation_final.json``; "" where it did not run."""
    import json
    import math

    from ..training.validation import FINAL_FILE
    try:
        stored = json.loads((run_dir / FINAL_FILE).read_text())
        nll, bpd = float(stored["nll"]), float(stored["bpd"])
    except (OSError, ValueError, TypeError, KeyError):
        return ""
    if not (math.isfinite(nll) and math.isfinite(bpd)):
        return ""
    where = f"K={stored['num_samples']}, " if "num_samples" in stored else ""
    return f"final validation ({where}{stored.get('num_images', '?')} images): NLL {nll:.4f} nats/image, " \
           f"{bpd:.4f} bits/dim"


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
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="RUN",
                   help="continue the run in RUN (or --run-dir) from its last checkpoint, exactly; "
                        "`--resume auto --run-dir RUN` continues RUN when it holds a run and starts it otherwise "
                        "(for restarts and requeued jobs; a directory named auto is given as ./auto)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--device", type=device, default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--no-tune-allocator", dest="tune_allocator", action="store_false",
                   help="leave glibc malloc settings alone")
    p.add_argument("--model", action="append", default=[], metavar="KEY=VALUE", help="override an NVAEConfig field")
    p.add_argument("--train", action="append", default=[], metavar="KEY=VALUE", help="override a TrainConfig field")
    _add_config_flags(p, {a.dest for a in p._actions})
    p.set_defaults(func=_cmd_train)
