"""Bad input gets one clear error: a message naming the problem and the fix, exit status 2, no
traceback (unless --debug), and nothing half-written. Missing, unreadable or mismatched data, contradictory
or degenerate arguments, checkpoints and configuration files that are not what they claim, outputs over a
run's own files, and a resume on other data; without --strict-data, images that can be skipped or converted are."""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import DATA, needs_shared, file_listing
from nvae.cli import main
from nvae.training.run_dir import write_json

TINY = ["--model", "num_channels_enc=8", "--model", "num_channels_dec=8", "--batch-size", "4",
        "--train", "image_every=1000"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", "--run-dir", str(run), "--max-steps", "2", *TINY]) == 0
    return run


def _refused(argv, message, capsys, *roots):
    before = [file_listing(r) for r in roots]
    assert main(argv) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]   # after any progress bar of the work done before the check
    assert last.startswith("nvae: error:") and message in last and err.count("nvae:") == 1, err
    assert "Traceback" not in err
    assert [file_listing(r) for r in roots] == before


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
                                              "is not a torch checkpoint"),
        "checkpoint that is not one (resume)": (["train", "--resume", str(garbage_run)],
                                                "is not a torch checkpoint"),
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
def test_one_clear_error_exit_2_nothing_written(name, run, tmp_path, capsys):
    argv, message = _cases(tmp_path, run)[name]
    before_run, before_tmp = file_listing(run), file_listing(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("nvae: error:") and message in err, err
    assert "Traceback" not in err and err.count("\n") == 1
    assert file_listing(run) == before_run                   # the existing run is untouched
    assert file_listing(tmp_path) == before_tmp              # no new run directory, no stray files


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        main(["--debug", "train", "--preset", "mnist_small", "--data", str(tmp_path / "nope")])


def test_unreadable_image_is_skipped_with_a_warning_and_counted_without_strict(tmp_path, caplog):
    broken = _images(tmp_path / "broken", 12)
    (broken / "bad.png").write_bytes((broken / "0.png").read_bytes()[:30])
    run = tmp_path / "run"
    rc = main(["train", "--train", "dataset=folder", "--data", str(broken), "--run-dir", str(run),
               "--max-steps", "2", *TINY])
    assert "skipping unreadable image" in caplog.text and "bad.png" in caplog.text
    assert rc == 0
    assert (run / "checkpoint.pt").is_file()


def test_wrong_channel_count_is_converted_without_strict(tmp_path):
    rgb = _images(tmp_path / "rgb", 12, "RGB")
    run = tmp_path / "run"
    assert main(["train", "--train", "dataset=folder", "--data", str(rgb), "--run-dir", str(run),
                 "--max-steps", "1", *TINY]) == 0
    model = torch.load(run / "checkpoint.pt", weights_only=True)
    assert model["config"]["in_channels"] == 1


# ------------------------------------------------------------------ degenerate numbers, broken files, other data
@pytest.mark.parametrize("args, message", [
    (["interpolate", "{run}", "--steps", "0"], "--steps: invalid positive integer"),
    (["interpolate", "{run}", "--a", "-1"], "--a: invalid non-negative integer"),
    (["reconstruct", "{run}", "-n", "-3"], "-n: invalid positive integer"),
    (["sample", "{run}", "-n", "0"], "-n: invalid positive integer"),
    (["sample", "{run}", "-t", "nan"], "--temperature/-t: invalid finite non-negative number"),
    (["sample", "{run}", "-t", "-1"], "--temperature/-t: invalid finite non-negative number"),
    (["sample", "{run}", "--temperatures", "0.5,inf"], "finite numbers >= 0"),
    (["sample", "{run}", "--readjust-bn", "--readjust-steps", "0"], "--readjust-steps: invalid positive integer"),
    (["eval", "{run}", "-k", "0"], "--num-samples/-k: invalid positive integer"),
    (["eval", "{run}", "--batch-size", "0"], "--batch-size: invalid positive integer"),
    (["eval", "{run}", "--max-images", "-1"], "--max-images: invalid positive integer"),
    (["eval", "{run}", "--dist-timeout", "0"], "--dist-timeout: invalid finite positive number"),
    (["kl-stats", "{run}", "--batch-size", "0"], "--batch-size: invalid positive integer"),
    (["fid", "{run}", "--stats", "x.npz", "-n", "0"], "--num-samples: invalid positive integer"),
    (["train", "--learning-rate", "nan", "--run-dir", "{new}"], "--learning-rate: invalid finite positive number"),
    (["train", "--train", "learning_rate=inf", "--run-dir", "{new}"], "learning_rate must be a finite number"),
    (["train", "--train", "kl_anneal_portion=0", "--run-dir", "{new}"], "kl_anneal_portion must be > 0"),
    (["train", "--train", "skip_grad_factor=0.5", "--run-dir", "{new}"], "skip_grad_factor must be > 1"),
    (["train", "--epochs", "0", "--run-dir", "{new}"], "--epochs: invalid positive integer"),
    (["train", "--max-minutes", "-2", "--run-dir", "{new}"], "--max-minutes: invalid finite positive number"),
    (["train", "--device", "banana", "--run-dir", "{new}"], "'banana' is not a torch device"),
    (["eval", "{run}", "--device", "cuda:0"] if not torch.cuda.is_available() else ["eval", "{run}", "-k", "-1"],
     "no CUDA device" if not torch.cuda.is_available() else "invalid positive integer"),
])
def test_degenerate_numbers_are_refused_before_anything_is_written(run, tmp_path, capsys, args, message):
    argv = [a.format(run=run, new=tmp_path / "new") for a in args]
    _refused(argv, message, capsys, run, tmp_path)


def test_a_config_file_holding_null_is_a_clear_error(run, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_config.json").write_text("null\n")
    (broken / "train_config.json").write_text("{}\n")
    _refused(["train", "--resume", str(broken)], "must be a JSON object", capsys, broken)


def test_a_non_finite_evaluation_writes_no_json(run, tmp_path, capsys):
    from nvae import NVAE
    model = NVAE.from_checkpoint(run / "checkpoint.pt")
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    bad = tmp_path / "nan_run"
    model.save(bad / "checkpoint.pt", train_config={"dataset": "digits"})
    _refused(["eval", str(bad), "-k", "2", "--max-images", "2"], "not a finite number", capsys, bad)
    with pytest.raises(ValueError, match="not a finite number"):
        write_json(tmp_path / "x.json", {"nll": float("nan")})
    assert not (tmp_path / "x.json").exists()


@needs_shared("data", "cifar-10-batches-py")
def test_a_data_set_that_does_not_fit_the_model_is_one_check_everywhere(run, capsys):
    for command in (["eval", str(run), "-k", "2"], ["reconstruct", str(run)], ["kl-stats", str(run)],
                    ["interpolate", str(run)]):
        _refused(command + ["--dataset", "cifar10", "--data", str(DATA)], "yields images of shape (3, 32, 32) but "
                 "the model expects (1, 8, 8)", capsys, run)


def test_resuming_on_other_data_is_refused_unless_asked(tmp_path, capsys):
    def folder(path, n):
        path.mkdir()
        for i in range(n):
            Image.new("L", (8, 8), color=(i * 7) % 255).save(path / f"{i}.png")
        return path

    a, b = folder(tmp_path / "a", 40), folder(tmp_path / "b", 60)
    run_dir = tmp_path / "run"
    data = ["--train", "dataset=folder", "--model", "num_channels_enc=4", "--model", "num_channels_dec=4",
            "--batch-size", "8", "--train", "image_every=1000"]
    assert main(["train", "--run-dir", str(run_dir), "--data", str(a), "--max-steps", "1", *data]) == 0
    _refused(["train", "--resume", str(run_dir), "--data", str(b), "--max-steps", "2"],
             "pass --allow-data-change", capsys, run_dir)
    assert main(["train", "--resume", str(run_dir), "--data", str(b), "--max-steps", "2", "--allow-data-change"]) == 0
    stored = torch.load(run_dir / "checkpoint.pt", weights_only=True)["data"]
    assert stored["root"] == str(b.resolve()) and stored["train_images"] > 40
    # the permission was for that resume only
    assert json.loads((run_dir / "train_config.json").read_text()).get("allow_data_change") is True
    _refused(["train", "--resume", str(run_dir), "--data", str(a), "--max-steps", "3"], "--allow-data-change",
             capsys, run_dir)


# ------------------------------------------------------------------ numbers read from files
@pytest.fixture(scope="module")
def latents(run, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("latents") / "latents.npz"
    assert main(["encode", str(run), "--max-images", "3", "--no-progress", "--output", str(path)]) == 0
    return path


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_decoding_non_finite_latents_is_refused_before_anything_is_written(run, latents, tmp_path, capsys, value):
    """NaN latents decode to NaN images that look like a result: the file is refused, naming the group."""
    import numpy as np
    with np.load(latents) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["z_1"] = arrays["z_1"].copy()
    arrays["z_1"].flat[:2] = value
    bad = tmp_path / "latents.npz"
    np.savez(bad, **arrays)
    _refused(["decode", str(bad), "--no-progress", "--output", str(tmp_path / "out.png")],
             f"{bad}: group 1 holds 2 non-finite values (NaN or inf)", capsys, tmp_path, run)


# ------------------------------------------------------------------ outputs that cannot be written
def _read_only_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


def test_a_read_only_output_folder_is_refused_before_the_evaluation(run, tmp_path, capsys):
    """Found at the end, a read-only folder would throw the whole evaluation away."""
    folder = _read_only_folder(tmp_path)
    try:
        try:   # root ignores permission bits: the probe says whether this test can see them
            (folder / "probe").touch()
            (folder / "probe").unlink()
            pytest.skip("running as root: permission bits are not enforced (the next test covers the check)")
        except PermissionError:
            pass
        _refused(["eval", str(run), "-k", "2", "--max-images", "2", "--output", str(folder / "e.json")],
                 f"the folder {folder} is not writable", capsys, tmp_path, run)
    finally:
        folder.chmod(0o755)


def test_the_writable_check_refuses_what_os_access_refuses(run, tmp_path, capsys, monkeypatch):
    """The same check as root: ``os.access`` saying no for the folder, then for an existing file."""
    import os
    folder, real = tmp_path / "out", os.access
    folder.mkdir()
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != folder and real(p, mode, **kw))
    _refused(["eval", str(run), "-k", "2", "--max-images", "2", "--output", str(folder / "e.json")],
             f"the folder {folder} is not writable; make it writable", capsys, tmp_path, run)
    existing = folder / "e.json"
    existing.write_text("{}\n")
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != existing and real(p, mode, **kw))
    _refused(["eval", str(run), "-k", "2", "--max-images", "2", "--output", str(existing)],
             f"the output {existing} cannot be replaced: the file is read-only", capsys, tmp_path, run)


# ------------------------------------------------------------------ run files that are symbolic links
def test_resuming_a_run_whose_log_is_a_symlink_does_not_write_through_it(tmp_path):
    from nvae.training.run_dir import RunDirError, RunLog
    run_dir, target = tmp_path / "run", tmp_path / "elsewhere.txt"
    run_dir.mkdir()
    target.write_text("not the run's\n")
    (run_dir / "log.txt").symlink_to(target)
    with pytest.raises(RunDirError, match=r"log\.txt is a symbolic link; .*never through a link"):
        RunLog(run_dir, enabled=True)
    assert target.read_text() == "not the run's\n"


def test_resume_refuses_a_symlinked_log_before_writing_anything(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), "--max-steps", "1", "--batch-size", "8", "--model",
                 "num_channels_enc=4", "--model", "num_channels_dec=4", "--final-eval-samples", "0"]) == 0
    target = tmp_path / "elsewhere.txt"
    target.write_text("not the run's\n")
    (run / "log.txt").unlink()
    (run / "log.txt").symlink_to(target)
    def run_files():   # the lock notes each holder's PID: every other file must stay as it is
        return {k: v for k, v in file_listing(run).items() if k != ".nvae.lock"}

    before = run_files()
    capsys.readouterr()
    # --max-steps is run control: a resume that went ahead would rewrite train_config.json with it
    assert main(["train", "--resume", str(run), "--max-steps", "2"]) == 2
    assert "log.txt is a symbolic link" in capsys.readouterr().err
    assert run_files() == before and target.read_text() == "not the run's\n"


def test_a_symlinked_events_file_is_refused(tmp_path):
    from nvae.training.run_dir import RunDirError, RunLog
    run_dir, target = tmp_path / "run", tmp_path / "elsewhere"
    run_dir.mkdir()
    target.write_bytes(b"")
    (run_dir / "events.out.tfevents.1.host.1.0").symlink_to(target)
    with pytest.raises(RunDirError, match=r"events\.out\.tfevents\.1\.host\.1\.0 is a symbolic link"):
        RunLog(run_dir, enabled=True)
    assert not (run_dir / "log.txt").exists()


def test_an_image_grid_replaces_a_symlink_instead_of_following_it(tmp_path):
    """Grids are written through a rename, which replaces the link itself: its target is never touched."""
    from nvae.training.run_dir import save_grid
    target = tmp_path / "elsewhere.png"
    target.write_bytes(b"keep")
    (tmp_path / "samples.png").symlink_to(target)
    save_grid(torch.rand(4, 1, 8, 8), tmp_path / "samples.png")
    assert target.read_bytes() == b"keep" and not (tmp_path / "samples.png").is_symlink()
