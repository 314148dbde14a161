"""A checkpoint belongs to its run (issue 25): ``--resume auto``, and a checkpoint or config of another run refused."""
import json
import shutil
from pathlib import Path

import pytest
from conftest import file_listing

from nvae.cli import main
from nvae.formats.checkpoint import read_checkpoint
from nvae.training.run_dir import RunDirError, check_checkpoint_belongs

TINY = ["--model", "num_channels_enc=4", "--model", "num_channels_dec=4", "--batch-size", "16",
        "--train", "image_every=1000"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two finished tiny runs of different model sizes (encoder width 4 and 8)."""
    root = tmp_path_factory.mktemp("runs")
    small, wide = root / "small", root / "wide"
    assert main(["train", "--run-dir", str(small), "--max-steps", "2", *TINY]) == 0
    assert main(["train", "--run-dir", str(wide), "--max-steps", "2", *TINY, "--model", "num_channels_enc=8"]) == 0
    return small, wide


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to, ignore=shutil.ignore_patterns(".nvae.lock"))
    return to


# ------------------------------------------------------------------ --resume auto
def test_resume_auto_starts_a_run_then_continues_it(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--resume", "auto", "--run-dir", str(run), *TINY]
    assert main([*argv, "--max-steps", "2"]) == 0
    assert read_checkpoint(run / "checkpoint.pt")["step"] == 2
    assert "training" in capsys.readouterr().out
    assert main([*argv, "--max-steps", "4"]) == 0          # the same command line, restarted
    assert "resuming" in capsys.readouterr().out
    assert read_checkpoint(run / "checkpoint.pt")["step"] == 4
    assert "resumed at step 2" in (run / "log.txt").read_text()


def test_resume_auto_needs_the_run_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--resume", "auto", "--max-steps", "1", *TINY]) == 2
    err = capsys.readouterr().err
    assert "--resume auto needs the run's directory" in err and "./auto" in err
    assert file_listing(tmp_path) == {}


def test_a_directory_named_auto_is_resumed_as_dot_slash_auto(two_runs, tmp_path, capsys, monkeypatch):
    _copy(two_runs[0], tmp_path / "auto")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--resume", "./auto", "--max-steps", "3"]) == 0
    assert read_checkpoint(tmp_path / "auto" / "checkpoint.pt")["step"] == 3


# ------------------------------------------------------------------ a checkpoint belongs to its run
@pytest.mark.parametrize("how", ["--resume RUN", "--resume auto"])
def test_a_checkpoint_of_another_run_is_refused_and_nothing_is_written(two_runs, tmp_path, capsys, how):
    run = _copy(two_runs[0], tmp_path / "run")
    shutil.copy(two_runs[1] / "checkpoint.pt", run / "checkpoint.pt")     # the wide run's checkpoint
    before = file_listing(run)
    argv = ["--resume", str(run)] if how == "--resume RUN" else ["--resume", "auto", "--run-dir", str(run), *TINY]
    assert main(["train", *argv, "--max-steps", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{run / 'checkpoint.pt'} does not belong to this run" in err
    assert f"num_channels_enc is 8 in the checkpoint and 4 in {run / 'model_config.json'}" in err
    assert file_listing(run) == before


def test_a_hand_edited_model_config_is_refused_not_rewritten(two_runs, tmp_path, capsys):
    run = _copy(two_runs[0], tmp_path / "run")
    cfg = json.loads((run / "model_config.json").read_text())
    cfg["num_channels_dec"] = 16
    (run / "model_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    before = file_listing(run)
    assert main(["train", "--resume", str(run), "--max-steps", "3"]) == 2
    assert "num_channels_dec is 4 in the checkpoint and 16 in" in capsys.readouterr().err
    assert file_listing(run) == before
    assert json.loads((run / "model_config.json").read_text())["num_channels_dec"] == 16


def test_training_configs_are_compared_but_run_control_may_differ(two_runs):
    run = two_runs[0]
    state = read_checkpoint(run / "checkpoint.pt")
    check_checkpoint_belongs(run, state)                                   # its own: fine
    state["train_config"] = {**state["train_config"], "max_steps": 1000, "log_every": 7}
    check_checkpoint_belongs(run, state)                                   # run control only: fine
    state["train_config"]["seed"] = state["train_config"]["seed"] + 1
    with pytest.raises(RunDirError, match=r"seed is \d+ in the checkpoint and \d+ in .*train_config.json"):
        check_checkpoint_belongs(run, state)


def test_reading_a_run_whose_model_config_disagrees_warns(two_runs, tmp_path, caplog):
    """One warning (the ``nvae`` logger; a command prints it on stderr): the checkpoint's weights decide."""
    run = _copy(two_runs[0], tmp_path / "run")
    cfg = json.loads((run / "model_config.json").read_text())
    cfg["num_channels_enc"] = 32
    (run / "model_config.json").write_text(json.dumps(cfg))
    with caplog.at_level("WARNING", logger="nvae"):
        assert main(["sample", str(run), "-n", "4", "--out", str(tmp_path / "samples")]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert warnings[0].startswith("nvae: warning: ") and "num_channels_enc is 4 in the checkpoint and 32" in warnings[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="nvae"):
        assert main(["sample", str(two_runs[0]), "-n", "4", "--out", str(tmp_path / "own")]) == 0
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
