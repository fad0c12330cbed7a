"""`tinygpt runs` and the run lock: states told from real processes (finished, SIGTERM-interrupted, running,
killed),
and a second `train --resume` into a running run refused, naming the process (the lock: test_rundir.py)."""

import json
import re
import signal
import subprocess
import sys
import time

from conftest import tiny_flags
from tinygpt.cli import main
from tinygpt.report.listing import list_runs, table


def start_training(out, text_file):
    """A `tinygpt train` process that would run for hours; returns once its status says it is training."""
    cmd = [sys.executable, "-m", "tinygpt", "train", "--data", str(text_file), "--tokenizer", "char", "--out",
           str(out),
           *tiny_flags(**{"train.max_iters": 10_000_000, "train.eval_interval": 50,
                          "train.checkpoint_interval": 50})]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "status.json").is_file() or not (out / "metrics.jsonl").is_file():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the trainer never started"
        time.sleep(0.1)
    return proc


def states(root):
    return {line.record.name: line for line in list_runs(root)}


def test_runs_lists_finished_interrupted_and_running_runs_and_refuses_a_second_trainer(tmp_path, text_file,
                                                                                       capsys):
    root = tmp_path / "runs"
    assert main(["train", "--data", str(text_file), "--tokenizer", "char", "--out", str(root / "done"),
                 "--preset", "cpu-tiny", *tiny_flags()]) == 0
    err = capsys.readouterr().err
    # the evaluation line's ETA
    assert re.search(r"step 3: train [\d.]+, val [\d.]+, [\d,]+ tok/s, peak memory [\d.]+ GiB, ETA \d+s", err)
    # what next
    assert f"tinygpt sample --run {root / 'done'}" in err and f"tinygpt report {root / 'done'}" in err
    stopped = start_training(root / "stopped", text_file)
    stopped.send_signal(signal.SIGTERM)  # saves a checkpoint and exits
    assert stopped.wait(60) != 0
    running = start_training(root / "live", text_file)
    try:
        lines = states(root)
        assert lines["done"].state == "finished" and lines["done"].step == "6/6"
        assert lines["done"].cells()[1] == "cpu-tiny"
        assert lines["stopped"].state == "interrupted (resumable)"
        assert lines["live"].state == f"running (pid {running.pid})"
        assert lines["live"].step.endswith("/10000000")
        assert main(["runs", str(root)]) == 0
        listing = capsys.readouterr().out
        assert listing.splitlines()[0].split() == ["run", "preset", "state", "step", "best", "val", "final",
                                                   "val", "age"]
        assert (f"running (pid {running.pid})" in listing and "interrupted (resumable)" in listing
                and "finished" in listing)

        # A second trainer into the running run: refused in one line that names the process, the run
        # untouched.
        before = (root / "live" / "config.yaml").read_text()
        assert main(["train", "--out", str(root / "live"), "--resume"]) == 2
        err = capsys.readouterr().err
        assert f"is already being trained by process {running.pid} on " in err and "tinygpt train" in err
        assert main(["train", "--data", str(text_file), "--out", str(root / "live"), "--overwrite",
                     *tiny_flags()]) == 2
        assert f"it is being trained by process {running.pid}" in capsys.readouterr().err
        assert (root / "live" / "config.yaml").read_text() == before and running.poll() is None
    finally:
        running.kill()  # SIGKILL: no chance to write its status
        running.wait(60)
    assert states(root)["live"].state == "interrupted (resumable)"  # the kernel dropped the lock
    assert json.loads((root / "live" / "status.json").read_text())["state"] == "running"  # what it last said
    assert main(["train", "--out", str(root / "stopped"), "--resume", "--train.max_iters", "60"]) == 0
    assert states(root)["stopped"].state == "finished"


def test_failed_runs_say_why_and_a_run_without_checkpoint_cannot_be_resumed(tmp_path):
    failed, empty = tmp_path / "failed", tmp_path / "empty"
    for d in (failed, empty):
        d.mkdir()
        (d / "config.yaml").write_text("model: {}\n")
    (failed / "status.json").write_text(json.dumps({"state": "failed", "error": "non-finite loss at step 7",
                                                    "step": 7}))
    lines = states(tmp_path)
    assert lines["failed"].state == "failed: non-finite loss at step 7"
    assert lines["empty"].state == "failed (no checkpoint)"
    assert "failed: non-finite" in table(list(lines.values()))


def test_runs_on_a_missing_folder_says_so(tmp_path, capsys):
    assert main(["runs", str(tmp_path / "nowhere")]) == 2
    assert "is not a folder of runs" in capsys.readouterr().err
