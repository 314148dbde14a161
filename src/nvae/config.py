"""Typed architecture configuration of NVAE, with the official presets.

Field names follow the official ``train.py`` flags so that a researcher who
knows the paper's command lines recognises every knob.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Tuple

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


@dataclass(frozen=True)
class NVAEConfig:
    """Every architecture option of NVAE (NVAE.md section 1).

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
        from .cells import ARCH_INSTANCES  # local import: cells imports nothing from here
        if self.arch_instance not in ARCH_INSTANCES:
            raise ValueError(f"unknown arch_instance {self.arch_instance!r}; "
                             f"choose one of {sorted(ARCH_INSTANCES)}")

    # -------------------------------------------------------------- serialising
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "NVAEConfig":
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

#: The paper's configurations (NVAE.md section 5) plus ``mnist_small``, a
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
