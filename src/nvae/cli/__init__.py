"""The ``nvae`` command line: a thin layer over the library."""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from . import data, evaluation, fid, images, latents, report, training
from .common import Parser


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="nvae", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for commands in (training, evaluation, images, fid, report, data, latents):
        commands.add_parsers(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:   # a usage error (one line already said) or --help: the status, as every command
        return e.code if isinstance(e.code, int) else 2
    try:
        status = args.func(args)
        sys.stdout.flush()   # here, where a closed pipe is handled below, not at exit
        return status
    except KeyboardInterrupt:
        print("nvae: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (``nvae presets | head``): not an error of ours. Point
        # stdout at /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, OSError) as e:
        if args.debug:
            raise
        print(f"nvae: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from ..distributed import PeerFailure
        from ..training.skip_guard import TrainingDiverged
        if args.debug or not isinstance(e, (TrainingDiverged, PeerFailure)):
            raise
        print(f"nvae: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
