"""Temperature schedules: one prior temperature per latent group (Efficient-VDVAE's ``temperature_settings``).

A schedule is written as text in one of three forms:

* ``0.7``: every group at 0.7 (the paper's low-temperature sampling);
* ``linear:0.6:0.9``: a ramp over the groups, from 0.6 at group 0 to 0.9 at the last group;
* ``1,1,0.8,0.6``: one value per group.

Groups are counted in decoder order, the order in which ``NVAE.top_down`` samples them:
group 0 is the top of the hierarchy (the coarsest scale, drawn first from ``h0``), the last
group is the finest scale. :meth:`TemperatureSchedule.resolve` turns a schedule into that
per-group list once the model's number of groups is known; the model accepts a schedule
wherever it accepts a temperature.
"""
from __future__ import annotations

import argparse
import hashlib
import math
from dataclasses import dataclass
from typing import List, Tuple

#: The number format of every value, for messages and the argparse type's name.
NUMBER = "finite non-negative number"
#: Lists longer than this are named by a digest in file names (a name per value would grow past 255 bytes).
_NAMED_VALUES = 8


def _value(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"invalid {NUMBER} {text.strip()!r}: temperatures must be finite numbers >= 0")
    return value


@dataclass(frozen=True)
class TemperatureSchedule:
    """A per-group temperature: ``kind`` is ``constant`` (``values`` = (t,)), ``linear``
    (``values`` = (first, last)) or ``list`` (one value per group, decoder order)."""

    kind: str
    values: Tuple[float, ...]

    def __post_init__(self):
        sizes = {"constant": 1, "linear": 2}
        if self.kind not in ("constant", "linear", "list"):
            raise ValueError(f"unknown temperature schedule kind {self.kind!r}; use constant, linear or list")
        if self.kind in sizes and len(self.values) != sizes[self.kind]:
            raise ValueError(f"a {self.kind} temperature takes {sizes[self.kind]} value(s), got {len(self.values)}")
        if not self.values:
            raise ValueError("a temperature list needs at least one value")
        for v in self.values:
            _value(str(v))

    @classmethod
    def constant(cls, t: float) -> "TemperatureSchedule":
        """Every group at ``t``."""
        return cls("constant", (float(t),))

    def resolve(self, num_groups: int) -> List[float]:
        """One temperature per group, group 0 (the top, coarsest) first.

        A linear ramp over one group is its first value. A list must have exactly
        ``num_groups`` values; the error names the count.
        """
        if self.kind == "constant":
            return [self.values[0]] * num_groups
        if self.kind == "linear":
            first, last = self.values
            if num_groups == 1:
                return [first]
            return [first + (last - first) * g / (num_groups - 1) for g in range(num_groups)]
        if len(self.values) != num_groups:
            raise ValueError(f"the temperature list {self} has {len(self.values)} values but the model has "
                             f"{num_groups} latent groups; give {num_groups} comma-separated values (group 0 = top "
                             "of the hierarchy first) or a ramp such as linear:0.6:0.9")
        return list(self.values)

    @property
    def name(self) -> str:
        """A file-name-safe name: ``t0.7``, ``tlin0.6-0.9``, ``t1-0.9-0.8``, or ``tlist-<digest>`` for long lists."""
        if self.kind == "constant":
            return f"t{self.values[0]:g}"
        if self.kind == "linear":
            return "tlin" + "-".join(f"{v:g}" for v in self.values)
        if len(self.values) > _NAMED_VALUES:
            return "tlist-" + hashlib.sha256(str(self).encode()).hexdigest()[:12]
        return "t" + "-".join(f"{v:g}" for v in self.values)

    def __str__(self) -> str:
        """The schedule as :func:`parse_temperature` reads it."""
        if self.kind == "linear":
            return "linear:" + ":".join(f"{v:g}" for v in self.values)
        return ",".join(f"{v:g}" for v in self.values)


def parse_temperature(text: str) -> TemperatureSchedule:
    """Read one schedule: ``0.7``, ``linear:FIRST:LAST`` or a comma list (one value per group).

    Raises ``ValueError`` naming what is wrong and the accepted forms.
    """
    text = str(text).strip()
    forms = "give a number (0.7), a ramp over the groups (linear:0.6:0.9) or one value per group (1,0.9,0.8)"
    if not text:
        raise ValueError(f"empty temperature; {forms}")
    if ":" in text:
        kind, *rest = text.split(":")
        if kind.strip().lower() not in ("linear", "lin") or len(rest) != 2:
            raise ValueError(f"temperature {text!r} is not a known schedule; {forms}")
        return TemperatureSchedule("linear", tuple(_value(v) for v in rest))
    if "," in text:
        parts = text.split(",")
        if any(not p.strip() for p in parts):
            raise ValueError(f"temperature list {text!r} has an empty entry; {forms}")
        return TemperatureSchedule("list", tuple(_value(p) for p in parts))
    return TemperatureSchedule.constant(_value(text))


def parse_temperatures(text: str) -> List[TemperatureSchedule]:
    """Several schedules, separated by ``;`` (``0.7;linear:0.6:1``).

    Without a ``;`` or a ``:``, a comma list means several plain temperatures
    (``0.6,0.8,1``: three schedules), as ``nvae sample --temperatures`` always read it;
    write ``1,0.9,0.8;`` for a single per-group list.
    """
    text = str(text).strip()
    if ";" not in text and ":" not in text:
        return [TemperatureSchedule.constant(_value(v)) for v in text.split(",") if v.strip()] or \
            [parse_temperature(text)]
    return [parse_temperature(part) for part in text.split(";") if part.strip()]


def temperature_arg(text: str) -> TemperatureSchedule:
    """argparse type for one schedule (``-t``/``--temperature``): a bad spec is a usage error naming it."""
    try:
        return parse_temperature(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def temperatures_arg(text: str) -> List[TemperatureSchedule]:
    """argparse type for several schedules separated by ``;`` (see :func:`parse_temperatures`)."""
    try:
        return parse_temperatures(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


#: The help text commands show for a temperature option.
HELP = ("prior temperature: a number (0.7), a ramp over the latent groups (linear:0.6:0.9) or one value per group "
        "(1,0.9,...); groups in decoder order, group 0 = the top (coarsest) group, sampled first")
