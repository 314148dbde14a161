"""``nvae sample`` (one grid, or chunks for many samples), ``nvae reconstruct`` (and its partial-posterior
grid), ``nvae interpolate``."""
from __future__ import annotations

import argparse
from typing import List

from .common import (add_eval_data_args, add_weights_arg, count, device, eval_data, load, non_negative, positive)


def _sample_temperatures(args: argparse.Namespace) -> list:
    """The schedules asked for by -t, --temperatures or --per-group-temperature (one of them; default 1.0)."""
    from ..analysis.temperature_schedule import TemperatureSchedule
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

    from ..formats.checkpoint import model_fingerprint
    from ..distributed import init_distributed, waiting_for_peers
    from ..model.network import per_group
    temps = _sample_temperatures(args)
    ctx = init_distributed(args.device, timeout=timedelta(minutes=args.dist_timeout))
    try:
        model, ckpt, kind, _ = load(args, str(ctx.device))
        if ctx.is_main:
            print(f"{kind} weights of {ckpt}")
        for t in temps:   # a list of the wrong length fails here, before anything is drawn or written
            per_group(t, model.num_groups)
        weights = model_fingerprint(model)   # of the checkpoint, before any BN re-adjustment
        # BN re-adjustment changes buffers only: each temperature starts again from the checkpoint's
        stored_buffers = {name: b.clone() for name, b in model.named_buffers()} if args.readjust_bn else None
        for t in temps:
            with waiting_for_peers("sampling", ctx):
                _sample_one(args, ctx, model, (ckpt, kind, stored_buffers), t, weights)
    finally:
        ctx.close()
    return 0


def _sample_one(args, ctx, model, source, t, weights: str) -> None:
    """Samples at ``t`` of ``model``, read from ``source`` = (checkpoint path, "ema" or "raw", the buffers it
    held), whose weights' fingerprint is ``weights``."""
    from pathlib import Path

    import torch

    from ..analysis.bulk_samples import BulkConfig, broadcast_decoder_bn, draw_chunk, sample_to_chunks
    from ..model.network import per_group
    from ..analysis.sampling import readjust_bn_cached, save_samples, temperature_name
    ckpt, kind, stored_buffers = source
    progress = ctx.is_main and not args.no_progress
    readjust = None
    if args.readjust_bn:
        # statistics of the checkpoint (the same weights: the cache is keyed by their fingerprint)
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(stored_buffers[name])
        gen = torch.Generator(device=ctx.device).manual_seed(args.seed)
        # EMA and raw statistics cached side by side: checkpoint.bn_* and checkpoint_ema.bn_*
        cache = ckpt if kind == "raw" else ckpt.with_name(f"{ckpt.stem}_ema{ckpt.suffix}")
        cached = readjust_bn_cached(model, cache, t, args.readjust_steps, generator=gen, progress=progress)
        broadcast_decoder_bn(model, ctx)
        readjust = {"temperature": per_group(t, model.num_groups), "steps": args.readjust_steps}
        if ctx.is_main:
            print(f"BN statistics for t={t}: {'from cache' if cached else 're-adjusted and cached'}")
    means = args.means or model.config.decoder == "bernoulli" or not any(per_group(t, model.num_groups))
    what = "p(x|z)'s means" if means else "draws of p(x|z) (pixel noise at temperature 1; --means for its means)"
    out = Path(args.out or ckpt.parent)
    name = f"samples_{temperature_name(t)}{'_means' if args.means else ''}"
    config = BulkConfig(args.n, args.batch, t, args.seed, args.dtype, mean=True if args.means else None)
    if args.n <= args.batch:   # one batch: the grid and one .npz (array images), as ever
        if ctx.is_main:
            png, npz = save_samples(draw_chunk(model, config, 0), out, name)
            print(f"wrote {png} and {npz}: {what}")
        return
    result = sample_to_chunks(model, out / name, config, ctx, progress,
                              identity={"weights_sha256": weights, "readjust_bn": readjust})
    if ctx.is_main:
        print(f"wrote {result.out_dir} ({result.num_chunks} chunks of up to {args.batch} samples; this process drew "
              f"{result.drawn}, found {result.kept} already written) and the grid {result.grid}: {what}")


def _cmd_reconstruct(args: argparse.Namespace) -> int:
    import torch

    from ..formats.checkpoint import VIEWING_SIDE, save_png
    from ..data import prepare_batch
    from ..training.run_dir import check_output
    from ..analysis.sampling import reconstructions
    if args.keep_groups is not None:
        return _cmd_partial_posterior(args)
    t = args.temperature
    if t is not None and t.kind != "constant":
        raise ValueError(f"-t {t} is a per-group schedule: it sets the prior temperature of --keep-groups grids; "
                         "a reconstruction takes one posterior temperature")
    t = 0.0 if t is None else t.values[0]
    model, ckpt, weights, source = load(args)
    print(f"{weights} weights of {ckpt}")
    out = check_output(args.output or ckpt.with_name(f"reconstructions_{args.split}_t{t:g}.png"), ".png")
    _, data = eval_data(args, source, model)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    x = torch.stack([data[i][0] for i in range(min(args.n, len(data)))]).to(args.device)
    pairs = reconstructions(model, prepare_batch(x, model.config, gen), t, gen)
    save_png(pairs, out, nrow=2 * max(1, int((len(x) // 2) ** 0.5)), min_side=VIEWING_SIDE)
    print(f"wrote {out} (each input beside its reconstruction)")
    return 0


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

    from ..formats.checkpoint import VIEWING_SIDE, save_png
    from ..data import prepare_batch
    from ..analysis.latent_export import partial_posterior_grid
    from ..training.run_dir import check_output
    from ..analysis.sampling import temperature_name
    from ..analysis.temperature_schedule import TemperatureSchedule
    keep = _parse_keep_groups(args.keep_groups)
    t = TemperatureSchedule.constant(1.0) if args.temperature is None else args.temperature
    model, ckpt, weights, source = load(args)
    print(f"{weights} weights of {ckpt}")
    t.resolve(model.num_groups)   # a list of the wrong length fails here, before anything is written
    name = f"partial_posterior_{args.split}_{temperature_name(t)}.png"
    out = check_output(args.output or ckpt.with_name(name), ".png")
    _, data = eval_data(args, source, model)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    x = torch.stack([data[i][0] for i in range(min(args.n, len(data)))]).to(args.device)
    grid = partial_posterior_grid(model, prepare_batch(x, model.config, gen), keep, t, gen)
    save_png(grid.flatten(0, 1), out, nrow=grid.shape[1], min_side=VIEWING_SIDE)
    print(f"wrote {out}: rows are the inputs, then for K = {','.join(map(str, keep))} the first K of "
          f"{model.num_groups} groups from q(z|x) (means) and the rest from the prior at t={t}")
    return 0


def _cmd_interpolate(args: argparse.Namespace) -> int:
    import torch

    from ..formats.checkpoint import VIEWING_SIDE, save_png
    from ..data import prepare_batch
    from ..training.run_dir import check_output
    from ..analysis.sampling import interpolation
    model, ckpt, weights, source = load(args)
    print(f"{weights} weights of {ckpt}")
    out = check_output(args.output or ckpt.with_name(f"interpolation_{args.a}_{args.b}.png"), ".png")
    _, data = eval_data(args, source, model)
    for i in (args.a, args.b):
        if not 0 <= i < len(data):
            raise ValueError(f"image index {i} is outside the {args.split} split (0..{len(data) - 1})")
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    x = prepare_batch(torch.stack([data[args.a][0], data[args.b][0]]).to(args.device), model.config, gen)
    groups = [int(g) for g in args.groups.split(",")] if args.groups else None
    row = interpolation(model, x[:1], x[1:], args.steps, groups).float().cpu()
    save_png(row, out, nrow=len(row), min_side=VIEWING_SIDE)
    print(f"wrote {out}: input {args.a}, {args.steps} decoded step{'s' if args.steps != 1 else ''}, input {args.b}")
    return 0


def add_parsers(sub) -> None:
    """Add the commands that draw images to ``sub`` (an argparse subparsers object)."""
    from ..analysis.temperature_schedule import HELP, temperature_arg, temperatures_arg
    p = sub.add_parser("sample", help="sample images from the prior (PNG grid and .npz, or .npz chunks for large -n)")
    p.add_argument("checkpoint", help="run directory, our checkpoint, or an official checkpoint")
    p.add_argument("-n", type=count, default=64,
                   help="number of samples; more than --batch: numbered .npz chunks in samples_T/, resumable")
    p.add_argument("--batch", type=count, default=100,
                   help="samples per chunk (default 100, the official sample mode's batch; the chunk files are ours)")
    p.add_argument("--temperature", "-t", type=temperature_arg, default=None,
                   help=HELP + " (default 1.0). It scales the latents' sigma only: colour images keep p(x|z)'s "
                   "pixel noise; at 0 nothing is random (prior means, then p(x|z)'s mean)")
    p.add_argument("--temperatures", type=temperatures_arg, default=None,
                   help="several temperatures, one output each: 0.6,0.8,1 or specs separated by ';' "
                        "(0.7;linear:0.6:1)")
    p.add_argument("--per-group-temperature", type=temperature_arg, default=None,
                   help="comma-separated, one per latent group, top group first (same as -t with a list)")
    p.add_argument("--dtype", choices=["float32", "uint8"], default="float32",
                   help="chunk arrays: float32 in [0, 1] or uint8 (as the PNGs)")
    p.add_argument("--means", action="store_true",
                   help="show and store p(x|z)'s means (smooth images, as training's samples.png) instead of draws "
                        "of it (pixel noise; the default but for binary data, which always shows means)")
    p.add_argument("--readjust-bn", action="store_true",
                   help="re-estimate decoder BN statistics at t (cached): ours, --readjust-steps batches of 36 in "
                        "float32 (the official sample mode: 500 of 16 under float16 autocast)")
    p.add_argument("--readjust-steps", type=count, default=500)
    p.add_argument("--seed", type=non_negative, default=0, help="chunk i draws from a generator seeded by (seed, i)")
    p.add_argument("--out", default=None, help="output folder (default: beside the checkpoint)")
    p.add_argument("--device", type=device, default="cpu",
                   help="torch device; under torchrun cuda means cuda:LOCAL_RANK")
    p.add_argument("--dist-timeout", type=positive, default=5.0, metavar="MINUTES",
                   help="under torchrun: how long a process waits for the others")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_weights_arg(p)
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("reconstruct", help="inputs beside their reconstructions (PNG)")
    add_eval_data_args(p)
    p.add_argument("-n", type=count, default=32, help="number of inputs")
    p.add_argument("--temperature", "-t", type=temperature_arg, default=None,
                   help="posterior temperature: 0 = posterior means (default), 1 = posterior samples; "
                        "with --keep-groups: the prior temperature of the other groups (default 1), which may "
                        "be a schedule: " + HELP)
    p.add_argument("--keep-groups", default=None, metavar="K,K,...",
                   help="one grid: the inputs, then per K a row with the first K groups (coarsest first) at their "
                        "posterior means and the rest from the prior at -t")
    p.add_argument("--output", default=None, help="PNG path (default: beside the checkpoint)")
    add_weights_arg(p)
    p.set_defaults(func=_cmd_reconstruct)

    p = sub.add_parser("interpolate", help="decode the line between two inputs' latents (PNG row)")
    add_eval_data_args(p)
    p.add_argument("--a", type=non_negative, default=0, help="index of the first image in the split")
    p.add_argument("--b", type=non_negative, default=1, help="index of the second image")
    p.add_argument("--steps", type=count, default=8)
    p.add_argument("--groups", default=None, help="comma-separated latent groups to interpolate (default: all)")
    p.add_argument("--output", default=None, help="PNG path (default: beside the checkpoint)")
    add_weights_arg(p)
    p.set_defaults(func=_cmd_interpolate)
