"""The ``nvae`` command line: a thin layer over the library."""
from __future__ import annotations

import argparse
import math
import sys
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


# ------------------------------------------------------------------ which weights (EMA or raw)
def _add_weights_arg(p: argparse.ArgumentParser) -> None:
    """``--raw-weights``, for every command that reads a model back."""
    p.add_argument("--raw-weights", dest="weights", action="store_const", const="raw", default="auto",
                   help="use the weights as trained, even when the run kept an EMA of them (default: the EMA "
                        "when there is one)")


def _load(args: argparse.Namespace, device=None):
    """``(model, checkpoint path, "ema" or "raw")`` of ``args.checkpoint``, as ``--raw-weights`` asks."""
    from .runs import load_weights
    return load_weights(args.checkpoint, device or args.device, getattr(args, "weights", "auto"))


def _cmd_presets(args: argparse.Namespace) -> int:
    from . import NVAE, PRESETS
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
    from .runs import check_output, write_json
    # torchrun: gloo on CPU, nccl on cuda:LOCAL_RANK
    ctx = init_distributed(args.device, timeout=timedelta(minutes=args.dist_timeout))
    try:
        model, ckpt, weights = _load(args, str(ctx.device))
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
            out = {"checkpoint": str(ckpt), "weights": weights, "dataset": dataset, "split": args.split,
                   "seed": args.seed,
                   # which file and how many images of it: e.g. the official validation.lmdb, not test.lmdb
                   "data_source": getattr(data, "source_description", None), **result.to_dict()}
            write_json(output, out)
            print(json.dumps(out, indent=2))
    finally:
        ctx.close()
    return 0


def _sample_temperatures(args: argparse.Namespace) -> list:
    """The schedules asked for by -t, --temperatures or --per-group-temperature (one of them; default 1.0)."""
    from .temperature import TemperatureSchedule
    given = [f"--{n.replace('_', '-')}" for n in ("temperature", "temperatures", "per_group_temperature")
             if getattr(args, n) is not None]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(given)} contradict each other; give one of them")
    if args.per_group_temperature is not None:
        spec = args.per_group_temperature   # a single number here is a list of one, for a one-group model
        return [spec if spec.kind == "linear" else TemperatureSchedule("list", spec.values)]
    return args.temperatures or [args.temperature or TemperatureSchedule.constant(1.0)]


def _cmd_sample(args: argparse.Namespace) -> int:
    """One grid + .npz for n <= --batch (rank 0); else numbered chunks over all processes, resumable."""
    from datetime import timedelta

    from .checkpoint import model_fingerprint
    from .distributed import init_distributed, waiting_for_peers
    from .model import per_group
    temps = _sample_temperatures(args)
    ctx = init_distributed(args.device, timeout=timedelta(minutes=args.dist_timeout))
    try:
        model, ckpt, kind = _load(args, str(ctx.device))
        if ctx.is_main:
            print(f"{kind} weights of {ckpt}")
        for t in temps:   # a list of the wrong length fails here, before anything is drawn or written
            per_group(t, model.num_groups)
        weights = model_fingerprint(model)   # of the checkpoint, before any BN re-adjustment
        for t in temps:
            with waiting_for_peers("sampling", ctx):
                _sample_one(args, ctx, model, (ckpt, kind), t, weights)
    finally:
        ctx.close()
    return 0


def _sample_one(args, ctx, model, source, t, weights: str) -> None:
    """Samples at ``t`` of ``model``, read from ``source`` = (checkpoint, "ema" or "raw"), whose weights'
    fingerprint is ``weights``."""
    from pathlib import Path

    import torch

    from .bulk import BulkConfig, broadcast_decoder_bn, draw_chunk, sample_to_chunks
    from .model import per_group
    from .runs import load_weights
    from .sampling import readjust_bn_cached, save_samples, temperature_name
    ckpt, kind = source
    progress = ctx.is_main and not args.no_progress
    readjust = None
    if args.readjust_bn:
        # statistics of the checkpoint (the same weights: the cache is keyed by their fingerprint)
        model.load_state_dict(load_weights(ckpt, ctx.device, kind).model.state_dict())
        gen = torch.Generator(device=ctx.device).manual_seed(args.seed)
        # EMA and raw statistics cached side by side: checkpoint.bn_* and checkpoint_ema.bn_*
        cache = ckpt if kind == "raw" else ckpt.with_name(f"{ckpt.stem}_ema{ckpt.suffix}")
        cached = readjust_bn_cached(model, cache, t, args.readjust_steps, generator=gen, progress=progress)
        broadcast_decoder_bn(model, ctx)
        readjust = {"temperature": per_group(t, model.num_groups), "steps": args.readjust_steps}
        if ctx.is_main:
            print(f"BN statistics for t={t}: {'from cache' if cached else 're-adjusted and cached'}")
    out, name = Path(args.out or ckpt.parent), f"samples_{temperature_name(t)}"
    config = BulkConfig(args.n, args.batch, t, args.seed, args.dtype)
    if args.n <= args.batch:   # one batch: the grid and one .npz (array images), as ever
        if ctx.is_main:
            png, npz = save_samples(draw_chunk(model, config, 0), out, name)
            print(f"wrote {png} and {npz}")
        return
    result = sample_to_chunks(model, out / name, config, ctx, progress,
                              identity={"weights_sha256": weights, "readjust_bn": readjust})
    if ctx.is_main:
        print(f"wrote {result.out_dir} ({result.num_chunks} chunks of up to {args.batch} samples; this process drew "
              f"{result.drawn}, found {result.kept} already written) and the grid {result.grid}")


def _eval_data(args, ckpt, model):
    from .runs import split_of
    return split_of(ckpt, model.config, args.split, args.dataset, args.data)


def _cmd_reconstruct(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import save_png
    from .data import prepare_batch
    from .runs import check_output
    from .sampling import reconstructions
    if args.keep_groups is not None:
        return _cmd_partial_posterior(args)
    t = 0.0 if args.temperature is None else args.temperature
    model, ckpt, weights = _load(args)
    print(f"{weights} weights of {ckpt}")
    out = check_output(args.output or ckpt.with_name(f"reconstructions_{args.split}_t{t:g}.png"), ".png")
    _, data = _eval_data(args, ckpt, model)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    x = torch.stack([data[i][0] for i in range(min(args.n, len(data)))]).to(args.device)
    pairs = reconstructions(model, prepare_batch(x, model.config, gen), t, gen)
    save_png(pairs, out, nrow=2 * max(1, int((len(x) // 2) ** 0.5)))
    print(f"wrote {out} (each input beside its reconstruction)")
    return 0


def _cmd_kl_stats(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from .evaluate import kl_statistics, plot_kl_stats
    from .runs import check_output, write_json
    model, ckpt, weights = _load(args)
    print(f"{weights} weights of {ckpt}")
    stem = Path(args.output or ckpt.with_name(f"kl_stats_{args.split}"))
    check_output(stem.with_suffix(".json"), ".json"), check_output(stem.with_suffix(".png"), ".png")
    dataset, data = _eval_data(args, ckpt, model)
    stats = kl_statistics(model, data, batch_size=args.batch_size, max_images=args.max_images,
                          generator=torch.Generator(device=args.device).manual_seed(args.seed))
    write_json(stem.with_suffix(".json"),
               {"checkpoint": str(ckpt), "weights": weights, "dataset": dataset, "split": args.split,
                **stats.to_dict()})
    plot_kl_stats(stats, stem.with_suffix(".png"))
    for i, (kl, active) in enumerate(zip(stats.kl_per_group, stats.active_units)):
        print(f"group {i:3d}  KL {kl:9.3f} nats  active {active}/{stats.units_per_group}")
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.png')}")
    return 0


def _cmd_interpolate(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import save_png
    from .data import prepare_batch
    from .runs import check_output
    from .sampling import interpolation
    model, ckpt, weights = _load(args)
    print(f"{weights} weights of {ckpt}")
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
    p.add_argument("--data", default=None,
                   help="folder holding the data set's files (default: the folder the run was trained on)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=device, default="cpu")


# ------------------------------------------------------------------------------------ FID
_FID_WEIGHTS_HELP = ("local copy of pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
                     "(required; nothing is downloaded)")


def cmd_fid_stats(args: argparse.Namespace) -> int:
    """``nvae fid-stats``: Inception statistics of a data set's split(s), written to ``--output``."""
    from .fid import NO_WEIGHTS_MESSAGE, FIDError, InceptionFeatures, dataset_statistics, save_statistics
    from .fid_protocol import stats_dataset, stats_splits

    if args.inception_weights is None:
        raise FIDError(NO_WEIGHTS_MESSAGE)
    if not str(args.output).endswith(".npz"):
        raise FIDError(f"--output must end in .npz (pytorch-fid recognises statistics by it), got {args.output}")
    if args.max_images is not None and args.max_images < 2:
        raise FIDError(f"--max-images must be at least 2, got {args.max_images}")
    if args.subset_seed is not None and args.max_images is None:
        raise FIDError("--subset-seed picks --max-images N images at random; give --max-images too (the official "
                       "script uses 50000)")
    splits = stats_splits(args.dataset, args.split)
    inception = InceptionFeatures(args.inception_weights, args.device, args.dims)
    data = stats_dataset(args.dataset, splits, args.data, args.image_size)
    mu, sigma = dataset_statistics(data, inception, batch_size=args.batch_size, max_images=args.max_images,
                                   num_workers=args.num_workers, progress=not args.no_progress,
                                   subset_seed=args.subset_seed)
    n = len(data) if args.max_images is None else min(args.max_images, len(data))
    out = save_statistics(args.output, mu, sigma)
    print(f"wrote {out}: {args.dims} Inception features of {n} images of {args.dataset} ({'+'.join(splits)})")
    return 0


def _fid_protocol(args: argparse.Namespace, num_groups: int):
    """The :class:`~nvae.fid_protocol.FIDProtocol` the arguments ask for (its default from the checkpoint)."""
    from .fid_protocol import FIDProtocol, default_protocol
    t = args.temperature
    # A schedule becomes its per-group list (a plain number stays one), so the JSON and file names can hold it.
    t = t.values[0] if t.kind == "constant" else t.resolve(num_groups)
    return FIDProtocol(name=args.protocol or default_protocol(args.checkpoint), temperature=t,
                       readjust_bn=args.readjust_bn, readjust_steps=args.readjust_steps,
                       readjust_batch=args.readjust_batch, num_samples=args.num_samples,
                       batch_size=args.batch_size, seed=args.seed, reduction=args.reduction)


def cmd_fid(args: argparse.Namespace) -> int:
    """``nvae fid``: FID of a model's images (``--protocol``) against ``--stats``; prints and writes JSON.

    Under torchrun every process draws its share of the batches and the Inception
    statistics are reduced across processes; rank 0 writes the JSON.
    """
    import json
    from datetime import timedelta

    from .distributed import init_distributed, waiting_for_peers
    from .fid import FEATURE_DIMS, NO_WEIGHTS_MESSAGE, FIDError, InceptionFeatures, file_sha256, load_statistics
    from .fid_protocol import default_output_name, protocol_fid
    from .runs import check_output, write_json

    if args.inception_weights is None:
        raise FIDError(NO_WEIGHTS_MESSAGE)
    mu, sigma = load_statistics(args.stats)
    if mu.shape[0] not in FEATURE_DIMS:
        raise FIDError(f"{args.stats} holds {mu.shape[0]} features; Inception gives one of {FEATURE_DIMS}")
    ctx = init_distributed(args.device, timeout=timedelta(minutes=args.dist_timeout))
    try:
        inception = InceptionFeatures(args.inception_weights, ctx.device, dims=mu.shape[0])
        model, ckpt, weights = _load(args, str(ctx.device))
        protocol = _fid_protocol(args, model.num_groups)
        output = check_output(args.output or ckpt.with_name(default_output_name(protocol)), ".json")
        if ctx.is_main and protocol.name == "official" and not protocol.readjust_bn and protocol.temperature != 1:
            print(f"nvae: note: under --protocol official the images are drawn at t=1; -t {protocol.temperature} "
                  "only sets the temperature of --readjust-bn, which is off", file=sys.stderr)
        with waiting_for_peers("the FID sampling", ctx):
            # EMA and raw weights keep their BN caches apart (see nvae sample)
            cache = ckpt if weights == "raw" else ckpt.with_name(f"{ckpt.stem}_ema{ckpt.suffix}")
            result = protocol_fid(model, protocol, inception, (mu, sigma), checkpoint=cache, dist_ctx=ctx,
                                  progress=not args.no_progress)
        if ctx.is_main:
            out = {"checkpoint": str(ckpt), "weights": weights, **result, "stats": str(args.stats),
                   "dims": int(mu.shape[0]),
                   "inception_weights": str(args.inception_weights),
                   "inception_weights_sha256": file_sha256(args.inception_weights)}
            write_json(output, out)
            print(json.dumps(out, indent=2))
    finally:
        ctx.close()
    return 0


def add_fid_parsers(sub) -> None:
    """Add the ``fid-stats`` and ``fid`` commands to ``sub`` (an argparse subparsers object)."""
    from .fid import FEATURE_DIMS, REDUCTIONS
    from .fid_protocol import PROTOCOLS
    from .temperature import HELP, TemperatureSchedule, temperature_arg
    p = sub.add_parser("fid-stats", help="Inception statistics of a data set for FID (.npz, pytorch-fid format)")
    p.add_argument("--dataset", required=True, help="data set name (as for training)")
    p.add_argument("--data", default=None, help="folder holding the data set's files")
    p.add_argument("--split", "--splits", dest="split", default=None, metavar="train|test|train,test",
                   help="split(s), merged in that order (default: as the official script, train,test for "
                        "celebahq256 and omniglot, train for the others)")
    p.add_argument("--image-size", type=count, default=None,
                   help="side of the images for resizable data sets (default: the data set's); use the model's")
    p.add_argument("--inception-weights", default=None, metavar="PATH", help=_FID_WEIGHTS_HELP)
    p.add_argument("--output", "-o", required=True, help="statistics file to write (.npz)")
    p.add_argument("--max-images", type=count, default=None, help="use only the first N images")
    p.add_argument("--subset-seed", type=int, default=None, metavar="SEED",
                   help="with --max-images N: N images drawn at random (seeded) instead of the first N")
    p.add_argument("--dims", type=int, default=2048, choices=FEATURE_DIMS,
                   help="Inception features (2048: standard FID)")
    p.add_argument("--batch-size", type=count, default=50)
    p.add_argument("--num-workers", type=non_negative, default=0, help="data loader worker processes")
    p.add_argument("--device", type=device, default="cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_fid_stats)

    p = sub.add_parser("fid", help="FID of the model's images against data statistics (JSON)")
    p.add_argument("checkpoint", help="run directory, our checkpoint, or an official checkpoint")
    p.add_argument("--stats", required=True, help="data statistics from nvae fid-stats (or pytorch-fid's .npz)")
    p.add_argument("--inception-weights", default=None, metavar="PATH", help=_FID_WEIGHTS_HELP)
    p.add_argument("--protocol", choices=PROTOCOLS, default=None,
                   help="official: draw at t=1, feed the means of p(x|z), -t only for --readjust-bn; ours: draw at "
                        "-t, feed samples (Bernoulli means for binary data). Default: official for a checkpoint "
                        "of the official code, ours otherwise")
    p.add_argument("-n", "--num-samples", type=count, default=50000, help="number of images (default 50000)")
    p.add_argument("--temperature", "-t", type=temperature_arg, default=TemperatureSchedule.constant(1.0),
                   help=HELP + " (default 1.0)")
    p.add_argument("--readjust-bn", action="store_true",
                   help="re-estimate the decoder's BN statistics at -t first (cached beside the checkpoint)")
    p.add_argument("--readjust-steps", type=count, default=500)
    p.add_argument("--readjust-batch", type=count, default=None,
                   help="samples per re-adjustment step (default: 2 official, 36 ours as nvae sample)")
    p.add_argument("--batch-size", type=count, default=100, help="images per batch (a batch's seed: --seed, index)")
    p.add_argument("--reduction", choices=REDUCTIONS, default="pooled",
                   help="under torchrun: pooled = statistics of all images (any number of processes gives the "
                        "same), average = mean of the processes' statistics (the official code's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=device, default="cpu",
                   help="torch device; under torchrun cuda means cuda:LOCAL_RANK")
    p.add_argument("--dist-timeout", type=positive, default=5.0, metavar="MINUTES",
                   help="under torchrun: how long a process waits for the others")
    p.add_argument("--output", default=None, help="JSON path (default: beside the checkpoint)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_weights_arg(p)
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
    _add_weights_arg(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("kl-stats", help="average KL and active units per latent group (JSON and bar plot)")
    _add_eval_data_args(p)
    p.add_argument("--batch-size", type=count, default=64)
    p.add_argument("--max-images", type=count, default=None)
    p.add_argument("--output", default=None, help="path stem for .json and .png (default: beside the checkpoint)")
    _add_weights_arg(p)
    p.set_defaults(func=_cmd_kl_stats)


def _add_image_parsers(sub) -> None:
    """Add the commands that draw images to ``sub`` (an argparse subparsers object)."""
    from .temperature import HELP, temperature_arg, temperatures_arg
    p = sub.add_parser("sample", help="sample images from the prior (PNG grid and .npz, or .npz chunks for large -n)")
    p.add_argument("checkpoint", help="run directory, our checkpoint, or an official checkpoint")
    p.add_argument("-n", type=count, default=64,
                   help="number of samples; more than --batch: numbered .npz chunks in samples_T/, resumable")
    p.add_argument("--batch", type=count, default=100, help="samples per chunk (the official evaluation: 100)")
    p.add_argument("--temperature", "-t", type=temperature_arg, default=None, help=HELP + " (default 1.0)")
    p.add_argument("--temperatures", type=temperatures_arg, default=None,
                   help="several temperatures, one output each: 0.6,0.8,1 or specs separated by ';' "
                        "(0.7;linear:0.6:1)")
    p.add_argument("--per-group-temperature", type=temperature_arg, default=None,
                   help="comma-separated, one per latent group, top group first (same as -t with a list)")
    p.add_argument("--dtype", choices=["float32", "uint8"], default="float32",
                   help="chunk arrays: float32 in [0, 1] (as the official evaluation) or uint8 (as the PNGs)")
    p.add_argument("--readjust-bn", action="store_true", help="re-estimate decoder BN statistics at t (cached)")
    p.add_argument("--readjust-steps", type=count, default=500)
    p.add_argument("--seed", type=non_negative, default=0, help="chunk i draws from a generator seeded by (seed, i)")
    p.add_argument("--out", default=None, help="output folder (default: beside the checkpoint)")
    p.add_argument("--device", type=device, default="cpu",
                   help="torch device; under torchrun cuda means cuda:LOCAL_RANK")
    p.add_argument("--dist-timeout", type=positive, default=5.0, metavar="MINUTES",
                   help="under torchrun: how long a process waits for the others")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_weights_arg(p)
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("reconstruct", help="inputs beside their reconstructions (PNG)")
    _add_eval_data_args(p)
    p.add_argument("-n", type=count, default=32, help="number of inputs")
    p.add_argument("--temperature", "-t", type=temperature, default=None,
                   help="posterior temperature: 0 = posterior means (default), 1 = posterior samples; "
                        "with --keep-groups: the prior temperature of the other groups (default 1)")
    p.add_argument("--keep-groups", default=None, metavar="K,K,...",
                   help="one grid: the inputs, then per K a row with the first K groups (coarsest first) at their "
                        "posterior means and the rest from the prior at -t")
    p.add_argument("--output", default=None, help="PNG path (default: beside the checkpoint)")
    _add_weights_arg(p)
    p.set_defaults(func=_cmd_reconstruct)

    p = sub.add_parser("interpolate", help="decode the line between two inputs' latents (PNG row)")
    _add_eval_data_args(p)
    p.add_argument("--a", type=non_negative, default=0, help="index of the first image in the split")
    p.add_argument("--b", type=non_negative, default=1, help="index of the second image")
    p.add_argument("--steps", type=count, default=8)
    p.add_argument("--groups", default=None, help="comma-separated latent groups to interpolate (default: all)")
    p.add_argument("--output", default=None, help="PNG path (default: beside the checkpoint)")
    _add_weights_arg(p)
    p.set_defaults(func=_cmd_interpolate)


# ------------------------------------------------------------------------------------ report
def _parse_temperatures(text: str) -> list:
    try:
        return [temperature(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"temperatures must be comma-separated finite numbers >= 0, got {text!r}") from None


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import ReportOptions, write_report
    keep = None
    if args.keep_groups:
        try:
            keep = tuple(non_negative(k) for k in args.keep_groups.split(",") if k.strip())
        except ValueError:
            raise ValueError(f"--keep-groups must be comma-separated integers >= 0, got {args.keep_groups!r}") from None
    options = ReportOptions(temperatures=tuple(_parse_temperatures(args.samples_temperatures)),
                            draw_images=args.images, data=args.data, dataset=args.dataset, split=args.split,
                            num_samples=args.n, num_inputs=args.inputs, keep_groups=keep,
                            partial_temperature=args.partial_temperature, kl_images=args.kl_images,
                            seed=args.seed, device=args.device, progress=args.progress, weights=args.weights)
    print(f"writing the report of {args.run} ...", file=sys.stderr)
    out = write_report(args.run, args.output, options)
    print(f"wrote {out}")
    return 0


def _add_report_parsers(sub) -> None:
    """Add the ``report`` command to ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser("report", help="one self-contained HTML page of a run (configs, curves, evaluations, images)")
    p.add_argument("run", help="run directory (or a checkpoint in one)")
    p.add_argument("--output", "-o", default=None, help="HTML path (default: RUN/report.html)")
    p.add_argument("--samples-temperatures", default="0.6,0.8,1.0", metavar="T1,T2,...",
                   help="prior temperatures of the sample grids drawn now (comma-separated)")
    p.add_argument("--no-images", dest="images", action="store_false",
                   help="run nothing through the model: show only the PNGs (and kl_stats JSON) the run holds")
    p.add_argument("--data", default=None, help="folder holding the data set (default: the one the run recorded)")
    p.add_argument("--dataset", default=None, help="data set name (default: the one the run was trained on)")
    p.add_argument("--split", default="test", choices=["train", "test"],
                   help="split for reconstructions, partial posteriors and KL statistics")
    p.add_argument("-n", type=count, default=36, help="samples per temperature")
    p.add_argument("--inputs", type=count, default=8, help="inputs for reconstructions and partial posteriors")
    p.add_argument("--keep-groups", default=None, metavar="K1,K2,...",
                   help="partial-posterior rows: groups kept from q(z|x), coarsest first (default 0,1,2,4,...,all)")
    p.add_argument("--partial-temperature", type=temperature, default=0.8,
                   help="prior temperature of the groups not kept")
    p.add_argument("--kl-images", type=count, default=512, help="images for the KL and active-units statistics")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=device, default="cpu")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    _add_weights_arg(p)
    p.set_defaults(func=_cmd_report)


# ------------------------------------------------------------------ data preparation
def _cmd_data_build(args: argparse.Namespace) -> int:
    from .data import build_official_lmdbs
    counts = build_official_lmdbs(args.kind, args.source, args.out, seed=args.seed, num_train=args.num_train,
                                  progress=not args.no_progress, commit_every=args.commit_every)
    for name, n in counts.items():
        print(f"{args.out}/{name}.lmdb: {n} records")
    print(f"train with: nvae train --preset {args.kind} --data {args.out}")
    return 0


def _add_data_parsers(sub) -> None:
    """Add ``nvae data build KIND SOURCE OUT`` (the official LMDBs from downloaded data) to ``sub``."""
    from .data import BUILD_KINDS
    group = sub.add_parser("data", help="prepare data sets (nvae data build ...)")
    data_sub = group.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    p = data_sub.add_parser("build", help="write the official train.lmdb / validation.lmdb from downloaded data "
                                          "(resumable: run it again after a kill)")
    p.add_argument("kind", choices=BUILD_KINDS)
    p.add_argument("source", help="celeba64: torchvision's CelebA root (celeba/img_align_celeba, "
                                  "list_eval_partition.txt); ffhq256 / celebahq256: the image folder; "
                                  "imagenet32: the folder of train_data_batch_1..10.npz and val_data.npz")
    p.add_argument("out", help="output folder: give it to nvae train --data")
    p.add_argument("--seed", type=int, default=0, help="ffhq256: seed of the stored train/validation permutation")
    p.add_argument("--num-train", type=count, default=None,
                   help="ffhq256 / celebahq256: images in train.lmdb (default 9/10: 63,000 / 27,000)")
    p.add_argument("--commit-every", type=count, default=1000, metavar="N",
                   help="records per LMDB transaction (a killed build resumes after the last one)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_data_build)


# ------------------------------------------------------------------ latents: encode, decode, partial posteriors
def _parse_keep_groups(text: str) -> List[int]:
    try:
        keep = [non_negative(k) for k in text.split(",") if k.strip()]
    except ValueError:
        keep = []
    if not keep:
        raise ValueError(f"--keep-groups takes comma-separated group counts >= 0 (e.g. 0,1,2,4), got {text!r}")
    return keep


def _cmd_partial_posterior(args: argparse.Namespace) -> int:
    """``nvae reconstruct --keep-groups``: one grid, the inputs row and one row per K."""
    import torch

    from .checkpoint import save_png
    from .data import prepare_batch
    from .latents import partial_posterior_grid
    from .runs import check_output
    keep = _parse_keep_groups(args.keep_groups)
    t = 1.0 if args.temperature is None else args.temperature
    model, ckpt, weights = _load(args)
    print(f"{weights} weights of {ckpt}")
    out = check_output(args.output or ckpt.with_name(f"partial_posterior_{args.split}_t{t:g}.png"), ".png")
    _, data = _eval_data(args, ckpt, model)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    x = torch.stack([data[i][0] for i in range(min(args.n, len(data)))]).to(args.device)
    grid = partial_posterior_grid(model, prepare_batch(x, model.config, gen), keep, t, gen)
    save_png(grid.flatten(0, 1), out, nrow=grid.shape[1])
    print(f"wrote {out}: rows are the inputs, then for K = {','.join(map(str, keep))} the first K of "
          f"{model.num_groups} groups from q(z|x) (means) and the rest from the prior at t={t:g}")
    return 0


def _cmd_encode(args: argparse.Namespace) -> int:
    """``nvae encode``: one process, or each process of a torchrun job with its share; rank 0 writes."""
    from datetime import timedelta

    from .distributed import init_distributed, waiting_for_peers
    from .latents import EncodeConfig, encode_dataset
    from .runs import check_output, split_of
    if args.temperature is not None and not args.sample:
        raise ValueError("-t is the temperature of posterior samples; add --sample (without it the posterior "
                         "means are stored)")
    if args.kl_threshold is not None and not args.active_only:
        raise ValueError("--kl-threshold chooses the channels --active-only keeps; add --active-only")
    config = EncodeConfig(sample=args.sample, temperature=1.0 if args.temperature is None else args.temperature,
                          active_only=args.active_only,
                          kl_threshold=0.1 if args.kl_threshold is None else args.kl_threshold,
                          batch_size=args.batch_size, max_images=args.max_images, seed=args.seed)
    ctx = init_distributed(args.device, timeout=timedelta(minutes=args.dist_timeout))
    try:
        model, ckpt, weights = _load(args, str(ctx.device))
        output = check_output(args.output or ckpt.with_name(f"latents_{args.split}.npz"), ".npz")
        dataset, data = split_of(ckpt, model.config, args.split, args.dataset, args.data, flip=False)
        identity = {"checkpoint": str(ckpt.resolve()), "weights": weights, "dataset": dataset, "split": args.split}
        with waiting_for_peers("the encoding", ctx):
            path = encode_dataset(model, data, output, config, dist_ctx=ctx, progress=args.progress,
                                  identity=identity)
        if ctx.is_main:
            from .latents import load_latents
            latents = load_latents(path)
            kept = "/".join(str(len(k)) for k in latents.channels)
            print(f"wrote {path}: {latents.num_images} images of {dataset} ({args.split}), "
                  f"{'posterior samples at t=%g' % config.temperature if config.sample else 'posterior means'}, "
                  f"channels kept per group {kept}")
    finally:
        ctx.close()
    return 0


def _cmd_decode(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .checkpoint import save_png
    from .latents import decode, decode_to_file, load_latents
    from .runs import check_output, load_weights
    latents = load_latents(args.latents)
    checkpoint = args.checkpoint or latents.meta.get("checkpoint")
    if checkpoint is None:
        raise ValueError(f"{args.latents} does not record the checkpoint that encoded it; pass --checkpoint RUN")
    source = Path(args.latents)
    png = check_output(args.output or source.with_name(f"{source.stem}_decoded.png"), ".png")
    npz = check_output(png.with_suffix(".npz"), ".npz")
    if npz.resolve() == source.resolve():
        raise ValueError(f"the decoded images would replace the latents {source}; choose another --output")
    # the weights that encoded the file unless --raw-weights says otherwise
    model = load_weights(checkpoint, args.device, latents.meta.get("weights", "auto") if args.weights == "auto"
                         else args.weights).model
    if args.max_images is not None:
        latents = latents.first(args.max_images)
    decode_to_file(model, latents, npz, args.batch_size, args.allow_other_model, progress=args.progress)
    shown = decode(model, latents.first(args.grid), args.batch_size, args.allow_other_model)
    save_png(shown, png, nrow=max(1, int(len(shown) ** 0.5)))
    print(f"wrote {npz} ({latents.num_images} images, the mean of p(x|z)) and {png} (the first {len(shown)})")
    return 0


def _add_latents_parsers(sub) -> None:
    """Add ``encode`` and ``decode`` to ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser("encode", help="the posterior latents of a split, per group, to one .npz")
    _add_eval_data_args(p)
    p.add_argument("--output", "-o", default=None, help=".npz path (default: latents_SPLIT.npz beside the checkpoint)")
    p.add_argument("--sample", action="store_true", help="store posterior samples instead of the posterior means")
    p.add_argument("--temperature", "-t", type=temperature, default=None,
                   help="with --sample: the posterior temperature (default 1)")
    p.add_argument("--active-only", action="store_true",
                   help="store only the channels whose average KL over the encoded images exceeds --kl-threshold")
    p.add_argument("--kl-threshold", type=temperature, default=None, metavar="NATS",
                   help="with --active-only: nats per channel (default 0.1, the active-unit threshold of kl-stats)")
    p.add_argument("--max-images", type=count, default=None, help="encode only the first N images")
    p.add_argument("--batch-size", "--batch", type=count, default=64)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--dist-timeout", type=positive, default=5.0, metavar="MINUTES",
                   help="under torchrun: how long a process waits for the others")
    _add_weights_arg(p)
    p.set_defaults(func=_cmd_encode)

    p = sub.add_parser("decode", help="images back from an `nvae encode` file (PNG grid and .npz)")
    p.add_argument("latents", help="the .npz written by nvae encode")
    p.add_argument("--checkpoint", default=None, help="run directory or checkpoint (default: the one recorded in "
                                                      "the file); other weights than the encoder's are refused")
    p.add_argument("--output", "-o", default=None,
                   help="PNG path; the .npz of all images goes beside it (default: LATENTS_decoded.png)")
    p.add_argument("--max-images", type=count, default=None, help="decode only the first N rows")
    p.add_argument("--grid", type=count, default=64, help="images shown in the PNG (the .npz holds all)")
    p.add_argument("--batch-size", type=count, default=64)
    p.add_argument("--allow-other-model", action="store_true",
                   help="decode even when the checkpoint's weights are not the ones that encoded the file")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--device", type=device, default="cpu")
    _add_weights_arg(p)
    p.set_defaults(func=_cmd_decode)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nvae", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_training_parsers(sub)
    _add_evaluation_parsers(sub)
    _add_image_parsers(sub)
    add_fid_parsers(sub)
    _add_report_parsers(sub)
    _add_data_parsers(sub)
    _add_latents_parsers(sub)
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
