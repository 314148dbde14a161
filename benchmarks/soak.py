"""Soak test of exact resume: train the digits preset while killing it at random, resume each time,
and compare the final weights with an uninterrupted run of the same configuration.

    python benchmarks/soak.py --steps 600 --checkpoint-every 25 --seed 0

Both runs are ``nvae train --deterministic`` subprocesses with the same thread
count. The interrupted run is killed (SIGKILL, or SIGTERM with probability
``--sigterm``) after a random interval, then resumed with ``nvae train --resume``
until it finishes. Prints JSON: steps, kills survived, steps recomputed after
kills, wall time of both runs, and the largest weight difference (0 = exact).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def _last_checkpoint_step(run: Path) -> int:
    try:
        return int(torch.load(run / "checkpoint.pt", weights_only=True)["step"])
    except Exception:  # noqa: BLE001 - no checkpoint yet
        return 0


def _logged_step(run: Path) -> int:
    try:
        lines = (run / "log.txt").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [int(line.split(" step ")[1].split()[0]) for line in lines if " step " in line and " nelbo " in line]
    return max(steps, default=0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--checkpoint-every", type=int, default=25)
    p.add_argument("--min-interval", type=float, default=4.0, help="seconds before a kill, at least")
    p.add_argument("--max-interval", type=float, default=15.0, help="seconds before a kill, at most")
    p.add_argument("--sigterm", type=float, default=0.2, help="probability a kill is a SIGTERM (graceful)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    p.add_argument("--work-dir", default=None)
    p.add_argument("--train", action="append", default=[], metavar="KEY=VALUE", help="TrainConfig overrides")
    a = p.parse_args(argv)
    rng = random.Random(a.seed)
    work = Path(a.work_dir or tempfile.mkdtemp(prefix="soak-"))
    base = [sys.executable, "-m", "nvae", "train", "--preset", "digits", "--max-steps", str(a.steps),
            "--checkpoint-every", str(a.checkpoint_every), "--deterministic", "--train", "log_every=1"]
    for item in a.train:
        base += ["--train", item]
    env = _env(a.threads)

    t0 = time.perf_counter()
    ref = work / "uninterrupted"
    subprocess.run(base + ["--run-dir", str(ref)], env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    t_ref = time.perf_counter() - t0

    run = work / "killed"
    kills = {"SIGKILL": 0, "SIGTERM": 0}
    recomputed = 0
    t0 = time.perf_counter()
    cmd = base + ["--run-dir", str(run)]
    while True:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=rng.uniform(a.min_interval, a.max_interval))
        except subprocess.TimeoutExpired:
            sig = signal.SIGTERM if rng.random() < a.sigterm else signal.SIGKILL
            reached = _logged_step(run)
            proc.send_signal(sig)
            proc.wait()
            kills[sig.name] += 1
            recomputed += max(reached - _last_checkpoint_step(run), 0)
            print(f"{sig.name} at about step {reached}; last checkpoint at step {_last_checkpoint_step(run)}",
                  file=sys.stderr)
        else:
            if proc.returncode != 0:
                print(f"the run failed with exit status {proc.returncode}", file=sys.stderr)
                return 1
            break
        cmd = [sys.executable, "-m", "nvae", "train", "--resume", str(run)]
    t_soak = time.perf_counter() - t0

    a_state = torch.load(ref / "checkpoint.pt", weights_only=True)
    b_state = torch.load(run / "checkpoint.pt", weights_only=True)
    diff = max((a_state["state_dict"][k].double() - v.double()).abs().max().item()
               for k, v in b_state["state_dict"].items() if v.is_floating_point())
    print(json.dumps({
        "preset": "digits", "steps": b_state["step"], "checkpoint_every": a.checkpoint_every,
        "kills": kills, "restarts_survived": sum(kills.values()), "steps_recomputed_after_kills": recomputed,
        "uninterrupted_s": round(t_ref, 1), "interrupted_s": round(t_soak, 1),
        "max_abs_weight_difference": diff, "bit_identical": diff == 0.0,
        "skipped_steps": b_state["guard"]["total"], "work_dir": str(work)}, indent=1))
    return 0 if diff == 0.0 else 1


if __name__ == "__main__":
    sys.exit(main())
