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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nvae", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("presets", help="list the architecture presets")
    p.add_argument("--count", action="store_true", help="also build each model and count its parameters")
    p.set_defaults(func=_cmd_presets)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        if args.debug:
            raise
        print(f"nvae: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
