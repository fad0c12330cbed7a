"""SIGKILL a CPU training run at random moments, resume it each time, and check that its final
weights are bit-identical to those of a run that was never interrupted.

    python tests/crash/kill_resume.py --kills 10      # the full check (tests/crash/kill_resume.sh)

tests/test_crash.py runs a short version of this in `make test`.
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

from tinygpt.checkpoint import weights_hash
from tinygpt.rundir import CHECKPOINTS

FLAGS = ["--model.n_layer", "2", "--model.n_head", "2", "--model.n_embd", "32", "--model.block_size", "32",
         "--model.dropout", "0.1", "--train.batch_size", "8", "--train.eval_interval", "40",
         "--train.eval_iters", "2",
         "--train.checkpoint_interval", "7", "--train.warmup_iters", "10",
         "--train.final_eval_tokens", "20000"]


def train_cmd(data: Path, out: Path, iters: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tinygpt.cli", "train", "--data", str(data), "--out", str(out),
            "--train.max_iters", str(iters), *FLAGS, *extra]


def run_with_kills(data: Path, out: Path, iters: int, kills: int, rng: random.Random, env: dict,
                   log=print) -> int:
    """Start the run, SIGKILL it `kills` times at random moments, resuming after each; return the launches.

    Each kill waits for a state, never for time, so it lands mid-run however fast or loaded the machine is:
    the run's last checkpoint past a random step, then (by a coin toss) at once, in the steps after that
    checkpoint, or while the next checkpoint is being written (its temporary folder exists)."""
    targets = sorted(rng.sample(range(1, iters), kills))
    launches = 0
    for i in range(kills + 1):
        resumable = (out / "config.yaml").exists()
        cmd = train_cmd(data, out, iters, "--resume" if resumable else "--overwrite")
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        launches += 1
        if i < kills:
            if wait_for_step(out, targets[i], proc) and (rng.random() < 0.5 or wait_for_write(out, proc)):
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    log(f"kill {i + 1}: SIGKILL past step {targets[i]}")
                    continue
            proc.wait()
            log(f"kill {i + 1}: the run finished before the kill (step {targets[i]})")
            if proc.returncode != 0:
                raise RuntimeError(f"training failed: {proc.stderr.read()}")
            return launches
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"training failed: {err}")
    return launches


def last_step(out: Path) -> int:
    """The step of the run's newest last checkpoint (a swap keeps the previous one as .old-last); -1: none."""
    steps = []
    for name in ("last", ".old-last"):
        try:
            state = json.loads((out / CHECKPOINTS / name / "state.json").read_text())
            steps.append(state["progress"]["step"])
        except FileNotFoundError:
            pass
    return max(steps, default=-1)


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout_s: float = 600) -> bool:
    """Poll until the run's last checkpoint is at `step` or later: True, or False once the run has ended."""
    deadline = time.monotonic() + timeout_s
    while last_step(out) < step:
        if proc.poll() is not None:
            return False
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the run did not reach step {step} in {timeout_s:.0f} s")
        time.sleep(0.02)
    return True


def wait_for_write(out: Path, proc: subprocess.Popen, timeout_s: float = 600) -> bool:
    """Poll until a checkpoint is being written (a hidden temporary folder in checkpoints/): True, or False
    once the run has ended."""
    deadline = time.monotonic() + timeout_s
    while not any(p.name.startswith(".tmp-") for p in (out / CHECKPOINTS).iterdir()):
        if proc.poll() is not None:
            return False
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the run wrote no checkpoint in {timeout_s:.0f} s")
        time.sleep(0.005)
    return True


def check(kills: int, iters: int, seed: int, workdir: Path, log=print,
          data: Path | None = None) -> tuple[str, str]:
    """Weight hashes of an uninterrupted run and of one killed `kills` times, on `data` (default: a small
    generated corpus; a prepared dataset folder works too)."""
    env = {**os.environ, "TINYGPT_CACHE": str(workdir / "cache"), "PYTHONUNBUFFERED": "1"}
    if data is None:
        data = workdir / "corpus.txt"
        words = random.Random(0).choices(["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far"],
                                         k=6000)
        data.write_text(" ".join(words))
    start = time.perf_counter()
    subprocess.run(train_cmd(data, workdir / "straight", iters), env=env, check=True, capture_output=True)
    log(f"uninterrupted run: {time.perf_counter() - start:.1f} s")
    run_with_kills(data, workdir / "killed", iters, kills, random.Random(seed), env, log)
    return (weights_hash(workdir / "straight" / CHECKPOINTS / "last"),
            weights_hash(workdir / "killed" / CHECKPOINTS / "last"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--iters", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, help="train on this (e.g. a `tinygpt prepare` folder)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        straight, killed = check(args.kills, args.iters, args.seed, Path(tmp), data=args.data)
    print(f"uninterrupted: {straight}\nkilled {args.kills}x:  {killed}")
    print("identical" if straight == killed else "DIFFERENT")
    return 0 if straight == killed else 1


if __name__ == "__main__":
    sys.exit(main())
