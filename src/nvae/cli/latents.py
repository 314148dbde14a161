"""``nvae encode`` and ``nvae decode``: latents to and from .npz."""
from __future__ import annotations

import argparse

from .common import add_eval_data_args, add_weights_arg, count, device, load, positive, temperature


def _cmd_encode(args: argparse.Namespace) -> int:
    """``nvae encode``: one process, or each process of a torchrun job with its share; rank 0 writes."""
    from datetime import timedelta

    from ..distributed import init_distributed, waiting_for_peers
    from ..analysis.latent_export import EncodeConfig, encode_dataset
    from ..training.run_dir import check_output, split_of
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
        model, ckpt, weights, source = load(args, str(ctx.device))
        output = check_output(args.output or ckpt.with_name(f"latents_{args.split}.npz"), ".npz")
        dataset, data = split_of(source, model.config, args.split, args.dataset, args.data, flip=False)
        identity = {"checkpoint": str(ckpt.resolve()), "weights": weights, "dataset": dataset, "split": args.split}
        with waiting_for_peers("the encoding", ctx):
            path = encode_dataset(model, data, output, config, dist_ctx=ctx, progress=args.progress,
                                  identity=identity)
        if ctx.is_main:
            from ..analysis.latent_export import load_latents
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

    from ..formats.checkpoint import VIEWING_SIDE, save_png
    from ..analysis.latent_export import decode, decode_to_file, load_latents
    from ..training.run_dir import check_output, load_weights
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
    save_png(shown, png, nrow=max(1, int(len(shown) ** 0.5)), min_side=VIEWING_SIDE)
    print(f"wrote {npz} ({latents.num_images} images, the mean of p(x|z)) and {png} (the first {len(shown)})")
    return 0


def add_parsers(sub) -> None:
    """Add ``encode`` and ``decode`` to ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser("encode", help="the posterior latents of a split, per group, to one .npz")
    add_eval_data_args(p)
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
    add_weights_arg(p)
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
    add_weights_arg(p)
    p.set_defaults(func=_cmd_decode)
