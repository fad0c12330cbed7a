"""Crash safety: a short version of tests/crash/kill_resume.sh, plus signals and numerical faults."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "crash"))
from kill_resume import check, train_cmd  # noqa: E402


def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path):
    log = []
    straight, killed = check(kills=2, iters=200, seed=1, workdir=tmp_path, log=log.append)
    assert any("SIGKILL" in line for line in log), log  # at least one kill landed mid-run
    assert straight == killed, log


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_a_checkpoint_and_says_how_to_resume(tmp_path, sig, code, monkeypatch):
    monkeypatch.setenv("TINYGPT_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "corpus.txt"
    data.write_text("the cat sat on the mat and the dog ran far " * 300)
    out = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(data, out, 100_000, "--train.checkpoint_interval", "100000",
                                      "--train.eval_interval", "5"), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        # the first evaluation: training, and its signal handlers, are on
        while not (out / "metrics.jsonl").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not start training"
            time.sleep(0.1)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()  # whatever a failure left running
    assert proc.returncode == code, err
    assert "checkpoint saved in" in err and f"tinygpt train --out {out} --resume" in err
    state = json.loads((out / "checkpoints" / "last" / "state.json").read_text())
    assert state["progress"]["step"] > 0
