"""Hostile input: degenerate numbers, concurrent runs, stale caches, changed data, full disks and frozen peers
give the right result or one clear line on stderr, exit status 2 (1 for a lost peer), and nothing written."""
import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import DATA, needs_shared
from gloo import spawn
from nvae.formats.checkpoint import atomic_torch_save, atomic_write
from nvae.cli import main
from nvae.training.run_dir import RunLock, write_json

TINY = ["--model", "num_channels_enc=4", "--model", "num_channels_dec=4", "--batch-size", "16",
        "--train", "image_every=1000"]


def _listing(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")} \
        if root.exists() else {}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("hostile") / "run"
    assert main(["train", "--run-dir", str(run), "--max-steps", "2", *TINY]) == 0
    return run


def _refused(argv, message, capsys, *roots):
    before = [_listing(r) for r in roots]
    assert main(argv) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]   # after any progress bar of the work done before the check
    assert last.startswith("nvae: error:") and message in last and err.count("nvae:") == 1, err
    assert "Traceback" not in err
    assert [_listing(r) for r in roots] == before


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


# ------------------------------------------------------------------ runs that belong to one process
def _train_cmd(run_dir, *extra):
    return [sys.executable, "-m", "nvae", "train", "--run-dir", str(run_dir), *TINY, *extra]


def test_two_trainings_into_one_directory_and_a_resume_while_training_are_refused(tmp_path, capsys):
    target = tmp_path / "shared"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen(_train_cmd(target, "--max-steps", "100000"), env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (target / "model_config.json").exists() and time.time() < deadline:
            time.sleep(0.2)
        assert (target / RunLock.NAME).read_text().strip() == str(first.pid)
        second = subprocess.run(_train_cmd(target, "--max-steps", "2"), env=env, capture_output=True, text=True,
                                timeout=120)
        assert second.returncode == 2 and "already holds a run" in second.stderr
        resumed = subprocess.run([sys.executable, "-m", "nvae", "train", "--resume", str(target)], env=env,
                                 capture_output=True, text=True, timeout=120)
        assert resumed.returncode == 2
        assert f"in use by another nvae process (PID {first.pid})" in resumed.stderr
    finally:
        first.kill()
        first.wait()
    # killed, the lock is gone with it
    assert main(["train", "--resume", str(target), "--max-steps", "1"]) in (0,)


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


# ------------------------------------------------------------------ caches and files
def test_a_re_adjustment_cache_of_older_weights_is_not_reused(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", "--run-dir", str(run_dir), "--max-steps", "1", "--checkpoint-every", "1", *TINY]) == 0
    sample = ["sample", str(run_dir), "-n", "2", "-t", "0.7", "--readjust-bn", "--readjust-steps", "2"]
    assert main(sample) == 0 and "re-adjusted and cached" in capsys.readouterr().out
    assert main(sample) == 0 and "from cache" in capsys.readouterr().out
    assert main(["train", "--resume", str(run_dir), "--max-steps", "2"]) == 0     # the weights move on
    capsys.readouterr()
    assert main(sample) == 0 and "re-adjusted and cached" in capsys.readouterr().out


def _full_disk(obj, f, *args, **kwargs):
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError as e:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0") from e


def test_a_full_disk_is_said_plainly_and_the_previous_file_survives(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    atomic_torch_save({"step": 1}, path)
    monkeypatch.setattr(torch, "save", _full_disk)
    with pytest.raises(OSError, match=r"no space left on the device .*\(the previous file is intact\)") as e:
        atomic_torch_save({"step": 2}, path)
    assert e.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]   # no temporary file left


def test_temporary_files_of_a_killed_writer_are_removed_by_the_next_write(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f".samples_t1.npz.{dead.stdout.strip()}.abc123.tmp"
    orphan.write_bytes(b"")
    live = tmp_path / f".samples_t1.npz.{os.getpid()}.def456.tmp"   # a writer still at work
    live.write_bytes(b"")
    atomic_write(tmp_path / "samples_t1.npz", lambda f: f.write(b"data"))
    assert not orphan.exists() and live.exists() and (tmp_path / "samples_t1.npz").read_bytes() == b"data"


# ------------------------------------------------------------------ a frozen peer
def _frozen_peer_worker(rank: int) -> dict:
    from nvae.distributed import PeerTimeout, init_distributed, waiting_for_peers
    ctx = init_distributed("cpu")
    if rank == 1:
        time.sleep(8)        # frozen: it never joins the collective in time
        return {"message": ""}
    start = time.perf_counter()
    try:
        with waiting_for_peers("training step 7", ctx):
            ctx.any(True)
    except PeerTimeout as e:
        return {"message": str(e), "seconds": time.perf_counter() - start}
    return {"message": "no timeout", "seconds": time.perf_counter() - start}


def test_a_frozen_peer_ends_the_wait_within_the_timeout_and_says_where(tmp_path):
    ranks = spawn(_frozen_peer_worker, tmp_path, timeout=2)
    message = ranks[0]["message"]
    assert "process 0 of 2 got no answer from the others during training step 7" in message
    assert ranks[0]["seconds"] < 7
