"""Runs a cluster can kill: real ``torchrun --max-restarts 1`` jobs (gloo, two processes) that lose a worker,
lose a worker while it writes the first checkpoint, or lose the torchrun agent itself. Each ends at
``--max-steps`` with status 0 and, being ``--deterministic``, with the weights of a run nobody disturbed."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import threading
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from nvae.distributed import DistributedContext, PeerLost, PeerTimeout, _round_store, peer_failure

WORLD = 2
STEPS, EVERY = 20, 4
ARGS = ["--resume", "auto", "--max-steps", str(STEPS), "--checkpoint-every", str(EVERY), "--batch-size", "8",
        "--deterministic", "--model", "num_channels_enc=4", "--model", "num_channels_dec=4", "--no-progress",
        "--eval-every", "0", "--final-eval-samples", "0", "--dist-timeout", "0.5", "--train", "image_every=1000"]

#: Loaded by every Python process of the job through PYTHONPATH: with NVAE_TEST_KILL_IN_SAVE set, rank 0 of
#: the first start kills itself once the first checkpoint's bytes are in the temporary file, before the rename.
KILL_IN_SAVE = '''
import os
if (os.environ.get("NVAE_TEST_KILL_IN_SAVE") and os.environ.get("RANK") == "0"
        and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0"):
    import signal
    import torch
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        if isinstance(obj, dict) and "step" in obj:
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    torch.save = save
'''


def _command(run: Path) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
            "--max-restarts", "1", "-m", "nvae", "train", "--run-dir", str(run), *ARGS]


def _env(extra_path: Path = None, **extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        env.pop(key, None)
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(extra_path), env.get("PYTHONPATH")]))
    return env


def _start(run: Path, output: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(_command(run), cwd=run.parent, env=env, stdout=output.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _finish(proc: subprocess.Popen, output: Path, timeout: float = 150) -> str:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"the job did not end within {timeout} s:\n{output.read_text()[-3000:]}")
    return output.read_text()


def _checkpoint_step(run: Path) -> int:
    try:
        return torch.load(run / "checkpoint.pt", weights_only=True)["step"]
    except Exception:   # not there yet, or being replaced
        return -1


def _wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout} s for {what}")
        time.sleep(0.05)


def _children(pid: int) -> list:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _weights(run: Path) -> dict:
    stored = torch.load(run / "checkpoint.pt", weights_only=True)
    assert stored["step"] == STEPS
    return stored["state_dict"]


def _assert_same_weights(run: Path, reference: dict) -> None:
    weights = _weights(run)
    assert weights.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(weights[key], value), key


# ------------------------------------------------------------------ the parts, in one process
def _join(port: int, rank: int, into: dict, timeout: float = 20.0) -> threading.Thread:
    def run():
        try:
            into[rank] = _round_store("127.0.0.1", port, rank, WORLD, timedelta(seconds=timeout))
        except Exception as e:   # noqa: BLE001 - the test looks at it
            into[rank] = e
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_each_start_of_a_group_gets_a_store_part_the_last_start_did_not_touch():
    """torchrun's agent keeps one store for every restart: a restarted rank must not read the keys of the
    processes it replaces, whichever rank arrives first."""
    agent = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    first = {}
    for t in [_join(agent.port, r, first) for r in range(WORLD)]:
        t.join()
    first[0].set("address/0", "of a process that will die")
    assert first[1].get("address/0") == b"of a process that will die"    # one part per start, shared by all
    second = {}
    rank_1 = _join(agent.port, 1, second)    # rank 1 of the restart comes first, while the old number stands
    time.sleep(0.5)
    rank_0 = _join(agent.port, 0, second)
    rank_1.join(), rank_0.join()
    assert not second[0].check(["address/0"]) and not second[1].check(["address/0"])
    second[1].set("address/1", "new")
    assert second[0].get("address/1") == b"new"


def test_a_missing_rank_0_ends_the_wait_within_the_timeout():
    agent = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    agent.set("nvae/current", "7")            # a dead start's number, which nobody will answer
    alone, start = {}, time.monotonic()
    _join(agent.port, 1, alone, timeout=1.0).join()
    assert isinstance(alone[1], RuntimeError) and time.monotonic() - start < 5
    failure = peer_failure(alone[1], DistributedContext(rank=1, world_size=2), "the creation of the process group")
    assert isinstance(failure, PeerTimeout) and "the creation of the process group" in str(failure)
    alone, start = {}, time.monotonic()
    _join(agent.port, 0, alone, timeout=1.0).join()      # rank 0 whose peer never says hello
    assert isinstance(peer_failure(alone[0], DistributedContext(world_size=2), "x"), PeerTimeout)
    assert time.monotonic() - start < 5


def test_a_broken_connection_is_a_lost_peer_and_other_errors_keep_their_words():
    ctx = DistributedContext(rank=1, world_size=2)
    gloo = RuntimeError("[../gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:14017: Connection reset by peer")
    lost = peer_failure(gloo, ctx, "training step 12")
    assert isinstance(lost, PeerLost) and str(lost).startswith("process 1 of 2 lost another process during "
                                                               "training step 12")
    assert peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"), ctx, "x") is None
    assert peer_failure(OSError("No space left on device"), ctx, "x") is None
    assert peer_failure(gloo, DistributedContext(), "x") is None       # one process has no peers to lose


# ------------------------------------------------------------------ real torchrun jobs
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc, pgrep and prctl")


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory) -> dict:
    run = tmp_path_factory.mktemp("undisturbed") / "run"
    out = run.parent / "out.txt"
    text = _finish(_start(run, out, _env()), out)
    assert "done:" in text, text[-3000:]
    return _weights(run)


def test_a_worker_killed_mid_run_is_restarted_and_the_run_ends_as_if_undisturbed(tmp_path, undisturbed):
    run, out = tmp_path / "run", tmp_path / "out.txt"
    agent = _start(run, out, _env())
    # Any step after the first checkpoint, any of the two workers.
    after = random.choice(range(EVERY, STEPS // 2 + 1, EVERY))
    _wait_until(lambda: _checkpoint_step(run) >= after, 120, f"the checkpoint of step {after}")
    time.sleep(random.uniform(0.0, 0.3))
    victim = random.choice(_children(agent.pid))
    os.kill(victim, signal.SIGKILL)
    text = _finish(agent, out)
    assert agent.returncode == 0, text[-3000:]
    # The survivor ended with one line naming the step, not a traceback of ours.
    assert "lost another process during" in text and "nvae: error: process" in text, text[-3000:]
    assert "[rank0]: Traceback" not in text and "[rank1]: Traceback" not in text, text[-3000:]
    assert "resumed at step" in (run / "log.txt").read_text()
    _assert_same_weights(run, undisturbed)


def test_a_worker_killed_while_writing_the_first_checkpoint(tmp_path, undisturbed):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_IN_SAVE)
    run, out = tmp_path / "run", tmp_path / "out.txt"
    agent = _start(run, out, _env(hook, NVAE_TEST_KILL_IN_SAVE="1"))
    text = _finish(agent, out)
    assert agent.returncode == 0, text[-3000:]
    log = (run / "log.txt").read_text()
    # The first start died before its checkpoint existed: the second started over from step 0.
    assert "no checkpoint in" in log and "starting the run from the beginning" in log, log
    assert [p.name for p in run.iterdir() if p.name.endswith(".tmp")] == []   # the dead writer's was removed
    _assert_same_weights(run, undisturbed)


def test_a_killed_agent_stops_its_workers_and_the_same_command_continues(tmp_path, undisturbed):
    run, out = tmp_path / "run", tmp_path / "out.txt"
    agent = _start(run, out, _env())
    _wait_until(lambda: _checkpoint_step(run) >= EVERY, 120, "the first checkpoint")
    workers = _children(agent.pid)
    os.kill(agent.pid, signal.SIGKILL)
    agent.wait()
    # The workers are told (SIGTERM on their parent's death): they checkpoint and stop.
    _wait_until(lambda: not any(map(_alive, workers)), 60, "the orphaned workers to stop")
    stopped_at = _checkpoint_step(run)
    assert EVERY <= stopped_at <= STEPS
    again = _start(run, tmp_path / "again.txt", _env())
    text = _finish(again, tmp_path / "again.txt")
    assert again.returncode == 0, text[-3000:]
    if stopped_at < STEPS:
        assert f"resumed at step {stopped_at}" in (run / "log.txt").read_text()
    _assert_same_weights(run, undisturbed)
