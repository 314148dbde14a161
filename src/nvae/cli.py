"""The ``nvae`` command line: a thin layer over the library."""
from __future__ import annotations

import argparse
import sys
import math
from typing import List, Optional


# ------------------------------------------------------------------ option types
# Every number is checked where it enters: argparse turns a ValueError here into one line and exit 2.
def _checked(convert, ok, name: str):
    """An argparse type: ``convert(text)``, refused unless ``ok``; ``name`` is what argparse calls it."""
    def parse(text: str):
        value = convert(text)
        if not ok(value):
            raise ValueError
        return value
    parse.__name__ = name
    return parse


count = _checked(int, lambda v: v >= 1, "positive integer")                     # images, steps, samples, ...
non_negative = _checked(int, lambda v: v >= 0, "non-negative integer")
temperature = _checked(float, lambda v: math.isfinite(v) and v >= 0, "finite non-negative number")
positive = _checked(float, lambda v: math.isfinite(v) and v > 0, "finite positive number")


def device(text: str) -> str:
    """A torch device this machine has."""
    import torch
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (cpu, cuda, cuda:1, mps, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("cuda was asked for, but this machine has no CUDA device; use --device cpu")
    return text


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr and exit status 2, like every other error of the command."""

    def error(self, message: str):
        self.exit(2, f"nvae: error: {message} (see {self.prog} --help)\n")


def _cmd_presets(args: argparse.Namespace) -> int:
    from . import NVAE, PRESETS
    for name, cfg in PRESETS.items():
        line = f"{name:12s} {cfg.image_size:>3d}px  groups/scale {list(cfg.groups_per_scale)}  flows {cfg.num_nf}"
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

    from . import NVAEConfig
    from .config import TrainConfig, parse_overrides
    from .runs import new_run_dir, run_configs
    from .train import TrainingInterrupted, train

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
        from .runtime import tune_cpu_allocator
        tune_cpu_allocator()
    main_process = os.environ.get("RANK", "0") == "0"   # under torchrun only rank 0 talks
    if main_process:
        print(f"{'resuming' if args.resume else 'training'} {name} on {train_cfg.dataset} -> {run_dir}")
    try:
        train(model_cfg, train_cfg, run_dir, data_root=args.data, device=args.device, resume=bool(args.resume))
    except TrainingInterrupted as e:
        if main_process:
            print(f"nvae: stopped by {e.signal_name} at step {e.step}; checkpoint written to {e.checkpoint}. "
                  f"Continue with: nvae train --resume {run_dir}", file=sys.stderr)
        return 128 + {"SIGTERM": 15, "SIGINT": 2}.get(e.signal_name, 2)
    if main_process:
        print(f"done: {run_dir / 'checkpoint.pt'}, samples in {run_dir / 'samples.png'}, "
              f"TensorBoard: tensorboard --logdir {run_dir}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    """One process, or each process of a torchrun job with its share of the batches; rank 0 reports.

    Partial sums go to NAME.partial.json beside the output every --save-every batches;
    --resume continues from there (refusing a file from other arguments) and gives the
    numbers an uninterrupted run gives. Without --resume such a file is replaced.
    """
    import json

    from datetime import timedelta

    from .distributed import init_distributed, waiting_for_peers
    from .evaluate import EvalConfig, PartialFile, evaluate, partial_path_for
    from .runs import check_output, load_any, write_json
    # torchrun: gloo on CPU, nccl on cuda:LOCAL_RANK
    ctx = init_distributed(args.device, timeout=timedelta(minutes=args.dist_timeout))
    try:
        model, ckpt = load_any(args.checkpoint, str(ctx.device))
        dataset, data = _eval_data(args, ckpt, model)
        output = check_output(args.output or ckpt.with_name(f"eval_{args.split}_K{args.num_samples}.json"), ".json")
        partial = partial_path_for(output) if args.save_every else None
        if args.resume and partial is None:
            raise ValueError("--resume continues from partial sums, which --save-every 0 turns off")
        config = EvalConfig(num_samples=args.num_samples, batch_size=args.batch_size, max_batch=args.max_batch,
                            max_images=args.max_images, seed=args.seed, save_every=args.save_every or 10)
        resumable = PartialFile(partial, args.resume, {"dataset": dataset, "split": args.split}) if partial else None
        with waiting_for_peers("the evaluation", ctx):
            result = evaluate(model, data, config, dist_ctx=ctx, partial=resumable, progress=ctx.is_main)
        if ctx.is_main:
            out = {"checkpoint": str(ckpt), "dataset": dataset, "split": args.split, "seed": args.seed,
                   **result.to_dict()}
            write_json(output, out)
            print(json.dumps(out, indent=2))
    finally:
        ctx.close()
    return 0


def _parse_temperatures(text: str):
    try:
        return [temperature(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"temperatures must be comma-separated finite numbers >= 0, got {text!r}") from None


def _cmd_sample(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from .runs import load_any
    from .sampling import readjust_bn_cached, save_samples, temperature_name
    given = [f"--{n.replace('_', '-')}" for n in ("temperature", "temperatures", "per_group_temperature")
             if getattr(args, n) is not None]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(given)} contradict each other; give one of them")
    if args.per_group_temperature:
        temps = [_parse_temperatures(args.per_group_temperature)]
    elif args.temperatures:
        temps = _parse_temperatures(args.temperatures)
    else:
        temps = [1.0 if args.temperature is None else args.temperature]
    model, ckpt = load_any(args.checkpoint, args.device)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)   # draws happen on the model's device
    for t in temps:
        if args.readjust_bn:
            model.load_state_dict(load_any(ckpt, args.device)[0].state_dict())   # statistics of the checkpoint
            cached = readjust_bn_cached(model, ckpt, t, args.readjust_steps, generator=gen, progress=True)
            print(f"BN statistics for t={t}: {'from cache' if cached else 're-adjusted and cached'}")
        png, npz = save_samples(model.sample(args.n, t, gen), Path(args.out or ckpt.parent),
                                f"samples_{temperature_name(t)}")
        print(f"wrote {png} and {npz}")
    return 0


def _eval_data(args, ckpt, model):
    from .data import build_dataset, check_images_fit
    from .runs import dataset_of
    dataset = args.dataset or dataset_of(ckpt)
    return dataset, check_images_fit(build_dataset(dataset, args.split, args.data), model.config, dataset)


def _cmd_reconstruct(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import save_png
    from .data import prepare_batch
    from .runs import check_output, load_any
    from .sampling import reconstructions
    model, ckpt = load_any(args.checkpoint, args.device)
    out = check_output(args.output or ckpt.with_name(f"reconstructions_{args.split}_t{args.temperature:g}.png"), ".png")
    _, data = _eval_data(args, ckpt, model)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    x = torch.stack([data[i][0] for i in range(min(args.n, len(data)))]).to(args.device)
    pairs = reconstructions(model, prepare_batch(x, model.config, gen), args.temperature, gen)
    save_png(pairs, out, nrow=2 * max(1, int((len(x) // 2) ** 0.5)))
    print(f"wrote {out} (each input beside its reconstruction)")
    return 0


def _cmd_kl_stats(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from .evaluate import kl_statistics, plot_kl_stats
    from .runs import check_output, load_any, write_json
    model, ckpt = load_any(args.checkpoint, args.device)
    stem = Path(args.output or ckpt.with_name(f"kl_stats_{args.split}"))
    check_output(stem.with_suffix(".json"), ".json"), check_output(stem.with_suffix(".png"), ".png")
    dataset, data = _eval_data(args, ckpt, model)
    stats = kl_statistics(model, data, batch_size=args.batch_size, max_images=args.max_images,
                          generator=torch.Generator().manual_seed(args.seed))
    write_json(stem.with_suffix(".json"),
               {"checkpoint": str(ckpt), "dataset": dataset, "split": args.split, **stats.to_dict()})
    plot_kl_stats(stats, stem.with_suffix(".png"))
    for i, (kl, active) in enumerate(zip(stats.kl_per_group, stats.active_units)):
        print(f"group {i:3d}  KL {kl:9.3f} nats  active {active}/{stats.units_per_group}")
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.png')}")
    return 0


def _cmd_interpolate(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import save_png
    from .data import prepare_batch
    from .runs import check_output, load_any
    from .sampling import interpolation
    model, ckpt = load_any(args.checkpoint, args.device)
    out = check_output(args.output or ckpt.with_name(f"interpolation_{args.a}_{args.b}.png"), ".png")
    _, data = _eval_data(args, ckpt, model)
    for i in (args.a, args.b):
        if not 0 <= i < len(data):
            raise ValueError(f"image index {i} is outside the {args.split} split (0..{len(data) - 1})")
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    x = prepare_batch(torch.stack([data[args.a][0], data[args.b][0]]).to(args.device), model.config, gen)
    groups = [int(g) for g in args.groups.split(",")] if args.groups else None
    row = interpolation(model, x[:1], x[1:], args.steps, groups).float().cpu()
    save_png(row, out, nrow=len(row))
    print(f"wrote {out}: input {args.a}, {args.steps} decoded steps, input {args.b}")
    return 0


def _add_eval_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="run directory, our checkpoint, or an official checkpoint")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--dataset", default=None, help="data set name (default: the one the run was trained on)")
    p.add_argument("--data", default=None, help="folder holding the data set's files")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=device, default="cpu")


# ------------------------------------------------------------------------------------ FID
_FID_WEIGHTS_HELP = ("local copy of pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
                     "(required; nothing is downloaded)")


def cmd_fid_stats(args: argparse.Namespace) -> int:
    """``nvae fid-stats``: Inception statistics of a data set split, written to ``--output``."""
    from .data import build_dataset
    from .fid import NO_WEIGHTS_MESSAGE, FIDError, InceptionFeatures, dataset_statistics, save_statistics

    if args.inception_weights is None:
        raise FIDError(NO_WEIGHTS_MESSAGE)
    if not str(args.output).endswith(".npz"):
        raise FIDError(f"--output must end in .npz (pytorch-fid recognises statistics by it), got {args.output}")
    if args.max_images is not None and args.max_images < 2:
        raise FIDError(f"--max-images must be at least 2, got {args.max_images}")
    inception = InceptionFeatures(args.inception_weights, args.device, args.dims)
    data = build_dataset(args.dataset, args.split, args.data, image_size=args.image_size, flip=False)
    mu, sigma = dataset_statistics(data, inception, batch_size=args.batch_size, max_images=args.max_images,
                                   num_workers=args.num_workers)
    n = len(data) if args.max_images is None else min(args.max_images, len(data))
    out = save_statistics(args.output, mu, sigma)
    print(f"wrote {out}: {args.dims} Inception features of {n} images of {args.dataset} ({args.split})")
    return 0


def cmd_fid(args: argparse.Namespace) -> int:
    """``nvae fid``: FID of a model's samples against ``--stats``; prints and writes JSON."""
    import json

    import torch

    from .fid import (FEATURE_DIMS, NO_WEIGHTS_MESSAGE, FIDError, InceptionFeatures, file_sha256, load_statistics,
                      model_fid)
    from .runs import check_output, load_any, write_json

    if args.inception_weights is None:
        raise FIDError(NO_WEIGHTS_MESSAGE)
    if args.num_samples < 2:
        raise FIDError(f"-n must be at least 2, got {args.num_samples}")
    if args.temperature < 0:
        raise FIDError(f"--temperature must be non-negative, got {args.temperature}")
    mu, sigma = load_statistics(args.stats)
    if mu.shape[0] not in FEATURE_DIMS:
        raise FIDError(f"{args.stats} holds {mu.shape[0]} features; Inception gives one of {FEATURE_DIMS}")
    inception = InceptionFeatures(args.inception_weights, args.device, dims=mu.shape[0])
    model, ckpt = load_any(args.checkpoint, args.device)
    output = check_output(args.output or ckpt.with_name(f"fid_t{args.temperature:g}_n{args.num_samples}.json"), ".json")
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    fid = model_fid(model, (mu, sigma), inception, num_samples=args.num_samples, temperature=args.temperature,
                    batch_size=args.batch_size, generator=generator)
    out = {"checkpoint": str(ckpt), "fid": fid, "num_samples": args.num_samples, "temperature": args.temperature,
           "seed": args.seed, "stats": str(args.stats), "dims": int(mu.shape[0]),
           "inception_weights": str(args.inception_weights),
           "inception_weights_sha256": file_sha256(args.inception_weights)}
    write_json(output, out)
    print(json.dumps(out, indent=2))
    return 0


def add_fid_parsers(sub) -> None:
    """Add the ``fid-stats`` and ``fid`` commands to ``sub`` (an argparse subparsers object)."""
    from .fid import FEATURE_DIMS
    p = sub.add_parser("fid-stats", help="Inception statistics of a data set for FID (.npz, pytorch-fid format)")
    p.add_argument("--dataset", required=True, help="data set name (as for training)")
    p.add_argument("--data", default=None, help="folder holding the data set's files")
    p.add_argument("--split", default="train", choices=["train", "test"])
    p.add_argument("--image-size", type=count, default=None,
                   help="side of the images for resizable data sets (default: the data set's); use the model's")
    p.add_argument("--inception-weights", default=None, metavar="PATH", help=_FID_WEIGHTS_HELP)
    p.add_argument("--output", "-o", required=True, help="statistics file to write (.npz)")
    p.add_argument("--max-images", type=count, default=None, help="use only the first N images")
    p.add_argument("--dims", type=int, default=2048, choices=FEATURE_DIMS,
                   help="Inception features (2048: standard FID)")
    p.add_argument("--batch-size", type=count, default=50)
    p.add_argument("--num-workers", type=non_negative, default=0, help="data loader worker processes")
    p.add_argument("--device", type=device, default="cpu")
    p.set_defaults(func=cmd_fid_stats)

    p = sub.add_parser("fid", help="FID of samples from the prior against data statistics (JSON)")
    p.add_argument("checkpoint", help="run directory, our checkpoint, or an official checkpoint")
    p.add_argument("--stats", required=True, help="data statistics from nvae fid-stats (or pytorch-fid's .npz)")
    p.add_argument("--inception-weights", default=None, metavar="PATH", help=_FID_WEIGHTS_HELP)
    p.add_argument("-n", "--num-samples", type=count, default=10000, help="number of samples")
    p.add_argument("--temperature", "-t", type=temperature, default=1.0, help="prior temperature")
    p.add_argument("--batch-size", type=count, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=device, default="cpu")
    p.add_argument("--output", default=None, help="JSON path (default: beside the checkpoint)")
    p.set_defaults(func=cmd_fid)


def _add_training_parsers(sub) -> None:
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


def _add_evaluation_parsers(sub) -> None:
    """Add the commands that score a model to ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser("eval", help="NELBO and importance-weighted NLL over a split")
    p.add_argument("checkpoint", help="run directory, our checkpoint, or an official checkpoint")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--num-samples", "-k", type=count, default=1000, help="K of the importance-weighted bound")
    p.add_argument("--dataset", default=None, help="data set name (default: the one the run was trained on)")
    p.add_argument("--data", default=None, help="folder holding the data set's files")
    p.add_argument("--batch-size", type=count, default=16)
    p.add_argument("--max-batch", type=count, default=None,
                   help="images per forward pass, K folded in (default: 64 on CPU, 1024 on GPU)")
    p.add_argument("--max-images", type=count, default=None, help="evaluate only the first N images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="JSON path (default: beside the checkpoint)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted evaluation from OUTPUT's .partial.json (same arguments only; "
                        "same numbers as an uninterrupted run)")
    p.add_argument("--save-every", type=non_negative, default=10, metavar="N",
                   help="write partial sums every N batches per process, for --resume (0: never)")
    p.add_argument("--device", type=device, default="cpu",
                   help="torch device; under torchrun cuda means cuda:LOCAL_RANK")
    p.add_argument("--dist-timeout", type=positive, default=5.0, metavar="MINUTES",
                   help="under torchrun: how long a process waits for the others")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("kl-stats", help="average KL and active units per latent group (JSON and bar plot)")
    _add_eval_data_args(p)
    p.add_argument("--batch-size", type=count, default=64)
    p.add_argument("--max-images", type=count, default=None)
    p.add_argument("--output", default=None, help="path stem for .json and .png (default: beside the checkpoint)")
    p.set_defaults(func=_cmd_kl_stats)


def _add_image_parsers(sub) -> None:
    """Add the commands that draw images to ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser("sample", help="sample images from the prior (PNG grid and .npz)")
    p.add_argument("checkpoint", help="run directory, our checkpoint, or an official checkpoint")
    p.add_argument("-n", type=count, default=64, help="number of samples")
    p.add_argument("--temperature", "-t", type=temperature, default=None, help="prior temperature (default 1.0)")
    p.add_argument("--temperatures", default=None, help="comma-separated list, one grid each")
    p.add_argument("--per-group-temperature", default=None, help="comma-separated, one per latent group")
    p.add_argument("--readjust-bn", action="store_true", help="re-estimate decoder BN statistics at t (cached)")
    p.add_argument("--readjust-steps", type=count, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default: beside the checkpoint)")
    p.add_argument("--device", type=device, default="cpu")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("reconstruct", help="inputs beside their reconstructions (PNG)")
    _add_eval_data_args(p)
    p.add_argument("-n", type=count, default=32, help="number of inputs")
    p.add_argument("--temperature", "-t", type=temperature, default=0.0,
                   help="posterior temperature: 0 = posterior means, 1 = posterior samples")
    p.add_argument("--output", default=None, help="PNG path (default: beside the checkpoint)")
    p.set_defaults(func=_cmd_reconstruct)

    p = sub.add_parser("interpolate", help="decode the line between two inputs' latents (PNG row)")
    _add_eval_data_args(p)
    p.add_argument("--a", type=non_negative, default=0, help="index of the first image in the split")
    p.add_argument("--b", type=non_negative, default=1, help="index of the second image")
    p.add_argument("--steps", type=count, default=8)
    p.add_argument("--groups", default=None, help="comma-separated latent groups to interpolate (default: all)")
    p.add_argument("--output", default=None, help="PNG path (default: beside the checkpoint)")
    p.set_defaults(func=_cmd_interpolate)

def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nvae", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_training_parsers(sub)
    _add_evaluation_parsers(sub)
    _add_image_parsers(sub)
    add_fid_parsers(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:   # a usage error (one line already said) or --help: the status, as every command
        return e.code if isinstance(e.code, int) else 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("nvae: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:
        if args.debug:
            raise
        print(f"nvae: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from .distributed import PeerTimeout
        from .stability import TrainingDiverged
        if args.debug or not isinstance(e, (TrainingDiverged, PeerTimeout)):
            raise
        print(f"nvae: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
