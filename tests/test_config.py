"""Architecture configuration: presets, derived quantities, JSON round trip, validation."""
import dataclasses
import json

import pytest

from nvae import PRESETS, NVAEConfig
from nvae.config import ARCH_INSTANCES, groups_per_scale


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


# ---------------------------------------------------------------- TrainConfig: groups in the field metadata
from nvae.config import RUN_CONTROL, TRAIN_GROUPS, Flag, TrainConfig  # noqa: E402

#: The keys of ``train_config.json`` (and a checkpoint's ``train_config``) as runs wrote them before the
#: fields carried their groups, in the order they were written, with TrainConfig's defaults.
TODAYS_TRAIN_CONFIG = {
    "dataset": "digits", "epochs": 200, "batch_size": 200, "learning_rate": 0.01, "learning_rate_min": 0.0001,
    "weight_decay": 0.0003, "warmup_epochs": 5, "weight_decay_norm": 0.01, "weight_decay_norm_init": 10.0,
    "weight_decay_norm_anneal": False, "kl_anneal_portion": 0.3, "kl_const_portion": 0.0001,
    "kl_const_coeff": 0.0001, "kl_balance": True, "seed": 1, "max_steps": None, "max_minutes": None,
    "flip": None, "strict_data": False, "precision": "fp32", "channels_last": False, "checkpointing": False,
    "checkpointing_roles": None, "recompute_bn": False, "log_every": 50, "image_every": 500,
    "checkpoint_every": 1000, "eval_every": None, "eval_samples": 10, "final_eval_samples": 1000,
    "eval_max_images": None, "deterministic": False, "skip_grad_factor": 10.0, "skip_grad_quantile": 0.95,
    "skip_grad_window": 200, "max_consecutive_skips": 20, "rollback_lr_factor": 0.5, "allow_data_change": False,
    "dist_timeout_minutes": 5.0, "ema_rate": 0.0, "grad_clip": 0.0, "compile": False}

#: What a resumed run could change before RUN_CONTROL was derived from the metadata.
TODAYS_RUN_CONTROL = ("max_steps", "max_minutes", "log_every", "image_every", "checkpoint_every",
                      "allow_data_change", "dist_timeout_minutes", "eval_every", "eval_samples",
                      "final_eval_samples", "eval_max_images")


def test_every_train_field_names_a_known_group():
    assert set(TRAIN_GROUPS) == {"recipe", "performance", "stability", "validation", "run_control"}
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("group") in TRAIN_GROUPS, f.name
        assert TrainConfig.group_of(f.name) == f.metadata["group"]
        assert f.metadata.get("flag") is None or isinstance(f.metadata["flag"], Flag), f.name
    every = [name for group in TRAIN_GROUPS for name in TrainConfig.fields_in(group)]
    assert sorted(every) == sorted(f.name for f in dataclasses.fields(TrainConfig))   # each in exactly one
    assert set(TrainConfig.fields_in("stability")) >= {"skip_grad_factor", "grad_clip", "ema_rate"}
    assert set(TrainConfig.fields_in("performance")) >= {"precision", "channels_last", "recompute_bn",
                                                         "checkpointing", "checkpointing_roles"}
    assert set(TrainConfig.fields_in("recipe")) >= {"epochs", "batch_size", "learning_rate", "warmup_epochs",
                                                    "kl_anneal_portion", "weight_decay_norm"}
    with pytest.raises(ValueError, match="unknown TrainConfig group"):
        TrainConfig.fields_in("speed")


def test_run_control_is_derived_from_the_groups_a_resume_may_change():
    assert set(RUN_CONTROL) == set(TODAYS_RUN_CONTROL) and len(RUN_CONTROL) == len(TODAYS_RUN_CONTROL)
    assert RUN_CONTROL == TrainConfig.fields_in("validation", "run_control")
    assert set(TrainConfig.fields_in("run_control")) == set(TODAYS_RUN_CONTROL) - set(TrainConfig.fields_in(
        "validation"))
    assert set(TrainConfig.fields_in("validation")) == {"eval_every", "eval_samples", "final_eval_samples",
                                                        "eval_max_images"}
    from nvae.training import run_dir
    assert run_dir.RUN_CONTROL is RUN_CONTROL


def test_a_train_config_with_todays_keys_round_trips_flat():
    assert TrainConfig().to_dict() == TODAYS_TRAIN_CONFIG
    assert list(TrainConfig().to_dict()) == list(TODAYS_TRAIN_CONFIG)   # train_config.json keeps its key order
    stored = dict(TODAYS_TRAIN_CONFIG, dataset="mnist", epochs=400, checkpointing=True,
                  checkpointing_roles=["normal_post", "up_post"], ema_rate=0.999, eval_every=0, max_steps=9)
    text = json.dumps(stored)
    cfg = TrainConfig.from_dict(json.loads(text))
    assert cfg.checkpointing_roles == ("normal_post", "up_post") and cfg.epochs == 400
    assert cfg.to_dict() == stored and json.dumps(cfg.to_dict()) == text
    older = {k: v for k, v in TODAYS_TRAIN_CONFIG.items()
             if k not in ("ema_rate", "grad_clip", "compile")}   # missing: default
    assert TrainConfig.from_dict(older) == TrainConfig()
