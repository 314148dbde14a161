"""Bad input gets one clear error: a message naming the problem and the fix, exit status 2, no
traceback (unless --debug), and nothing half-written."""
from pathlib import Path

import pytest
import torch
from PIL import Image

from nvae.cli import main

TINY = ["--model", "num_channels_enc=8", "--model", "num_channels_dec=8", "--batch-size", "4",
        "--train", "image_every=1000"]


def _listing(root: Path) -> dict:
    """Every file under ``root`` with its size and modification time."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", "--run-dir", str(run), "--max-steps", "2", *TINY]) == 0
    return run


def _images(folder: Path, n: int, mode: str = "L", size: int = 8) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new(mode, (size, size), color=(i * 20) % 255 if mode == "L" else (i, 2 * i, 3 * i)).save(
            folder / f"{i}.png")
    return folder


def _cases(tmp: Path, run: Path):
    empty = tmp / "empty"
    empty.mkdir()
    rgb = _images(tmp / "rgb", 12, "RGB")
    broken = _images(tmp / "broken", 12)
    (broken / "bad.png").write_bytes((broken / "0.png").read_bytes()[:30])   # truncated
    garbage = tmp / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    garbage_run = tmp / "garbage_run"
    garbage_run.mkdir()
    (garbage_run / "checkpoint.pt").write_bytes(b"\x80\x02junk")
    new = str(tmp / "new_run")
    folder = ["--train", "dataset=folder"]
    return {
        "missing data directory": (["train", "--preset", "mnist_small", "--data", str(tmp / "nope"),
                                    "--run-dir", new], "does not exist"),
        "empty data directory": (["train", *folder, "--data", str(empty), "--run-dir", new], "no images"),
        "unreadable image (strict)": (["train", *folder, "--data", str(broken), "--strict-data",
                                       "--run-dir", new], "cannot read image"),
        "wrong channel count (strict)": (["train", *folder, "--data", str(rgb), "--strict-data", "--run-dir", new],
                                         "channel"),
        "image size the architecture cannot divide": (["train", "--preset", "mnist_small", "--model",
                                                       "image_size=12", "--run-dir", new], "not divisible by 2^"),
        "contradictory: --resume and --run-dir": (["train", "--resume", str(run), "--run-dir", new],
                                                  "name different runs"),
        "contradictory: warm-up beyond the schedule": (["train", "--epochs", "2", "--train", "warmup_epochs=5",
                                                        "--run-dir", new], "never finish warming up"),
        "contradictory: two temperature options": (["sample", str(run), "-t", "0.5", "--temperatures", "0.6,0.7",
                                                    "--out", new], "contradict"),
        "checkpoint from another configuration": (["train", "--resume", str(run), "--model", "num_channels_enc=16"],
                                                  "different configuration"),
        "checkpoint from another training recipe": (["train", "--resume", str(run), "--learning-rate", "0.5"],
                                                    "learning_rate"),
        "checkpoint that is not one (eval)": (["eval", str(garbage), "--dataset", "digits"],
                                              "could not be read as a checkpoint"),
        "checkpoint that is not one (resume)": (["train", "--resume", str(garbage_run)],
                                                "could not be read as a checkpoint"),
        "nothing to resume": (["train", "--resume", str(tmp / "no_such_run")], "holds no run"),
        "run directory holding another run": (["train", "--run-dir", str(run), *TINY], "already holds a run"),
        "unknown preset": (["train", "--preset", "no_such", "--run-dir", new], "no_such"),
        "override of an unknown field": (["train", "--train", "nope=1", "--run-dir", new], "bad override"),
        "output over the run's checkpoint (eval)": (["eval", str(run), "-k", "2", "--max-images", "2", "--output",
                                                     str(run / "checkpoint.pt")], "belongs to a run"),
        "output over the run's config (reconstruct)": (["reconstruct", str(run), "-n", "2", "--output",
                                                        str(run / "model_config.json")], "belongs to a run"),
        "output of another kind (interpolate)": (["interpolate", str(run), "--output", str(run / "other.pt")],
                                                 "should end in .png"),
    }


CASE_NAMES = ["missing data directory", "empty data directory", "unreadable image (strict)",
              "wrong channel count (strict)", "image size the architecture cannot divide",
              "contradictory: --resume and --run-dir", "contradictory: warm-up beyond the schedule",
              "contradictory: two temperature options", "checkpoint from another configuration",
              "checkpoint from another training recipe", "checkpoint that is not one (eval)",
              "checkpoint that is not one (resume)", "nothing to resume", "run directory holding another run",
              "unknown preset", "override of an unknown field", "output over the run's checkpoint (eval)",
              "output over the run's config (reconstruct)", "output of another kind (interpolate)"]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_one_clear_error_exit_2_nothing_written(name, finished_run, tmp_path, capsys):
    argv, message = _cases(tmp_path, finished_run)[name]
    before_run, before_tmp = _listing(finished_run), _listing(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("nvae: error:") and message in err, err
    assert "Traceback" not in err and err.count("\n") == 1
    assert _listing(finished_run) == before_run          # the existing run is untouched
    assert _listing(tmp_path) == before_tmp              # no new run directory, no stray files


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        main(["--debug", "train", "--preset", "mnist_small", "--data", str(tmp_path / "nope")])


def test_unreadable_image_is_skipped_with_a_warning_and_counted_without_strict(tmp_path):
    broken = _images(tmp_path / "broken", 12)
    (broken / "bad.png").write_bytes((broken / "0.png").read_bytes()[:30])
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match="bad.png"):
        rc = main(["train", "--train", "dataset=folder", "--data", str(broken), "--run-dir", str(run),
                   "--max-steps", "2", *TINY])
    assert rc == 0
    assert (run / "checkpoint.pt").is_file()


def test_wrong_channel_count_is_converted_without_strict(tmp_path):
    rgb = _images(tmp_path / "rgb", 12, "RGB")
    run = tmp_path / "run"
    assert main(["train", "--train", "dataset=folder", "--data", str(rgb), "--run-dir", str(run),
                 "--max-steps", "1", *TINY]) == 0
    model = torch.load(run / "checkpoint.pt", weights_only=True)
    assert model["config"]["in_channels"] == 1


def test_a_run_directory_in_use_is_refused_with_the_holders_pid(finished_run, tmp_path, capsys):
    import os

    from nvae.training.run_dir import RunLock
    lock = RunLock(finished_run).acquire()          # as a training process would hold it
    try:
        before = _listing(finished_run)
        assert main(["train", "--resume", str(finished_run), "--max-steps", "3"]) == 2
        err = capsys.readouterr().err
        assert f"in use by another nvae process (PID {os.getpid()})" in err
        assert _listing(finished_run) == before
    finally:
        lock.release()
    # two runs started together into a new directory: the second is refused, and leaves nothing
    new = tmp_path / "new"
    lock = RunLock(new).acquire()
    try:
        assert main(["train", "--run-dir", str(new), "--max-steps", "1", *TINY]) == 2
        assert "in use by another nvae process" in capsys.readouterr().err
        assert sorted(p.name for p in new.iterdir()) == [RunLock.NAME]
    finally:
        lock.release(keep=False)
    assert not new.exists()
    # the lock dies with its holder: the run resumes once it is free
    assert main(["train", "--resume", str(finished_run), "--max-steps", "3"]) == 0
