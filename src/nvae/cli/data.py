"""``nvae data build``: the official LMDBs from downloaded data."""
from __future__ import annotations

import argparse
import shlex

from .common import Parser, count


def _cmd_data_build(args: argparse.Namespace) -> int:
    from ..data import build_official_lmdbs
    counts = build_official_lmdbs(args.kind, args.source, args.out, seed=args.seed, num_train=args.num_train,
                                  progress=not args.no_progress, commit_every=args.commit_every)
    for name, n in counts.items():
        print(f"{args.out}/{name}.lmdb: {n} records")
    print(f"train with: nvae train --preset {args.kind} --data {shlex.quote(str(args.out))}")
    return 0


def add_parsers(sub) -> None:
    """Add ``nvae data build KIND SOURCE OUT`` (the official LMDBs from downloaded data) to ``sub``."""
    from ..data import BUILD_KINDS
    group = sub.add_parser("data", help="prepare data sets (nvae data build ...)")
    data_sub = group.add_subparsers(dest="data_command", required=True, parser_class=Parser)
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
