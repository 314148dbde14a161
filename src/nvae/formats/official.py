"""Loading checkpoints written by the official NVlabs/NVAE code.

An official checkpoint is a ``torch.save`` dict whose ``args`` is an
``argparse.Namespace``; it is read with ``weights_only=True`` and exactly that
class on the allow-list. Its entries are matched to ours by name
(:func:`nvae.formats.keymap.key_map`: each of our modules knows its official name from its
role in the network), and checked both ways: every official tensor is used once,
every one of ours is filled, shapes are equal; the first mismatch is named.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, Union

import torch

from .checkpoint import CheckpointError, safe_load
from ..config import ARCH_INSTANCES, NVAEConfig
from .keymap import key_map

_GREY = {"mnist", "omniglot"}
_CROPPED = {"mnist", "omniglot", "stacked_mnist"}
_SIZES = {"mnist": 32, "omniglot": 32, "stacked_mnist": 32, "cifar10": 32, "ffhq": 256}

# Official entries with no counterpart: ``weight_normalized`` is an alias of
# ``weight`` that the official convs without weight norm register by accident.
_OFFICIAL_ALIASES = (".weight_normalized",)


def config_from_args(args: Union[argparse.Namespace, dict]) -> NVAEConfig:
    """The :class:`NVAEConfig` of an official ``train.py`` argument namespace."""
    a = dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args)
    dataset = a.get("dataset", "")
    if dataset in _SIZES:
        size = _SIZES[dataset]
    elif dataset.split("_")[-1].isdigit():
        size = int(dataset.split("_")[-1])
    else:
        raise CheckpointError(f"official dataset {dataset!r} is unknown; its image size cannot be inferred")
    grey = dataset in _GREY
    num_mix = int(a.get("num_mixture_dec", 10))
    decoder = "bernoulli" if grey else ("normal" if num_mix == 1 else "mixture")
    arch = a.get("arch_instance", "res_mbconv")
    if arch not in ARCH_INSTANCES:
        raise CheckpointError(f"official arch_instance {arch!r} is not supported (known: "
                              f"{', '.join(sorted(ARCH_INSTANCES))}); 'res_mbconv9' is broken in the official code")
    try:
        return NVAEConfig(
            image_size=size, in_channels=1 if grey else 3,
            num_channels_enc=a["num_channels_enc"], num_channels_dec=a["num_channels_dec"],
            num_latent_scales=a["num_latent_scales"], num_groups_per_scale=a["num_groups_per_scale"],
            ada_groups=bool(a.get("ada_groups", False)), min_groups_per_scale=a.get("min_groups_per_scale", 1),
            num_preprocess_blocks=a["num_preprocess_blocks"], num_preprocess_cells=a["num_preprocess_cells"],
            num_postprocess_blocks=a["num_postprocess_blocks"], num_postprocess_cells=a["num_postprocess_cells"],
            num_cell_per_cond_enc=a["num_cell_per_cond_enc"], num_cell_per_cond_dec=a["num_cell_per_cond_dec"],
            num_latent_per_group=a["num_latent_per_group"], num_nf=a.get("num_nf", 0), decoder=decoder,
            num_mixture_dec=num_mix, num_x_bits=a.get("num_x_bits", 8), use_se=bool(a.get("use_se", False)),
            res_dist=bool(a.get("res_dist", False)), arch_instance=arch,
            crop_output=2 if dataset in _CROPPED else 0)
    except KeyError as e:
        raise CheckpointError(f"official args lack {e}; is this an NVAE train.py checkpoint?") from None
    except ValueError as e:
        raise CheckpointError(f"the official configuration cannot be represented: {e}") from None


def convert_state_dict(official: Dict[str, torch.Tensor], model) -> Dict[str, torch.Tensor]:
    """The official state dict under ``model``'s keys, checked both ways by name and shape.

    Our entries the official code does not store (power-iteration vectors, data-init
    flags) are left out; ``load_state_dict(..., strict=False)`` keeps ours for them.
    """
    names = key_map(model, "official")
    theirs = {k: v for k, v in official.items() if not k.endswith(_OFFICIAL_ALIASES)}
    ours = model.state_dict()
    missing = [(o, t) for o, t in names.items() if t not in theirs]
    if missing:
        o, t = missing[0]
        raise CheckpointError(f"the official checkpoint lacks {t} (our {o}) and {len(missing) - 1} more; "
                              "the checkpoint and its args disagree")
    unused = sorted(set(theirs) - set(names.values()))
    if unused:
        raise CheckpointError(f"official entry {unused[0]} (and {len(unused) - 1} more) has no counterpart in the "
                              "model its args describe; the checkpoint and its args disagree")
    for o, t in names.items():
        if tuple(theirs[t].shape) != tuple(ours[o].shape):
            raise CheckpointError(f"official entry {t} {tuple(theirs[t].shape)} does not match {o} "
                                  f"{tuple(ours[o].shape)}")
    return {o: theirs[t] for o, t in names.items()}


def load_official(cls, path: Union[str, Path], map_location="cpu"):
    """A model of class ``cls`` (:class:`~nvae.NVAE`) in eval mode from an official checkpoint."""
    ckpt = safe_load(path, map_location, allowed_globals=[argparse.Namespace])
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "args" not in ckpt:
        raise CheckpointError(f"{path} is not an official NVAE checkpoint (no 'state_dict' and 'args')")
    return official_model(cls, ckpt).to(map_location).eval()


def official_model(cls, ckpt: dict):
    """A model of class ``cls`` holding the weights of ``ckpt``, an official checkpoint's dict as read."""
    model = cls(config_from_args(ckpt["args"]))
    model.load_state_dict(convert_state_dict(ckpt["state_dict"], model), strict=False)
    # The official code keeps no record of data-dependent initialisation; a trained
    # checkpoint has had it, so it must not run again on the next batch.
    for name, buf in model.named_buffers():
        if name.endswith(".init_done"):
            buf.fill_(True)
    return model


#: Official ``--dataset`` names and our data sets.
OFFICIAL_DATASETS = {"mnist": "mnist", "cifar10": "cifar10", "celeba_64": "celeba64", "imagenet_32": "imagenet32",
                     "celeba_256": "celebahq256", "ffhq": "ffhq256"}
# The official code's other data sets (datasets.py): Omniglot, Stacked MNIST and LSUN '<category>_<size>'.
OFFICIAL_DATASETS.update({"omniglot": "omniglot", "stacked_mnist": "stacked_mnist"})
OFFICIAL_DATASETS.update({f"lsun_{c}_{n}": f"lsun_{c}{n}" for c in ("church", "bedroom", "tower")
                          for n in (64, 128, 256)})
