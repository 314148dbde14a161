"""``nvae train``'s flags for TrainConfig fields come from the fields' metadata and behave as the hand-written
ones did."""
import argparse
import dataclasses

import pytest

from nvae.cli import build_parser, main
from nvae.cli.training import _train_overrides
from nvae.config import TRAIN_PRESETS, TrainConfig, parse_overrides
from nvae.training.run_dir import run_configs

#: ``nvae train --help``'s option strings, recorded before the flags were generated.
RECORDED_OPTIONS = {
    "-h", "--help", "--preset", "--data", "--run-dir", "--max-steps", "--max-minutes", "--resume",
    "--checkpoint-every", "--deterministic", "--no-progress", "--strict-data", "--epochs", "--batch-size",
    "--learning-rate", "--seed", "--precision", "--channels-last", "--checkpointing", "--recompute-bn", "--device",
    "--allow-data-change", "--dist-timeout", "--eval-every", "--eval-samples", "--final-eval-samples",
    "--no-tune-allocator", "--model", "--train", "--compile"}

#: The hand-written flags of TrainConfig fields, recorded before they were generated:
#: option -> (type's name, metavar, nargs, const, default, choices, help).
RECORDED_FIELD_FLAGS = {
    "--max-steps": ("positive integer", None, None, None, None, None, "stop after N steps"),
    "--max-minutes": ("finite positive number", None, None, None, None, None, "stop after M minutes of training"),
    "--checkpoint-every": ("positive integer", None, None, None, None, None, "write checkpoint.pt every N steps"),
    "--deterministic": (None, None, 0, True, False, None, "deterministic algorithms only"),
    "--strict-data": (None, None, 0, True, False, None,
                      "stop on an unreadable image or a wrong channel count (default: skip or convert, and warn)"),
    "--epochs": ("positive integer", None, None, None, None, None, None),
    "--batch-size": ("positive integer", None, None, None, None, None, None),
    "--learning-rate": ("finite positive number", None, None, None, None, None, None),
    "--seed": ("int", None, None, None, None, None, None),
    "--precision": (None, None, None, None, None, ("fp32", "bf16", "fp16"), None),
    "--channels-last": (None, None, 0, True, False, None, "channels-last memory format (faster on CPU)"),
    "--checkpointing": (None, "ROLES", "?", "all", None, None,
                        "recompute cells in backward to save memory: every cell, or only the comma-separated "
                        "cell roles given (e.g. normal_post,up_post)"),
    "--recompute-bn": (None, None, 0, True, False, None,
                       "store only BN inputs and recompute BN + Swish in backward (less memory, a little slower)"),
    "--allow-data-change": (None, None, 0, True, False, None,
                            "with --resume: continue on other data than the run trained on (its schedules change)"),
    "--dist-timeout": ("finite positive number", "MINUTES", None, None, None, None,
                       "under torchrun: how long a process waits for the others (default 5)"),
    "--eval-every": ("non-negative integer", "N", None, None, None, None,
                     "validate every N epochs (0: never; default: the official schedule, every epoch up to 50 "
                     "epochs, else every 20)"),
    "--eval-samples": ("positive integer", "K", None, None, None, None,
                       "K of each validation's importance-weighted NLL (default 10)"),
    "--final-eval-samples": ("non-negative integer", "K", None, None, None, None,
                             "K of the evaluation after the last epoch, into validation_final.json (default 1000, "
                             "digits 50; 0: none)"),
    "--compile": (None, None, 0, True, False, None,
                  "torch.compile the step's forward pass and loss (and so its backward) as one graph; the first steps "
                  "wait for the compiler"),
}


def _train_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def _actions():
    return {a.option_strings[-1]: a for a in _train_parser()._actions}


def test_the_train_command_lists_the_options_it_listed_before(capsys):
    assert {o for a in _train_parser()._actions for o in a.option_strings} == RECORDED_OPTIONS
    assert main(["train", "--help"]) == 0
    shown = capsys.readouterr().out
    for option in RECORDED_OPTIONS - {"-h"}:
        assert option in shown, option


def test_the_generated_flags_are_the_fields_that_declare_one():
    actions = _actions()
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    generated = {flag.option(f.name): f.name for f, flag in TrainConfig.flags()}
    assert set(generated) == set(RECORDED_FIELD_FLAGS)
    for option, name in generated.items():
        assert actions[option].dest == name and fields[name].metadata["flag"] is not None
    # every other flag is hand-written and sets no field of its own
    assert not {a.dest for o, a in actions.items() if o not in generated} & set(fields)
    assert {f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("flag")} == set(generated.values())


@pytest.mark.parametrize("option", sorted(RECORDED_FIELD_FLAGS))
def test_each_generated_flag_has_the_recorded_type_default_and_help(option):
    a = _actions()[option]
    got = (getattr(a.type, "__name__", None), a.metavar, a.nargs, a.const, a.default,
           None if a.choices is None else tuple(a.choices), a.help)
    assert got == RECORDED_FIELD_FLAGS[option]


def _config(argv):
    """The TrainConfig ``nvae train ARGV`` would train with (a new run)."""
    args = build_parser().parse_args(["train", *argv])
    over = {**_train_overrides(args), **parse_overrides(args.train, TrainConfig)}
    return run_configs(args.preset, None, {}, over)[2]


@pytest.mark.parametrize("argv,expected", [
    ([], TRAIN_PRESETS["digits"]),
    (["--epochs", "3", "--batch-size", "8", "--learning-rate", "0.005", "--seed", "7"],
     dataclasses.replace(TRAIN_PRESETS["digits"], epochs=3, batch_size=8, learning_rate=0.005, seed=7)),
    (["--preset", "mnist", "--precision", "bf16", "--channels-last", "--recompute-bn", "--checkpointing"],
     dataclasses.replace(TRAIN_PRESETS["mnist"], precision="bf16", channels_last=True, recompute_bn=True,
                         checkpointing=True)),
    (["--checkpointing", "normal_post,up_post", "--deterministic", "--strict-data"],
     dataclasses.replace(TRAIN_PRESETS["digits"], checkpointing=True, checkpointing_roles=("normal_post", "up_post"),
                         deterministic=True, strict_data=True)),
    (["--max-steps", "10", "--max-minutes", "2.5", "--checkpoint-every", "3", "--allow-data-change",
      "--dist-timeout", "1.5"],
     dataclasses.replace(TRAIN_PRESETS["digits"], max_steps=10, max_minutes=2.5, checkpoint_every=3,
                         allow_data_change=True, dist_timeout_minutes=1.5)),
    (["--eval-every", "0", "--eval-samples", "4", "--final-eval-samples", "0"],
     dataclasses.replace(TRAIN_PRESETS["digits"], eval_every=0, eval_samples=4, final_eval_samples=0)),
    (["--preset", "cifar10", "--precision", "bf16", "--compile"],
     dataclasses.replace(TRAIN_PRESETS["cifar10"], precision="bf16", compile=True)),
    (["--preset", "cifar10", "--epochs", "5", "--train", "epochs=6", "--train", "ema_rate=0.9"],   # --train wins
     dataclasses.replace(TRAIN_PRESETS["cifar10"], epochs=6, ema_rate=0.9)),
])
def test_train_flags_give_the_config_they_gave_before(argv, expected):
    assert _config(argv) == expected


def test_flags_left_out_override_nothing():
    assert _train_overrides(build_parser().parse_args(["train"])) == {}
    assert _train_overrides(build_parser().parse_args(["train", "--checkpointing"])) == {"checkpointing": True}
    assert _train_overrides(build_parser().parse_args(["train", "--eval-every", "0", "--seed", "0"])) == \
        {"eval_every": 0, "seed": 0}   # 0 is a value, not "unset"


@pytest.mark.parametrize("argv,message", [
    (["--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
    (["--dist-timeout", "0"], "argument --dist-timeout: invalid finite positive number value: '0'"),
    (["--batch-size", "0"], "argument --batch-size: invalid positive integer value: '0'"),
    (["--seed", "x"], "argument --seed: invalid int value: 'x'"),
    (["--eval-every", "-1"], "argument --eval-every: invalid non-negative integer value: '-1'"),
    (["--recompute-bn=yes"], "argument --recompute-bn: ignored explicit argument 'yes'"),
])
def test_bad_flag_values_are_refused_as_before(argv, message, capsys, tmp_path):
    assert main(["train", "--run-dir", str(tmp_path / "never"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
