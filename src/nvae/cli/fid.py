"""``nvae fid-stats`` and ``nvae fid``."""
from __future__ import annotations

import argparse
import sys

from .common import add_weights_arg, count, device, load, non_negative, positive


_FID_WEIGHTS_HELP = ("local copy of pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
                     "(required; nothing is downloaded)")


def cmd_fid_stats(args: argparse.Namespace) -> int:
    """``nvae fid-stats``: Inception statistics of a data set's reference images, written to ``--output``.

    ``--protocol ours`` (default): every image of the split(s), in order, as stored.
    ``--protocol official``: the images of the official ``precompute_fid_statistics.py``, drawn with ``--seed``
    (:func:`nvae.analysis.fid_protocol.official_reference_dataset`). How they were chosen is printed and
    stored in the file (``meta``).
    """
    from ..analysis.fid import NO_WEIGHTS_MESSAGE, FIDError, InceptionFeatures, dataset_statistics, save_statistics
    from ..analysis.fid_protocol import (OFFICIAL_BINARISED, OFFICIAL_STATS_BATCH, OFFICIAL_STATS_IMAGES,
                                         official_reference_dataset, stats_dataset, stats_splits)

    if args.inception_weights is None:
        raise FIDError(NO_WEIGHTS_MESSAGE)
    if not str(args.output).endswith(".npz"):
        raise FIDError(f"--output must end in .npz (pytorch-fid recognises statistics by it), got {args.output}")
    if args.max_images is not None and args.max_images < 2:
        raise FIDError(f"--max-images must be at least 2, got {args.max_images}")
    official = args.protocol == "official"
    if official:
        for given, name in ((args.split, "--split"), (args.subset_seed, "--subset-seed")):
            if given is not None:
                raise FIDError(f"{name} is not taken under --protocol official, whose images are the official "
                               "script's (its splits, a shuffled loader seeded by --seed); drop it or use "
                               "--protocol ours")
    elif args.subset_seed is not None and args.max_images is None:
        raise FIDError("--subset-seed picks --max-images N images at random; give --max-images too")
    inception = InceptionFeatures(args.inception_weights, args.device, args.dims)
    if official:
        batch = args.batch_size or OFFICIAL_STATS_BATCH
        limit = OFFICIAL_STATS_IMAGES if args.max_images is None else args.max_images
        splits = stats_splits(args.dataset)          # the official script's: train (+ validation for two sets)
        data = official_reference_dataset(args.dataset, args.data, args.image_size, args.seed, batch, limit)
        n = len(data)
        info = {"protocol": "official", "seed": args.seed, "dataset": args.dataset, "splits": list(splits),
                "images": n, "loader_batch_size": batch, "drop_last": True, "max_images": limit,
                "training_transforms": True, "binarised": args.dataset in OFFICIAL_BINARISED}
        mu, sigma = dataset_statistics(data, inception, batch_size=batch, num_workers=args.num_workers,
                                       progress=not args.no_progress)
        how = (f"official protocol, seed {args.seed}: shuffled, batches of {batch} without the last partial "
               f"training batch, training transforms{', binarised' if info['binarised'] else ''}")
    else:
        batch = args.batch_size or 50
        splits = stats_splits(args.dataset, args.split)
        data = stats_dataset(args.dataset, splits, args.data, args.image_size)
        mu, sigma = dataset_statistics(data, inception, batch_size=batch, max_images=args.max_images,
                                       num_workers=args.num_workers, progress=not args.no_progress,
                                       subset_seed=args.subset_seed)
        n = len(data) if args.max_images is None else min(args.max_images, len(data))
        info = {"protocol": "ours", "dataset": args.dataset, "splits": list(splits), "images": n,
                "max_images": args.max_images, "subset_seed": args.subset_seed}
        how = "our protocol: " + ("in order" if args.subset_seed is None else f"a subset seeded {args.subset_seed}")
    out = save_statistics(args.output, mu, sigma, info={**info, "dims": args.dims})
    print(f"wrote {out}: {args.dims} Inception features of {n} images of {args.dataset} ({'+'.join(splits)}), {how}")
    return 0


def _fid_protocol(args: argparse.Namespace, num_groups: int, source):
    """The :class:`~nvae.analysis.fid_protocol.FIDProtocol` the arguments ask for (its default from the checkpoint)."""
    from ..analysis.fid_protocol import FIDProtocol, default_protocol
    t = args.temperature
    # A schedule becomes its per-group list (a plain number stays one), so the JSON and file names can hold it.
    t = t.values[0] if t.kind == "constant" else t.resolve(num_groups)
    return FIDProtocol(name=args.protocol or default_protocol(source), temperature=t,
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

    from ..distributed import init_distributed, waiting_for_peers
    from ..analysis.fid import FEATURE_DIMS, NO_WEIGHTS_MESSAGE, FIDError, InceptionFeatures, file_sha256, load_statistics
    from ..analysis.fid_protocol import default_output_name, protocol_fid
    from ..training.run_dir import check_output, write_json

    if args.inception_weights is None:
        raise FIDError(NO_WEIGHTS_MESSAGE)
    mu, sigma = load_statistics(args.stats)
    if mu.shape[0] not in FEATURE_DIMS:
        raise FIDError(f"{args.stats} holds {mu.shape[0]} features; Inception gives one of {FEATURE_DIMS}")
    ctx = init_distributed(args.device, timeout=timedelta(minutes=args.dist_timeout))
    try:
        inception = InceptionFeatures(args.inception_weights, ctx.device, dims=mu.shape[0])
        model, ckpt, weights, source = load(args, str(ctx.device))
        protocol = _fid_protocol(args, model.num_groups, source)
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
    _add_fid_stats_parser(sub)
    _add_fid_parser(sub)


def _add_fid_stats_parser(sub) -> None:
    from ..analysis.fid import FEATURE_DIMS
    from ..analysis.fid_protocol import PROTOCOLS
    p = sub.add_parser("fid-stats", help="Inception statistics of a data set for FID (.npz, pytorch-fid format)")
    p.add_argument("--dataset", required=True, help="data set name (as for training)")
    p.add_argument("--data", default=None, help="folder holding the data set's files")
    p.add_argument("--protocol", choices=PROTOCOLS, default="ours",
                   help="ours (default): every image of the split(s), in order, as stored; official: the images of "
                        "the official precompute_fid_statistics.py: the training loader shuffled (seeded by --seed), "
                        "with its random flips, batches of --batch-size (64) without the last partial one, MNIST "
                        "and Omniglot binarised, the validation split after it for celebahq256 and omniglot, the "
                        "first --max-images (50000)")
    p.add_argument("--seed", type=non_negative, default=0,
                   help="under --protocol official: seeds the shuffling, flips and binarisation (default 0)")
    p.add_argument("--split", "--splits", dest="split", default=None, metavar="train|test|train,test",
                   help="--protocol ours: split(s), merged in that order (default: the official script's, "
                        "train,test for celebahq256 and omniglot, train for the others)")
    p.add_argument("--image-size", type=count, default=None,
                   help="side of the images for resizable data sets (default: the data set's); use the model's")
    p.add_argument("--inception-weights", default=None, metavar="PATH", help=_FID_WEIGHTS_HELP)
    p.add_argument("--output", "-o", required=True, help="statistics file to write (.npz)")
    p.add_argument("--max-images", type=count, default=None,
                   help="use only the first N images (default: all; 50000 under --protocol official)")
    p.add_argument("--subset-seed", type=int, default=None, metavar="SEED",
                   help="--protocol ours with --max-images N: N images drawn at random (seeded) instead of the first N")
    p.add_argument("--dims", type=int, default=2048, choices=FEATURE_DIMS,
                   help="Inception features (2048: standard FID)")
    p.add_argument("--batch-size", type=count, default=None,
                   help="images per batch (default 50; 64 under --protocol official, where it is also the "
                        "loader's batch whose last partial training batch is dropped)")
    p.add_argument("--num-workers", type=non_negative, default=0, help="data loader worker processes")
    p.add_argument("--device", type=device, default="cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_fid_stats)


def _add_fid_parser(sub) -> None:
    from ..analysis.fid import REDUCTIONS
    from ..analysis.fid_protocol import PROTOCOLS
    from ..analysis.temperature_schedule import HELP, TemperatureSchedule, temperature_arg
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
                   help="samples per re-adjustment step (default: 2 official, as its evaluate_fid mode, under "
                        "float16 autocast on CUDA; 36 ours, as nvae sample, in float32)")
    p.add_argument("--batch-size", type=count, default=100, help="images per batch (a batch's seed: --seed, index)")
    p.add_argument("--reduction", choices=REDUCTIONS, default=None,
                   help="under torchrun: pooled = statistics of all images (any number of processes gives the "
                        "same), average = mean of the processes' statistics (the official code's). Default: "
                        "average under --protocol official, pooled under ours")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=device, default="cpu",
                   help="torch device; under torchrun cuda means cuda:LOCAL_RANK")
    p.add_argument("--dist-timeout", type=positive, default=5.0, metavar="MINUTES",
                   help="under torchrun: how long a process waits for the others")
    p.add_argument("--output", default=None, help="JSON path (default: beside the checkpoint)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_weights_arg(p)
    p.set_defaults(func=cmd_fid)


add_parsers = add_fid_parsers   # the name every command module of this package gives it
