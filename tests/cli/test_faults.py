"""Faults from outside the input: a run directory in use by another process, two trainings into one
directory, a stale re-adjustment cache, a full disk, temporary files of a killed writer and a frozen peer.
Each gives the right result or one clear line on stderr (exit status 2; 1 for a lost peer), and leaves the
files as they were."""
import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import file_listing
from gloo import spawn
from nvae.cli import main
from nvae.formats.checkpoint import atomic_torch_save, atomic_write
from nvae.training.run_dir import RunLock

TINY = ["--model", "num_channels_enc=4", "--model", "num_channels_dec=4", "--batch-size", "16",
        "--train", "image_every=1000"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", "--run-dir", str(run), "--max-steps", "2", *TINY]) == 0
    return run


# ------------------------------------------------------------------ runs that belong to one process
def test_a_run_directory_in_use_is_refused_with_the_holders_pid(finished_run, tmp_path, capsys):
    lock = RunLock(finished_run).acquire()          # as a training process would hold it
    try:
        before = file_listing(finished_run)
        assert main(["train", "--resume", str(finished_run), "--max-steps", "3"]) == 2
        err = capsys.readouterr().err
        assert f"in use by another nvae process (PID {os.getpid()})" in err
        assert file_listing(finished_run) == before
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
