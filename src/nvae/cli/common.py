"""Option types, the one-line-error parser and the helpers every command shares."""
from __future__ import annotations

import argparse
import math
import re



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


class Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr and exit status 2, like every other error of the command."""

    def error(self, message: str):
        self.exit(2, f"nvae: error: {message} (see {self.prog} --help)\n")

    def format_help(self) -> str:
        """The help as plain text: descriptions taken from docstrings lose their reStructuredText markup."""
        return plain_text(super().format_help())


def plain_text(text: str) -> str:
    """``text`` without reStructuredText inline markup: ````literal```` and ``:role:`target``` become their
    contents (a role's ``~`` prefix dropped); single backticks, a plain-text way to quote a command, stay."""
    text = re.sub(r":[a-z]+(?::[a-z]+)?:`~?([^`]+)`", r"\1", text)
    return re.sub(r"``(.+?)``", r"\1", text, flags=re.S)


def add_weights_arg(p: argparse.ArgumentParser) -> None:
    """``--raw-weights``, for every command that reads a model back."""
    p.add_argument("--raw-weights", dest="weights", action="store_const", const="raw", default="auto",
                   help="use the weights as trained, even when the run kept an EMA of them (default: the EMA "
                        "when there is one)")


def load(args: argparse.Namespace, device=None):
    """``(model, checkpoint path, "ema" or "raw", the checkpoint as read)`` of ``args.checkpoint``, as
    ``--raw-weights`` asks (:class:`~nvae.training.run_dir.LoadedModel`): the file is read once."""
    from ..training.run_dir import load_weights
    return load_weights(args.checkpoint, device or args.device, getattr(args, "weights", "auto"))


def add_eval_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="run directory, our checkpoint, or an official checkpoint")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--dataset", default=None, help="data set name (default: the one the run was trained on)")
    p.add_argument("--data", default=None,
                   help="folder holding the data set's files (default: the folder the run was trained on)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=device, default="cpu")


def eval_data(args, source, model):
    """``(data set name, split)`` the command evaluates on (the checkpoint's unless --dataset / --data)."""
    from ..training.run_dir import split_of
    return split_of(source, model.config, args.split, args.dataset, args.data)
