"""Where each module of an :class:`~nvae.NVAE` sits under other names: the official code's
state dict, and our checkpoint format 1 (nvae 0.1's flat towers).

:func:`layout` walks a model's modules in the official code's registration order and
names each three ways; :func:`key_map` turns that into a map from every one of our
state-dict keys to its key in the other layout, by the role of the module that holds
it, never by its position. Loading checks the map both ways (:mod:`nvae.formats.official`,
:mod:`nvae.formats.checkpoint`).
"""
from __future__ import annotations

from collections import Counter
from typing import Dict, Iterator, List, NamedTuple, Optional

import torch.nn as nn

from ..model.cells import Cell, InvertedResidual, ResConv
from ..model.flows import PairedFlowCell
from ..model.layers import UpsampleSkip

SCHEMES = ("official", "format1")


class Place(NamedTuple):
    """One module (or, for ``h0``, one parameter) and its prefix in each layout."""

    official: str
    format1: str
    ours: str
    module: Optional[nn.Module]


#: Per section of :meth:`~nvae.model.network.NVAE.official_order`: the official and the format-1 prefix of its
#: ``i``-th module.
_SECTION_NAMES = {
    "h0": lambda i: ("prior_ftr0", "h0"),
    "stem": lambda i: ("stem", "stem"),
    "preprocess": lambda i: (f"pre_process.{i}", f"preprocess.{i}"),
    "encoder_tower": lambda i: (f"enc_tower.{i}", f"encoder_tower.{i}"),
    "encoder0": lambda i: ("enc0.1", "encoder0.conv"),
    "posterior_heads": lambda i: (f"enc_sampler.{i}", f"posterior_heads.{i}"),
    "prior_heads": lambda i: (f"dec_sampler.{i}.1", f"prior_heads.{i}.conv"),
    "flows": lambda i: (f"nf_cells.{i}", f"flows.{i}"),
    "decoder_tower": lambda i: (f"dec_tower.{i}", f"decoder_tower.{i}"),
    "postprocess": lambda i: (f"post_process.{i}", f"postprocess.{i}"),
    "output_head": lambda i: ("image_conditional.1", "output_head.conv"),
}


def layout(model) -> List[Place]:
    """The model's modules in the official registration order, each with its three prefixes."""
    places, counts = [], Counter()
    for section, ours, module in model.official_order():
        official, format1 = _SECTION_NAMES[section](counts[section])
        counts[section] += 1
        places.append(Place(official, format1, ours, module))
    return places


def modules_in_official_order(model) -> Iterator[nn.Module]:
    """The model's modules in the official code's (and format 1's) registration order."""
    return (p.module for p in layout(model) if p.module is not None)


# ------------------------------------------------------ inside a module, officially
def _official_op(op: nn.Module, child: str) -> str:
    """The official name of ``child`` (an attribute name) of one of a cell's operations."""
    if isinstance(op, ResConv):
        if child == "conv":
            return "conv_0"
        # Official BN + Swish is one module; official BN + ELU is wrapped for synchronised BN.
        return "bn_act" if op.activation is nn.functional.silu else "bn.bn"
    if isinstance(op, InvertedResidual):
        o = 1 if op.upsample else 0   # the official Sequential starts with its up-sampling layer
        return {"bn_in": f"conv.{o}.bn", "expand": f"conv.{o + 1}.conv.0", "bn_expand": f"conv.{o + 1}.conv.1",
                "depthwise": f"conv.{o + 2}.conv.0", "bn_depthwise": f"conv.{o + 2}.conv.1",
                "project": f"conv.{o + 3}", "bn_out": f"conv.{o + 4}.bn"}[child]
    raise TypeError(f"no official name for an operation of type {type(op).__name__}")


def _official_suffix(module: Optional[nn.Module], suffix: str) -> str:
    parts = suffix.split(".")
    if isinstance(module, Cell):
        if parts[0] == "skip" and isinstance(module.skip, UpsampleSkip):
            return ".".join(["skip", "1"] + parts[2:])
        if parts[0] == "ops":
            op = module.ops[int(parts[1])]
            return ".".join(["_ops", parts[1], _official_op(op, parts[2])] + parts[3:])
    if isinstance(module, PairedFlowCell):
        inner = {"conv": "conv.convz.0", "depthwise": "conv.convz.2", "mu": "mu.conv_0"}[parts[1]]
        return ".".join([parts[0], inner] + parts[2:])
    return suffix


def key_map(model, scheme: str) -> Dict[str, str]:
    """Every state-dict key of ``model`` that the ``scheme`` layout has -> its key there.

    ``official`` leaves out what the official code does not store (the data-init flags
    and the power-iteration vectors); ``format1`` maps everything.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown layout {scheme!r}; choose one of {SCHEMES}")
    out = {}
    for place in layout(model):
        theirs = getattr(place, scheme)
        if place.module is None:
            out[place.ours] = theirs
            continue
        for suffix in place.module.state_dict():
            if scheme == "official":
                if suffix.endswith("init_done"):
                    continue
                out[f"{place.ours}.{suffix}"] = f"{theirs}.{_official_suffix(place.module, suffix)}"
            else:
                out[f"{place.ours}.{suffix}"] = f"{theirs}.{suffix}"
    if scheme == "format1":
        out.update({k: k for k in model.spectral.state_dict(prefix="spectral.")})
    return out
