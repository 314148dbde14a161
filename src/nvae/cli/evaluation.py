"""``nvae eval`` and ``nvae kl-stats``."""
from __future__ import annotations

import argparse
import sys

from .common import add_eval_data_args, add_weights_arg, count, device, eval_data, load, non_negative, positive


def _cmd_eval(args: argparse.Namespace) -> int:
    """One process, or each process of a torchrun job with its share of the batches; rank 0 reports.

    Partial sums go to NAME.partial.json beside the output every --save-every batches;
    --resume continues from there (refusing a file from other arguments) and gives the
    numbers an uninterrupted run gives. Without --resume such a file is replaced.
    """
    import json

    from datetime import timedelta

    from ..distributed import init_distributed, waiting_for_peers
    from ..analysis.likelihood import EvalConfig, PartialFile, evaluate, partial_path_for
    from ..training.run_dir import check_output, write_json
    # torchrun: gloo on CPU, nccl on cuda:LOCAL_RANK
    ctx = init_distributed(args.device, timeout=timedelta(minutes=args.dist_timeout))
    try:
        model, ckpt, weights, source = load(args, str(ctx.device))
        dataset, data = eval_data(args, source, model)
        output = check_output(args.output or ckpt.with_name(f"eval_{args.split}_K{args.num_samples}.json"), ".json")
        partial = partial_path_for(output) if args.save_every else None
        if args.resume and partial is None:
            raise ValueError("--resume continues from partial sums, which --save-every 0 turns off")
        config = EvalConfig(num_samples=args.num_samples, batch_size=args.batch_size, max_batch=args.max_batch,
                            max_images=args.max_images, seed=args.seed, save_every=args.save_every or 10,
                            compile=args.compile)
        resumable = PartialFile(partial, args.resume, {"dataset": dataset, "split": args.split}) if partial else None
        with waiting_for_peers("the evaluation", ctx):
            result = evaluate(model, data, config, dist_ctx=ctx, partial=resumable,
                              progress=ctx.is_main and args.progress)
        if ctx.is_main:
            out = {"checkpoint": str(ckpt), "weights": weights, "dataset": dataset, "split": args.split,
                   "seed": args.seed,
                   # which file and how many images of it: e.g. the official validation.lmdb, not test.lmdb
                   "data_source": getattr(data, "source_description", None), **result.to_dict()}
            write_json(output, out)
            print(json.dumps(out, indent=2))
            print(f"wrote {output}", file=sys.stderr)   # stderr: stdout stays one JSON document
    finally:
        ctx.close()
    return 0


def _cmd_kl_stats(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from ..analysis.likelihood import kl_statistics, plot_kl_stats
    from ..training.run_dir import check_output, write_json
    model, ckpt, weights, source = load(args)
    print(f"{weights} weights of {ckpt}")
    stem = Path(args.output or ckpt.with_name(f"kl_stats_{args.split}"))
    check_output(stem.with_suffix(".json"), ".json"), check_output(stem.with_suffix(".png"), ".png")
    dataset, data = eval_data(args, source, model)
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


def add_parsers(sub) -> None:
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
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the pass over each chunk of samples: the same samples, the same numbers up to "
                        "rounding; the first chunks wait for the compiler")
    add_weights_arg(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("kl-stats", help="average KL and active units per latent group (JSON and bar plot)")
    add_eval_data_args(p)
    p.add_argument("--batch-size", type=count, default=64)
    p.add_argument("--max-images", type=count, default=None)
    p.add_argument("--output", default=None, help="path stem for .json and .png (default: beside the checkpoint)")
    add_weights_arg(p)
    p.set_defaults(func=_cmd_kl_stats)
