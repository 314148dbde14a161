"""Architecture configuration: presets, derived quantities, JSON round trip, validation."""
import dataclasses
import json

import pytest

from nvae import PRESETS, NVAEConfig
from nvae.model.cells import ARCH_INSTANCES
from nvae.config import groups_per_scale


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates(name):
    cfg = NVAEConfig.preset(name)
    cfg.validate()
    assert cfg.image_size % cfg.downsampling == 0
    assert cfg.arch_instance in ARCH_INSTANCES
    assert NVAEConfig(**cfg.to_dict()) == cfg


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_json_round_trip(name, tmp_path):
    cfg = NVAEConfig.preset(name, num_nf=3, official_edge=True)
    text = cfg.to_json()
    assert json.loads(text)["num_nf"] == 3
    assert NVAEConfig.from_json(text) == cfg
    path = tmp_path / "config.json"
    assert cfg.to_json(path) == text
    assert NVAEConfig.from_json(path) == cfg
    assert NVAEConfig.from_json(str(path)) == cfg
    assert NVAEConfig.from_dict(json.loads(path.read_text())) == cfg


@pytest.mark.parametrize("name,expected", [
    ("mnist", (10, 5)),
    ("mnist_small", (5, 2)),
    ("cifar10", (30,)),
    ("celeba64", (20, 10, 5)),
    ("imagenet32", (28,)),
    ("celebahq256", (16, 8, 4, 4, 4)),
    ("ffhq256", (16, 8, 4, 4, 4)),
])
def test_groups_per_scale(name, expected):
    cfg = NVAEConfig.preset(name)
    assert cfg.groups_per_scale == expected
    assert cfg.num_groups == sum(expected)


def test_groups_per_scale_function():
    assert groups_per_scale(3, 20, True) == (20, 10, 5)
    assert groups_per_scale(4, 5, True) == (5, 2, 1, 1)
    assert groups_per_scale(4, 5, True, minimum=2) == (5, 2, 2, 2)
    assert groups_per_scale(3, 7, False) == (7, 7, 7)


def test_derived_quantities():
    mnist = NVAEConfig.preset("mnist")
    assert mnist.downsampling == 8 and mnist.num_output_channels == 1 and mnist.num_data_dims == 28 * 28
    cifar = NVAEConfig.preset("cifar10")
    assert cifar.downsampling == 2 and cifar.num_output_channels == 100 and cifar.num_data_dims == 3 * 32 * 32
    assert NVAEConfig.preset("celebahq256").downsampling == 32
    grey_mix = dataclasses.replace(mnist, decoder="mixture", num_mixture_dec=4)
    assert grey_mix.num_output_channels == 12
    assert dataclasses.replace(cifar, decoder="normal").num_output_channels == 6


def test_config_is_frozen_and_overrides_revalidate():
    cfg = NVAEConfig.preset("mnist")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_nf = 2
    assert NVAEConfig.preset("mnist", num_nf=2).num_nf == 2
    with pytest.raises(ValueError, match="not divisible"):
        dataclasses.replace(cfg, image_size=28)


@pytest.mark.parametrize("overrides,message", [
    (dict(image_size=28), r"image_size 28 is not divisible by .* = 8"),
    (dict(image_size=36), r"not divisible"),
    (dict(decoder="gaussian"), r"decoder must be one of .*'gaussian'"),
    (dict(arch_instance="res_mbconv9"), r"unknown arch_instance 'res_mbconv9'; choose one of"),
    (dict(in_channels=2), r"in_channels must be 1 or 3"),
    (dict(num_x_bits=9), r"num_x_bits must be in 1..8"),
    (dict(num_channels_enc=0), r"num_channels_enc must be >= 1"),
    (dict(num_nf=-1), r"num_nf must be >= 0"),
    (dict(num_postprocess_blocks=1), r"num_preprocess_blocks and num_postprocess_blocks must be equal"),
    (dict(num_latent_scales=1, num_groups_per_scale=1), r"at least two latent groups"),
    (dict(crop_output=16), r"crop_output 16 leaves no pixels"),
])
def test_invalid_config_raises_helpful_value_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        NVAEConfig.preset("mnist", **overrides)


def test_unknown_preset_name():
    with pytest.raises(ValueError, match=r"unknown preset 'mnist2'; choose one of .*celeba64"):
        NVAEConfig.preset("mnist2")


def test_from_dict_rejects_unknown_fields():
    data = NVAEConfig.preset("mnist").to_dict()
    data["num_latent_groups"] = 3
    data["zzz"] = 1
    with pytest.raises(ValueError, match=r"unknown NVAEConfig fields \['num_latent_groups', 'zzz'\]"):
        NVAEConfig.from_dict(data)
    with pytest.raises(ValueError, match="unknown NVAEConfig fields"):
        NVAEConfig.from_json(json.dumps(data))
