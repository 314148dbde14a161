"""Exact resume: a run killed at any point and resumed ends bit-identical to one never stopped.

All runs are subprocesses with one thread and deterministic algorithms, so the
uninterrupted reference and the interrupted runs execute the same arithmetic.
"""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

TOTAL, EVERY = 24, 6
TINY = ["--model", "num_channels_enc=8", "--model", "num_channels_dec=8", "--batch-size", "32"]


def _cmd(run: Path, *extra: str):
    return [sys.executable, "-m", "nvae", "train", "--run-dir", str(run), "--max-steps", str(TOTAL),
            "--checkpoint-every", str(EVERY), "--deterministic", "--train", "log_every=1",
            "--train", "image_every=1000", *TINY, *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _train(run: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(_cmd(run, *extra), env=_env(), capture_output=True, text=True, timeout=300)
    if check:
        assert out.returncode == 0, out.stderr[-2000:]
    return out


def _resume(run: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "nvae", "train", "--resume", str(run)], env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def _logged_step(run: Path) -> int:
    try:
        lines = (run / "log.txt").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [int(line.split(" step ")[1].split()[0]) for line in lines if " step " in line and " nelbo " in line]
    return max(steps, default=0)


def _assert_identical(a: Path, b: Path) -> None:
    sa = torch.load(a / "checkpoint.pt", weights_only=True)
    sb = torch.load(b / "checkpoint.pt", weights_only=True)
    assert sa["step"] == sb["step"] == TOTAL
    for key, value in sa["state_dict"].items():
        assert torch.equal(value, sb["state_dict"][key]), key
    oa, ob = sa["optimizer"]["state"], sb["optimizer"]["state"]
    assert oa.keys() == ob.keys()
    for i in oa:
        for name in oa[i]:
            assert torch.equal(torch.as_tensor(oa[i][name]), torch.as_tensor(ob[i][name])), (i, name)
    for key in ("torch", "data"):
        assert torch.equal(sa["rng"][0][key], sb["rng"][0][key])
    assert sa["guard"] == sb["guard"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("reference") / "run"
    _train(run)
    return run


def test_sigkill_at_a_random_step_then_resume_is_bit_identical(reference, tmp_path):
    run = tmp_path / "run"
    kill_at = random.Random().randint(EVERY + 1, TOTAL - 4)
    proc = subprocess.Popen(_cmd(run), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while _logged_step(run) < kill_at and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stopped = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
    assert EVERY <= stopped < TOTAL, f"killed after step {kill_at}, last checkpoint at {stopped}"
    _resume(run)
    _assert_identical(reference, run)
    assert f"resumed at step {stopped}" in (run / "log.txt").read_text()


_KILL_MID_WRITE = """
import os, signal, sys
import torch
import nvae.formats.checkpoint as ck
from nvae.cli import main
saves = []
real_save = torch.save
def save(obj, f, *a, **k):
    saves.append(1)
    if len(saves) == 2:          # the second checkpoint: write half of it, then die
        import io
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *a, **k)
ck.torch.save = save
sys.exit(main(sys.argv[1:]))
"""


def test_kill_while_writing_a_checkpoint_resumes_from_the_last_complete_one(reference, tmp_path):
    run = tmp_path / "run"
    cmd = _cmd(run)
    out = subprocess.run([sys.executable, "-c", _KILL_MID_WRITE, *cmd[3:]], env=_env(), capture_output=True,
                         timeout=300)
    assert out.returncode == -signal.SIGKILL
    assert list(run.glob(".checkpoint.pt.*.tmp")), "the half-written file should be left behind"
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == EVERY   # the first, complete one
    _resume(run)
    assert not list(run.glob(".checkpoint.pt.*.tmp"))
    _assert_identical(reference, run)


def test_sigterm_writes_a_checkpoint_and_resume_continues_exactly(reference, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(_cmd(run), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while _logged_step(run) < EVERY + 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM" in err and "--resume" in err
    step = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
    assert step == _logged_step(run) < TOTAL   # saved at the step where it stopped, not at the last periodic one
    _resume(run)
    _assert_identical(reference, run)
