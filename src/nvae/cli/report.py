"""``nvae report``: one HTML page per run."""
from __future__ import annotations

import argparse
import sys

from .common import add_weights_arg, count, device, non_negative, temperature


def _parse_temperatures(text: str) -> list:
    try:
        return [temperature(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"temperatures must be comma-separated finite numbers >= 0, got {text!r}") from None


def _cmd_report(args: argparse.Namespace) -> int:
    from ..analysis.report import ReportOptions, write_report
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


def add_parsers(sub) -> None:
    """Add the ``report`` command to ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser("report", help="one self-contained HTML page of a run (curves, images, evaluations, configs)")
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
    add_weights_arg(p)
    p.set_defaults(func=_cmd_report)
