"""Typed architecture configuration of NVAE, with the official presets.

Field names follow the official ``train.py`` flags so that a researcher who
knows the paper's command lines recognises every knob.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

DECODERS = ("bernoulli", "mixture", "normal")


def groups_per_scale(num_scales: int, num_groups: int, adaptive: bool, minimum: int = 1) -> Tuple[int, ...]:
    """Latent groups at each scale, finest first (the encoder's order).

    With ``adaptive`` the count halves at every coarser scale, floored at ``minimum``.
    """
    groups, n = [], num_groups
    for _ in range(num_scales):
        groups.append(n)
        if adaptive:
            n = max(minimum, n // 2)
    return tuple(groups)


#: The cell roles of the network, in the order data meets them: pre-process, encoder,
#: decoder, post-process; ``down_*`` halve the resolution, ``up_*`` double it.
CELL_ROLES = ("normal_pre", "down_pre", "normal_enc", "down_enc", "normal_dec", "up_dec", "normal_post", "up_post")


def cell_roles(roles) -> Tuple[str, ...]:
    """``roles`` (names, or one comma-separated string) as a tuple, checked against :data:`CELL_ROLES`."""
    roles = tuple(r.strip() for r in roles.split(",")) if isinstance(roles, str) else tuple(roles)
    unknown = sorted(set(roles) - set(CELL_ROLES))
    if not roles or unknown:
        raise ValueError(f"unknown cell role(s) {unknown or list(roles)}; choose from {sorted(CELL_ROLES)}")
    return roles


def _table(enc: List[str], dec: List[str], pre: List[str], post: List[str]) -> Dict[str, List[str]]:
    return {"normal_enc": enc, "down_enc": enc, "normal_dec": dec, "up_dec": dec,
            "normal_pre": pre, "down_pre": pre, "normal_post": post, "up_post": post}


_RES = ["res_bnswish", "res_bnswish"]
_SEP6, _SEP3 = ["mconv_e6k5g0"], ["mconv_e3k5g0"]

#: The official ``utils.get_arch_cells`` tables: cell role -> operation names.
ARCH_INSTANCES: Dict[str, Dict[str, List[str]]] = {
    "res_mbconv": _table(_RES, _SEP6, _RES, _SEP3),
    "res_bnswish": _table(_RES, _RES, _RES, _RES),
    "res_elu": _table(*[["res_elu", "res_elu"]] * 4),
    "res_bnelu": _table(*[["res_bnelu", "res_bnelu"]] * 4),
    "mbconv_res": _table(_SEP6, _RES, _SEP3, _RES),
    "mbconv_sep": _table(_SEP6, _SEP6, _SEP3, _SEP3),
    "mbconv_sep11": _table(["mconv_e6k11g0"], ["mconv_e6k11g0"], _SEP3, _SEP3),
    "mbconv_den": _table(_SEP6, _SEP6, ["mconv_e3k5g8"], ["mconv_e3k5g8"]),
    "res53_mbconv": _table(["res_bnswish5", "res_bnswish"], _SEP6, ["res_bnswish5", "res_bnswish"], _SEP3),
    "res35_mbconv": _table(["res_bnswish", "res_bnswish5"], _SEP6, ["res_bnswish", "res_bnswish5"], _SEP3),
    "res55_mbconv": _table(["res_bnswish5", "res_bnswish5"], _SEP6, ["res_bnswish5", "res_bnswish5"], _SEP3),
}


def check_field_types(config) -> None:
    """Every field of the dataclass ``config`` holds a value of its declared kind, numbers finite:
    what a JSON file or an override brings is checked before anything uses it."""
    for f in dataclasses.fields(config):
        value, kind = getattr(config, f.name), str(f.type)
        if value is None:
            if "Optional" not in kind:
                raise ValueError(f"{f.name} must not be empty (null); give a value or leave the field out")
            continue
        base = kind.replace("Optional[", "").rstrip("]")
        if base == "bool" and not isinstance(value, bool):
            raise ValueError(f"{f.name} must be true or false, got {value!r}")
        if base in ("int", "float") and (isinstance(value, bool) or not isinstance(value, (int, float))
                                         or (base == "int" and not isinstance(value, int))):
            raise ValueError(f"{f.name} must be {'a whole number' if base == 'int' else 'a number'}, got {value!r}")
        if base == "float" and not math.isfinite(value):
            raise ValueError(f"{f.name} must be a finite number, got {value!r}")
        if base == "str" and not isinstance(value, str):
            raise ValueError(f"{f.name} must be a string, got {value!r}")


def _config_dict(data, what: str) -> dict:
    if not isinstance(data, dict):
        raise ValueError(f"a {what} must be a JSON object of fields, got {type(data).__name__}")
    return data


@dataclass(frozen=True)
class NVAEConfig:
    """Every architecture option of NVAE (paper, Section 3 and Figures 2-3).

    Use :meth:`preset` for the paper's configurations and
    ``dataclasses.replace(config, ...)`` to override a field.
    """

    image_size: int = 32
    in_channels: int = 1
    num_channels_enc: int = 32
    num_channels_dec: int = 32
    num_latent_scales: int = 2
    num_groups_per_scale: int = 10
    ada_groups: bool = True
    min_groups_per_scale: int = 1
    num_preprocess_blocks: int = 2
    num_preprocess_cells: int = 3
    num_postprocess_blocks: int = 2
    num_postprocess_cells: int = 3
    num_cell_per_cond_enc: int = 2
    num_cell_per_cond_dec: int = 2
    num_latent_per_group: int = 20
    num_nf: int = 0
    decoder: str = "bernoulli"
    num_mixture_dec: int = 10
    num_x_bits: int = 8
    use_se: bool = True
    res_dist: bool = True
    arch_instance: str = "res_mbconv"
    # Pixels dropped from each border before summing log p(x|z): MNIST is padded
    # 28 -> 32 and the paper reports the likelihood of the original 28x28.
    crop_output: int = 0
    # The official mixture gives the open upper tail to every x > 0.99, which at
    # 8 bits includes the value 254 too; only for reproducing official numbers.
    official_edge: bool = False

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def groups_per_scale(self) -> Tuple[int, ...]:
        """Groups per scale, finest scale first."""
        return groups_per_scale(self.num_latent_scales, self.num_groups_per_scale,
                                self.ada_groups, self.min_groups_per_scale)

    @property
    def num_groups(self) -> int:
        return sum(self.groups_per_scale)

    @property
    def downsampling(self) -> int:
        """Total spatial reduction between the input and the coarsest latent scale."""
        return 2 ** (self.num_preprocess_blocks + self.num_latent_scales - 1)

    @property
    def num_output_channels(self) -> int:
        """Channels of the output head: the parameters of p(x|z)."""
        if self.decoder == "bernoulli":
            return self.in_channels
        if self.decoder == "normal":
            return 2 * self.in_channels
        if self.in_channels == 3:
            # per pixel: M logits, then per colour M means, M log-scales, M coefficients
            return 10 * self.num_mixture_dec
        return 3 * self.num_mixture_dec

    @property
    def num_data_dims(self) -> int:
        """Sub-pixels that enter the likelihood (after the crop): the bits/dim divisor."""
        side = self.image_size - 2 * self.crop_output
        return self.in_channels * side * side

    def validate(self) -> None:
        """Raise ``ValueError`` naming the problem and the fix."""
        check_field_types(self)
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {self.decoder!r}")
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {self.in_channels}")
        if self.decoder == "mixture" and self.num_mixture_dec < 1:
            raise ValueError("num_mixture_dec must be >= 1 for the mixture decoder")
        if not 1 <= self.num_x_bits <= 8:
            raise ValueError(f"num_x_bits must be in 1..8, got {self.num_x_bits}")
        for name in ("num_channels_enc", "num_channels_dec", "num_latent_scales", "num_groups_per_scale",
                     "num_latent_per_group", "num_preprocess_cells", "num_postprocess_cells"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_preprocess_blocks", "num_postprocess_blocks", "num_cell_per_cond_enc",
                     "num_cell_per_cond_dec", "num_nf", "crop_output"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.num_groups < 2:
            raise ValueError("NVAE needs at least two latent groups (the official 'vanilla VAE' "
                             "special case with one group is not supported); raise num_groups_per_scale")
        if self.image_size % self.downsampling:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by 2^(num_preprocess_blocks + "
                f"num_latent_scales - 1) = {self.downsampling}; pad or resize the images, or use fewer "
                "pre-process blocks or latent scales")
        if self.num_preprocess_blocks != self.num_postprocess_blocks:
            raise ValueError("num_preprocess_blocks and num_postprocess_blocks must be equal so the "
                             "decoder returns to the input resolution")
        if 2 * self.crop_output >= self.image_size:
            raise ValueError(f"crop_output {self.crop_output} leaves no pixels of a {self.image_size} image")
        if self.arch_instance not in ARCH_INSTANCES:
            raise ValueError(f"unknown arch_instance {self.arch_instance!r}; "
                             f"choose one of {sorted(ARCH_INSTANCES)}")

    # -------------------------------------------------------------- serialising
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "NVAEConfig":
        data = _config_dict(data, "model config")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown NVAEConfig fields {unknown}; is this config from a newer nvae?")
        return cls(**data)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "NVAEConfig":
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        return cls.from_dict(json.loads(text))

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides) -> "NVAEConfig":
        """The official configuration ``name`` (see :data:`PRESETS`), with overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


def parse_overrides(items: Sequence[str], cls) -> dict:
    """``KEY=VALUE`` strings (as ``nvae train --model`` / ``--train`` take them) -> typed field values of the
    dataclass ``cls``, ready for ``dataclasses.replace``; ``none`` sets an ``Optional`` field to None."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"bad override {item!r}: expected KEY=VALUE with KEY one of {sorted(fields)}")
        kind = str(fields[key].type)
        try:
            if "Optional" in kind and value.lower() == "none":
                out[key] = None
            elif "bool" in kind:
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                out[key] = value.lower() in ("true", "1", "yes")
            elif "int" in kind:
                out[key] = int(value)
            elif "float" in kind:
                out[key] = float(value)
            else:
                out[key] = value
        except ValueError:
            raise ValueError(f"override {key}={value!r}: expected a value of type {kind}") from None
    return out


def _preset(**kw) -> NVAEConfig:
    return NVAEConfig(**kw)


_MNIST = dict(image_size=32, in_channels=1, decoder="bernoulli", crop_output=2,
              num_latent_scales=2, ada_groups=True, num_preprocess_blocks=2, num_preprocess_cells=3,
              num_postprocess_blocks=2, num_postprocess_cells=3, num_cell_per_cond_enc=2,
              num_cell_per_cond_dec=2, num_nf=0)
_RGB = dict(in_channels=3, decoder="mixture", num_mixture_dec=10, num_preprocess_blocks=1,
            num_preprocess_cells=2, num_postprocess_blocks=1, num_postprocess_cells=2,
            num_cell_per_cond_enc=2, num_cell_per_cond_dec=2)
_HQ = dict(_RGB, image_size=256, num_channels_enc=30, num_channels_dec=30, num_latent_scales=5,
           num_groups_per_scale=16, ada_groups=True, min_groups_per_scale=4, num_nf=2, num_x_bits=5)

#: The paper's configurations (paper, Table 1 and its appendix's hyper-parameter table; the official README's commands) plus ``mnist_small``, a
#: 16-channel MNIST model used in tests and CPU benchmarks, and ``digits``, a
#: small model of scikit-learn's bundled 8x8 digits (the default, no download).
PRESETS = {
    "mnist": _preset(**_MNIST, num_channels_enc=32, num_channels_dec=32, num_groups_per_scale=10),
    "mnist_small": _preset(**_MNIST, num_channels_enc=16, num_channels_dec=16, num_groups_per_scale=5),
    "cifar10": _preset(**_RGB, image_size=32, num_channels_enc=128, num_channels_dec=128,
                       num_latent_scales=1, num_groups_per_scale=30, ada_groups=False, num_nf=1),
    "celeba64": _preset(**_RGB, image_size=64, num_channels_enc=64, num_channels_dec=64,
                        num_latent_scales=3, num_groups_per_scale=20, ada_groups=True, num_nf=1),
    "imagenet32": _preset(**_RGB, image_size=32, num_channels_enc=192, num_channels_dec=192,
                          num_latent_scales=1, num_groups_per_scale=28, ada_groups=False, num_nf=1),
    "celebahq256": _preset(**_HQ),
    "ffhq256": _preset(**_HQ),
    "digits": _preset(image_size=8, in_channels=1, decoder="mixture", num_mixture_dec=5, num_x_bits=4,
                      num_channels_enc=16, num_channels_dec=16, num_latent_scales=2, num_groups_per_scale=4,
                      ada_groups=True, num_preprocess_blocks=1, num_preprocess_cells=2, num_postprocess_blocks=1,
                      num_postprocess_cells=2, num_cell_per_cond_enc=1, num_cell_per_cond_dec=1,
                      num_latent_per_group=8, num_nf=0),
}

# Data sets of the official code for which neither the paper nor the official README gives a configuration:
# our defaults (README "Presets"). Omniglot is binary 28x28 like MNIST: MNIST's model. Stacked MNIST is an
# 8-bit colour set of simple images: a 64-channel, two-scale mixture-decoder model whose likelihood, as the
# official model's (crop_output for 'stacked_mnist'), covers the central 28x28 of the padded 32x32. LSUN 64 takes the
# CelebA-64 model; LSUN 128 a 32-channel, four-scale model in the style of the 256x256 ones.
_LSUN64 = dict(_RGB, image_size=64, num_channels_enc=64, num_channels_dec=64, num_latent_scales=3,
               num_groups_per_scale=20, ada_groups=True, num_nf=1)
_LSUN128 = dict(_RGB, image_size=128, num_channels_enc=32, num_channels_dec=32, num_latent_scales=4,
                num_groups_per_scale=16, ada_groups=True, min_groups_per_scale=4, num_nf=2)
PRESETS.update({
    "omniglot": _preset(**_MNIST, num_channels_enc=32, num_channels_dec=32, num_groups_per_scale=10),
    "stacked_mnist": _preset(**_RGB, image_size=32, num_channels_enc=64, num_channels_dec=64, num_latent_scales=2,
                             num_groups_per_scale=10, ada_groups=True, num_nf=1, crop_output=2),
    **{f"lsun_{c}{size}": _preset(**arch) for c in ("church", "bedroom", "tower")
       for size, arch in ((64, _LSUN64), (128, _LSUN128))},
})


#: The groups of :class:`TrainConfig`'s fields (each field names its group in its metadata), in the order
#: ``nvae train --help`` shows them.
TRAIN_GROUPS = {
    "recipe": "the optimisation of the paper and its presets: data, schedule, learning rate, KL and regulariser",
    "performance": "how the steps are computed: numeric precision, memory layout, recomputation, determinism, "
                   "compilation",
    "stability": "what guards the run against divergence: skipped steps, roll-backs, clipping, EMA",
    "validation": "when the run validates, and with how many importance samples",
    "run_control": "how long the run goes, how often it logs and writes, what a resume may change",
}

#: Groups whose fields only steer a run (when to stop, log, write, validate): a resumed run may change them.
RESUMABLE_GROUPS = ("validation", "run_control")

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Flag:
    """How a :class:`TrainConfig` field appears as an ``nvae train`` flag (its metadata's ``"flag"``).

    A ``bool`` field's flag is a switch (``store_true``) unless it takes a value; every other flag takes
    one value, checked by ``parse`` (a name from :mod:`nvae.cli.common`: ``count``, ``positive``,
    ``non_negative``) or else converted by the field's type. A flag left out keeps the preset's (or
    the resumed run's) value.
    """

    help: Optional[str] = None
    name: Optional[str] = None                  #: the flag, when not ``--field-name``
    parse: Optional[str] = None                 #: the value's check, by name (None: the field's type)
    metavar: Optional[str] = None
    choices: Optional[Tuple[str, ...]] = None
    optional_value: Optional[str] = None        #: the flag takes an optional value, this one when left out
    #: the fields the value sets, where it is not simply the field's value
    to_config: Optional[Callable[[Any], dict]] = None

    def option(self, field_name: str) -> str:
        return self.name or "--" + field_name.replace("_", "-")


def _field(group: str, default, flag: Optional[Flag] = None):
    """A :class:`TrainConfig` field of ``group`` (one of :data:`TRAIN_GROUPS`), with its ``nvae train`` flag."""
    if group not in TRAIN_GROUPS:
        raise ValueError(f"unknown TrainConfig group {group!r}; choose from {list(TRAIN_GROUPS)}")
    return dataclasses.field(default=default, metadata={"group": group, "flag": flag})


def _checkpointing_flag(roles: str) -> dict:
    """``--checkpointing [ROLES]``: recompute every cell (the flag alone), or only the roles given."""
    out = {"checkpointing": True}
    if roles != "all":
        out["checkpointing_roles"] = roles   # TrainConfig splits the commas
    return out


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation recipe. Defaults are the official ``train.py`` defaults.

    Each field's metadata names its group (:data:`TRAIN_GROUPS`) and, where ``nvae train`` has a flag for
    it, the flag (:class:`Flag`); :meth:`fields_in` lists a group. The fields keep the order of their
    first release (``train_config.json`` is written in it); the JSON form stays flat.
    """

    dataset: str = _field("recipe", "digits")
    epochs: int = _field("recipe", 200, Flag(parse="count"))
    batch_size: int = _field("recipe", 200, Flag(parse="count"))
    learning_rate: float = _field("recipe", 1e-2, Flag(parse="positive"))
    learning_rate_min: float = _field("recipe", 1e-4)
    weight_decay: float = _field("recipe", 3e-4)
    warmup_epochs: int = _field("recipe", 5)
    weight_decay_norm: float = _field("recipe", 1e-2)
    weight_decay_norm_init: float = _field("recipe", 10.0)
    weight_decay_norm_anneal: bool = _field("recipe", False)
    kl_anneal_portion: float = _field("recipe", 0.3)
    kl_const_portion: float = _field("recipe", 1e-4)
    kl_const_coeff: float = _field("recipe", 1e-4)
    kl_balance: bool = _field("recipe", True)
    seed: int = _field("recipe", 1, Flag())
    #: stop early (the schedules still follow ``epochs``)
    max_steps: Optional[int] = _field("run_control", None, Flag("stop after N steps", parse="count"))
    #: stop after this much wall-clock training time
    max_minutes: Optional[float] = _field("run_control", None,
                                          Flag("stop after M minutes of training", parse="positive"))
    #: horizontal flips of training images (None: the data set's default)
    flip: Optional[bool] = _field("recipe", None)
    #: unreadable images and wrong channel counts are errors, not skips
    strict_data: bool = _field("recipe", False, Flag(
        "stop on an unreadable image or a wrong channel count (default: skip or convert, and warn)"))
    precision: str = _field("performance", "fp32", Flag(choices=PRECISIONS))
    channels_last: bool = _field("performance", False, Flag("channels-last memory format (faster on CPU)"))
    checkpointing: bool = _field("performance", False, Flag(
        "recompute cells in backward to save memory: every cell, or only the comma-separated cell roles given "
        "(e.g. normal_post,up_post)", metavar="ROLES", optional_value="all", to_config=_checkpointing_flag))
    #: with ``checkpointing``, the cell roles to recompute (None: every cell), e.g. ("normal_post", "up_post")
    checkpointing_roles: Optional[Tuple[str, ...]] = _field("performance", None)   # set by --checkpointing ROLES
    #: store BN inputs only; recompute BN and Swish in backward
    recompute_bn: bool = _field("performance", False, Flag(
        "store only BN inputs and recompute BN + Swish in backward (less memory, a little slower)"))
    log_every: int = _field("run_control", 50)
    image_every: int = _field("run_control", 500)
    checkpoint_every: int = _field("run_control", 1000, Flag("write checkpoint.pt every N steps", parse="count"))
    #: validate every N epochs (0: never; None: the official rule, every epoch up to 50 epochs, else every 20)
    eval_every: Optional[int] = _field("validation", None, Flag(
        "validate every N epochs (0: never; default: the official schedule, every epoch up to 50 epochs, else "
        "every 20)", parse="non_negative", metavar="N"))
    #: K of each validation's importance-weighted NLL
    eval_samples: int = _field("validation", 10, Flag(
        "K of each validation's importance-weighted NLL (default 10)", parse="count", metavar="K"))
    #: K of the evaluation after the last epoch (0: none)
    final_eval_samples: int = _field("validation", 1000, Flag(
        "K of the evaluation after the last epoch, into validation_final.json (default 1000, digits 50; 0: none)",
        parse="non_negative", metavar="K"))
    #: validate on the first N images of the split only
    eval_max_images: Optional[int] = _field("validation", None)
    #: torch.use_deterministic_algorithms (bit-exact resume on GPU too)
    deterministic: bool = _field("performance", False, Flag("deterministic algorithms only"))
    #: skip steps whose grad norm exceeds this x the running quantile
    skip_grad_factor: Optional[float] = _field("stability", 10.0)
    skip_grad_quantile: float = _field("stability", 0.95)
    skip_grad_window: int = _field("stability", 200)
    #: then roll back to the last checkpoint (0: never)
    max_consecutive_skips: int = _field("stability", 20)
    #: learning-rate multiplier applied at each roll-back
    rollback_lr_factor: float = _field("stability", 0.5)
    #: on resume, continue on data other than the run's (another folder, or another number of images)
    allow_data_change: bool = _field("run_control", False, Flag(
        "with --resume: continue on other data than the run trained on (its schedules change)"))
    #: under torchrun: how long a process waits for the others
    dist_timeout_minutes: float = _field("run_control", 5.0, Flag(
        "under torchrun: how long a process waits for the others (default 5)", name="--dist-timeout",
        parse="positive", metavar="MINUTES"))
    #: EMA of the weights, ema = d * ema + (1 - d) * w with d = min(rate, n / (n + 9)) after n updates: the rate
    #: is the asymptote, reached after 9 * rate / (1 - rate) updates (nvae.training.ema; 0: none)
    ema_rate: float = _field("stability", 0.0)
    #: clip the total gradient norm to this before each step (0: never)
    grad_clip: float = _field("stability", 0.0)
    #: torch.compile the step's forward pass and loss, and so its backward, as one graph (nvae.speedups.compile)
    compile: bool = _field("performance", False, Flag(
        "torch.compile the step's forward pass and loss (and so its backward) as one graph; the first steps wait for "
        "the compiler"))

    def __post_init__(self):
        if isinstance(self.checkpointing_roles, list):   # as JSON brings it
            object.__setattr__(self, "checkpointing_roles", tuple(self.checkpointing_roles))
        check_field_types(self)
        for name in ("learning_rate", "kl_anneal_portion"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("learning_rate_min", "weight_decay", "weight_decay_norm", "kl_const_portion", "kl_const_coeff",
                     "warmup_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.skip_grad_factor is not None and self.skip_grad_factor <= 1:
            raise ValueError(f"skip_grad_factor must be > 1 (or None to skip only non-finite steps), "
                             f"got {self.skip_grad_factor}")
        if not 0 <= self.ema_rate < 1:
            raise ValueError(f"ema_rate must be in [0, 1) (0: no EMA; vdvae uses 0.9999), got {self.ema_rate}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0: no clipping), got {self.grad_clip}")
        if self.dist_timeout_minutes <= 0:
            raise ValueError(f"dist_timeout_minutes must be > 0, got {self.dist_timeout_minutes}")
        if not 0 < self.skip_grad_quantile <= 1:
            raise ValueError(f"skip_grad_quantile must be in (0, 1], got {self.skip_grad_quantile}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        for name in ("batch_size", "epochs", "log_every", "image_every", "checkpoint_every", "skip_grad_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        _check_validation(self)
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 (or None for the whole schedule), got {self.max_steps}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"max_minutes must be > 0 (or None), got {self.max_minutes}")
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) exceeds epochs ({self.epochs}): the learning "
                             "rate would never finish warming up; lower warmup_epochs or raise epochs")
        if self.learning_rate_min > self.learning_rate:
            raise ValueError(f"learning_rate_min ({self.learning_rate_min}) exceeds learning_rate "
                             f"({self.learning_rate})")
        if not 0 < self.rollback_lr_factor <= 1:
            raise ValueError(f"rollback_lr_factor must be in (0, 1], got {self.rollback_lr_factor}")
        if self.max_consecutive_skips < 0:
            raise ValueError(f"max_consecutive_skips must be >= 0, got {self.max_consecutive_skips}")
        if self.checkpointing_roles is not None:
            try:   # JSON brings a list, overrides a comma-separated string
                object.__setattr__(self, "checkpointing_roles", cell_roles(self.checkpointing_roles))
            except ValueError as e:
                raise ValueError(f"checkpointing_roles: {e}") from None
            if not self.checkpointing:
                raise ValueError("checkpointing_roles needs checkpointing=True (nvae train --checkpointing ROLES)")

    @classmethod
    def fields_in(cls, *groups: str) -> Tuple[str, ...]:
        """The names of the fields of ``groups`` (see :data:`TRAIN_GROUPS`), in declaration order."""
        unknown = sorted(set(groups) - set(TRAIN_GROUPS))
        if unknown:
            raise ValueError(f"unknown TrainConfig group(s) {unknown}; choose from {list(TRAIN_GROUPS)}")
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("group") in groups)

    @classmethod
    def group_of(cls, name: str) -> str:
        """The group (a key of :data:`TRAIN_GROUPS`) of the field ``name``."""
        return {f.name: f.metadata.get("group") for f in dataclasses.fields(cls)}[name]

    @classmethod
    def flags(cls) -> Tuple[Tuple[dataclasses.Field, Flag], ...]:
        """``(field, flag)`` of every field that ``nvae train`` sets with a flag of its own."""
        return tuple((f, f.metadata["flag"]) for f in dataclasses.fields(cls) if f.metadata.get("flag"))

    def to_dict(self) -> dict:
        # Lists, as JSON gives them back, so a stored config compares equal to its reload.
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        data = _config_dict(data, "training config")
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; they may come from another nvae version")
        return cls(**data)

    @classmethod
    def preset(cls, name: str, **overrides) -> "TrainConfig":
        if name not in TRAIN_PRESETS:
            raise ValueError(f"no training preset {name!r}; choose one of {sorted(TRAIN_PRESETS)}")
        return dataclasses.replace(TRAIN_PRESETS[name], **overrides)


#: Options that only steer a run (when to stop, log, write, validate): a resumed run may change them. The
#: fields of the :data:`RESUMABLE_GROUPS`, from their metadata.
RUN_CONTROL: Tuple[str, ...] = TrainConfig.fields_in(*RESUMABLE_GROUPS)


def _check_validation(cfg: "TrainConfig") -> None:
    """The validation fields of ``cfg`` (:mod:`nvae.training.validation`) make sense."""
    if cfg.eval_every is not None and cfg.eval_every < 0:
        raise ValueError(f"eval_every must be >= 0 (0: no validation; None: the official schedule), "
                         f"got {cfg.eval_every}")
    if cfg.eval_samples < 1:
        raise ValueError(f"eval_samples must be >= 1, got {cfg.eval_samples}")
    if cfg.final_eval_samples < 0:
        raise ValueError(f"final_eval_samples must be >= 0 (0: no final evaluation), got {cfg.final_eval_samples}")
    if cfg.eval_max_images is not None and cfg.eval_max_images < 1:
        raise ValueError(f"eval_max_images must be >= 1 (or None for the whole split), got {cfg.eval_max_images}")


#: Official per-data-set recipes (the official README's commands; per-GPU batch sizes).
TRAIN_PRESETS = {
    # digits, a CPU demo, ends with K = 50 (K = 1000 would add ~4 minutes to its ~10 on a CPU core)
    "digits": TrainConfig(dataset="digits", epochs=60, batch_size=64, warmup_epochs=2, image_every=250,
                          final_eval_samples=50),
    "mnist": TrainConfig(dataset="mnist", epochs=400, batch_size=200, weight_decay_norm=1e-2),
    "mnist_small": TrainConfig(dataset="mnist", epochs=400, batch_size=200, weight_decay_norm=1e-2),
    "cifar10": TrainConfig(dataset="cifar10", epochs=400, batch_size=32, weight_decay_norm=1e-2),
    "celeba64": TrainConfig(dataset="celeba64", epochs=90, batch_size=16, weight_decay_norm=1e-1),
    "imagenet32": TrainConfig(dataset="imagenet32", epochs=45, batch_size=24, weight_decay_norm=1e-2,
                              weight_decay_norm_init=1.0, weight_decay_norm_anneal=True),
    "celebahq256": TrainConfig(dataset="celebahq256", epochs=300, batch_size=4, weight_decay_norm=1e-2,
                               weight_decay_norm_init=1.0, weight_decay_norm_anneal=True),
    "ffhq256": TrainConfig(dataset="ffhq256", epochs=200, batch_size=4, learning_rate=8e-3,
                           weight_decay_norm=1e-1, weight_decay_norm_init=1.0, weight_decay_norm_anneal=True),
}

# Our defaults for the data sets without an official recipe (see PRESETS above): Omniglot takes MNIST's recipe;
# the LSUN recipes see about as many images as CelebA-64's (90 epochs of 163k): LSUN church_outdoor has 126k
# training images, tower 708k, bedroom 3.03M.
_LSUN_EPOCHS = {"church": (90, 5), "tower": (20, 1), "bedroom": (5, 1)}   # (epochs, warm-up epochs)
TRAIN_PRESETS.update({
    "omniglot": TrainConfig(dataset="omniglot", epochs=400, batch_size=200, weight_decay_norm=1e-2),
    "stacked_mnist": TrainConfig(dataset="stacked_mnist", epochs=200, batch_size=32, weight_decay_norm=1e-2),
    **{f"lsun_{c}64": TrainConfig(dataset=f"lsun_{c}64", epochs=e, warmup_epochs=w, batch_size=16,
                                  weight_decay_norm=1e-1) for c, (e, w) in _LSUN_EPOCHS.items()},
    **{f"lsun_{c}128": TrainConfig(dataset=f"lsun_{c}128", epochs=e, warmup_epochs=w, batch_size=8,
                                   weight_decay_norm=1e-2, weight_decay_norm_init=1.0, weight_decay_norm_anneal=True)
       for c, (e, w) in _LSUN_EPOCHS.items()},
})
