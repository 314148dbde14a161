"""What the commands print: plain help, shell-quoted paths in hints, the final numbers, where eval wrote."""
import argparse
import contextlib
import io
import json
import shlex

import pytest

from nvae.cli import build_parser, main
from nvae.cli.training import _final_validation_line
from nvae.training.validation import FINAL_FILE


def _parsers(parser, name="nvae"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_help_is_plain_text(capsys):
    """No reStructuredText ``literals`` (docstrings become descriptions) in any command's --help."""
    assert main(["--help"]) == 0
    assert "``" not in capsys.readouterr().out
    names = []
    for name, parser in _parsers(build_parser()):
        names.append(name)
        text = parser.format_help()
        assert "``" not in text and ":class:`" not in text, name
    assert "nvae train" in names and "nvae data build" in names
    assert main(["train", "--help"]) == 0 and "``" not in capsys.readouterr().out


@pytest.fixture(scope="module")
def spaced_run(tmp_path_factory):
    """A one-step run in a directory whose name has a space, and what `nvae train` printed."""
    run = tmp_path_factory.mktemp("runs") / "my run"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["train", "--run-dir", str(run), "--max-steps", "1", "--batch-size", "8", "--no-progress",
                     "--model", "num_channels_enc=4", "--model", "num_channels_dec=4"]) == 0
    return run, out.getvalue()


def test_train_hints_quote_a_run_dir_with_a_space(spaced_run):
    run, printed = spaced_run
    done = [line for line in printed.splitlines() if line.startswith("done: ")]
    assert len(done) == 1
    command = done[0].split("TensorBoard: ", 1)[1]
    assert shlex.split(command) == ["tensorboard", "--logdir", str(run)]
    assert "final validation" not in printed   # --max-steps 1 stops before the final evaluation


def test_a_resumed_run_is_announced_by_its_preset_and_what_differs(spaced_run):
    run, printed = spaced_run
    assert "training digits on digits" in printed
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["train", "--resume", str(run), "--max-steps", "2", "--no-progress"]) == 0
    assert f"resuming digits (num_channels_dec=4, num_channels_enc=4) on digits -> {run}" in out.getvalue()


def test_preset_names_of_stored_configs():
    from nvae import NVAEConfig
    from nvae.training.run_dir import preset_name
    assert preset_name(NVAEConfig.preset("cifar10")) == "cifar10"
    assert preset_name(NVAEConfig.preset("celeba64", num_nf=0)) == "celeba64 (num_nf=0)"
    assert preset_name(NVAEConfig.preset("ffhq256"), "ffhq256") == "ffhq256"      # one architecture, two names
    assert preset_name(NVAEConfig.preset("ffhq256"), "celebahq256") == "celebahq256"


def test_final_validation_line_reads_validation_final_json(tmp_path):
    assert _final_validation_line(tmp_path) == ""            # no final evaluation ran
    (tmp_path / FINAL_FILE).write_text(json.dumps({"nll": 80.1234567, "bpd": 0.1474, "num_samples": 100,
                                                   "num_images": 10000}))
    line = _final_validation_line(tmp_path)
    assert "NLL 80.1235 nats/image" in line and "0.1474 bits/dim" in line and "K=100" in line
    (tmp_path / FINAL_FILE).write_text(json.dumps({"nll": None, "bpd": None}))
    assert _final_validation_line(tmp_path) == ""
    (tmp_path / FINAL_FILE).write_text("{not json")
    assert _final_validation_line(tmp_path) == ""


def test_eval_says_where_it_wrote_on_stderr_and_keeps_stdout_json(spaced_run, tmp_path, capsys):
    run, _ = spaced_run
    out = tmp_path / "e.json"
    capsys.readouterr()
    assert main(["eval", str(run), "-k", "2", "--max-images", "4", "--batch-size", "4", "--no-progress",
                 "--output", str(out)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == json.loads(out.read_text())
    assert f"wrote {out}" in captured.err
