"""Training on several processes (torchrun, gloo on the CPU): the same weights as one process, disjoint data,
exact resume after SIGKILL, a checkpoint on SIGTERM, clear errors for set-ups that cannot work."""

import contextlib
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import free_port, tiny_flags
from tinygpt import config, device
from tinygpt import run as tinygpt_run
from tinygpt.cli import main
from tinygpt.config import Config
from tinygpt.data.batches import EpochSampler, Split
from tinygpt.data.prepare import Dataset
from tinygpt.train import distributed
from tinygpt.train.distributed import Dist, gradient_sync
from tinygpt.train.step import micro_batches

# float32 so that "equal" can mean 1e-6; adamw so that fsdp can run (it refuses muon, see below); no dropout,
# whose masks come from each process's own random stream
FLAGS = tiny_flags(**{"train.max_iters": 8, "train.dtype": "float32", "train.optimizer": "adamw",
                      "train.eval_interval": 4, "train.checkpoint_interval": 4})


def train(out: Path, data: Path, *extra: str, procs: int = 2, check: bool = True,
          **popen) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={procs}"] if procs > 1 else []
    cmd = [sys.executable, *launcher, "-m", "tinygpt", "train", "--data", str(data), "--tokenizer", "char",
           "--out", str(out), *FLAGS, *extra]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **popen)  # a hang guard
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def process_tree(root: int) -> list[int]:
    """root and all its descendants (torchrun starts its workers in sessions of their own, so killing its
    process group does not reach them)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    tree, grew = {root}, True
    while grew:
        new = {pid for pid, ppid in parents.items() if ppid in tree} - tree
        tree |= new
        grew = bool(new)
    return sorted(tree)


def signal_tree(root: int, signum: int) -> None:
    for pid in process_tree(root):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def wait_until_training(out: Path, job: subprocess.Popen) -> None:
    """Until the job's first evaluation is in metrics.jsonl: every process is then inside the training loop
    (an evaluation needs them all), with its signal handlers in place, however slow the machine."""
    deadline = time.monotonic() + 600
    while not (out / "metrics.jsonl").exists():
        assert job.poll() is None and time.monotonic() < deadline, "the job did not start training"
        time.sleep(0.1)


def last_step(run: Path) -> int:
    """The step of the run's newest last checkpoint, counting the previous one that a swap keeps as .old-last
    (a kill may land inside the swap); -1 while there is none."""
    steps = []
    for name in ("last", ".old-last"):
        try:
            state = json.loads((run / "checkpoints" / name / "state.json").read_text())
            steps.append(state["progress"]["step"])
        except FileNotFoundError:
            pass
    return max(steps, default=-1)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / "last" / "model.safetensors")


def max_difference(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert sorted(wa) == sorted(wb)
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


@pytest.mark.parametrize("parallel,optimizer", [("ddp", "adamw"), ("fsdp", "adamw"), ("ddp", "muon")])
def test_two_processes_train_the_weights_of_one_with_two_micro_batches(text_file, tmp_path, parallel,
                                                                       optimizer):
    train(tmp_path / "one", text_file, "--train.grad_accum", "2", "--train.optimizer", optimizer, procs=1)
    two = train(tmp_path / "two", text_file, "--train.parallel", parallel, "--train.optimizer", optimizer)
    assert f"2 processes ({parallel}), global batch 8 windows" in two.stderr
    diff = max_difference(tmp_path / "one", tmp_path / "two")
    print(f"{parallel} {optimizer}: max |weight difference| after 8 steps: {diff:.3g}")
    assert diff <= 1e-6
    one_metrics = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two_metrics = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    # rank 0 alone wrote it
    assert [m["step"] for m in two_metrics] == [4, 8] == [m["step"] for m in one_metrics]
    # sharded evaluation
    assert two_metrics[-1]["val_loss"] == pytest.approx(one_metrics[-1]["val_loss"], abs=1e-5)


def test_accumulating_on_two_processes_equals_four_micro_batches_on_one(text_file, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    one = train(tmp_path / "one", text_file, "--train.grad_accum", "4", procs=1, env=env)
    two = train(tmp_path / "two", text_file, "--train.grad_accum", "2", env=env)
    assert max_difference(tmp_path / "one", tmp_path / "two") <= 1e-6
    # one process takes every core it may run on; torchrun would give each of two processes one thread,
    # tinygpt gives each its half
    cores = device.physical_cores(device.allowed_cpus())
    assert f"{cores} CPU thread(s) ({cores} physical core(s))" in one.stderr
    assert f"{max(1, cores // 2)} CPU thread(s) ({cores} physical core(s) / 2 processes)" in two.stderr
    user = train(tmp_path / "user", text_file, "--train.max_iters", "1", env={**env, "OMP_NUM_THREADS": "1"})
    assert "1 CPU thread(s) (OMP_NUM_THREADS)" in user.stderr  # the user's setting stands


def test_gradients_are_exchanged_only_on_the_last_micro_batch():
    class FakeDDP:  # records which micro-batches ran with DDP's gradient exchange switched off
        def __init__(self):
            self.log = []

        @contextlib.contextmanager
        def no_sync(self):
            self.log.append("off")
            yield

    class FakeFSDP:
        def __init__(self):
            self.log = []

        def set_requires_gradient_sync(self, on: bool):
            self.log.append(on)

    ddp, fsdp = FakeDDP(), FakeFSDP()
    for i in range(3):
        with gradient_sync(ddp, Dist(0, 2, parallel="ddp"), sync=i == 2):
            pass
        with gradient_sync(fsdp, Dist(0, 2, parallel="fsdp"), sync=i == 2):
            pass
    assert ddp.log == ["off", "off"] and fsdp.log == [False, True, False, True]


def test_the_ranks_see_disjoint_windows_whose_union_is_the_single_run():
    tokens = torch.arange(10_000).numpy()  # a window's tokens name its start
    data = Dataset(tokenizer=None, train=Split(tokens), val=Split(tokens), meta={},
                   folder=Path("."))  # type: ignore[arg-type]
    cfg = Config()
    cfg.model.block_size, cfg.train.batch_size = 16, 4

    def seen(rank: int, world: int, accum: int) -> list[torch.Tensor]:
        cfg.train.grad_accum = accum
        sampler = EpochSampler(len(tokens), 16, 4, seed=3)
        return [torch.cat([x for x, _, _ in micro_batches(data, sampler, cfg, torch.device("cpu"),
                                                          Dist(rank, world))])
                for _ in range(5)]  # five steps

    single = seen(0, 1, 4)
    ranks = [seen(r, 2, 2) for r in range(2)]
    for step in range(5):
        rows = [tuple(r.tolist()) for r in torch.cat([ranks[0][step], ranks[1][step]])]
        assert len(set(map(tuple, ranks[0][step].tolist())) & set(map(tuple, ranks[1][step].tolist()))) == 0
        assert rows == [tuple(r.tolist()) for r in single[step]]


def test_sigkill_then_resume_gives_the_uninterrupted_weights(text_file, tmp_path):
    # dropout on: the resumed processes must each get their own random stream back
    long = ["--train.max_iters", "240", "--train.checkpoint_interval", "40", "--train.eval_interval", "120",
            "--model.dropout", "0.1"]
    train(tmp_path / "whole", text_file, *long)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "tinygpt", "train",
           "--data", str(text_file), "--tokenizer", "char", "--out", str(out), *FLAGS, *long]
    job = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    try:
        while last_step(out) < 80:
            assert job.poll() is None and time.monotonic() < deadline, "the job ended before the kill"
            time.sleep(0.05)
    finally:
        signal_tree(job.pid, signal.SIGKILL)  # torchrun and both workers, mid-run
        job.wait()
    killed_at = last_step(out)
    assert killed_at < 240
    resumed = train(out, text_file, *long, "--resume")
    assert f"at step {killed_at}" in resumed.stderr, resumed.stderr[-3000:]
    diff = max_difference(tmp_path / "whole", out)
    print(f"killed at step {killed_at} of 240, resumed: max |weight difference| {diff:.3g}")
    assert diff == 0.0


def test_sigterm_checkpoints_once_and_exits(text_file, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "tinygpt", "train",
           "--data", str(text_file), "--tokenizer", "char", "--out", str(out), *FLAGS, "--train.max_iters",
           "100000",
           "--train.checkpoint_interval", "100000"]  # so the last checkpoint is the signal's
    job = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        wait_until_training(out, job)
        os.kill(job.pid, signal.SIGTERM)  # to torchrun, which passes it on to its workers
        _, err = job.communicate(timeout=300)
    finally:
        if job.poll() is None:  # what a failure left running
            signal_tree(job.pid, signal.SIGKILL)
    state = json.loads((out / "checkpoints" / "last" / "state.json").read_text())
    assert 0 < state["progress"]["step"] < 100000 and state["progress"]["world"] == 2
    assert err.count("stopped by SIGTERM; checkpoint saved") == 1, err[-2000:]  # rank 0 says it, once


def test_a_time_budget_and_auto_size_are_decided_once_for_all(text_file, tmp_path):
    """Rank 0 sizes the model and plans the steps from its clock; the others follow, so nobody waits
    forever."""
    out = tmp_path / "run"
    result = train(out, text_file, "--train.time_budget", "4", "--model.auto_size", "true",
                   "--train.eval_interval", "50")
    assert "auto size:" in result.stderr and result.stderr.count("time budget 4 s: planning") == 1
    state = json.loads((out / "checkpoints" / "last" / "state.json").read_text())
    assert state["progress"]["step"] == state["progress"]["total"] > 0


def test_set_ups_that_cannot_work_fail_in_one_line(text_file, tmp_path):
    too_many = train(tmp_path / "a", text_file, "--train.batch_size", "400", check=False)
    assert too_many.returncode != 0
    assert ("error: a step takes 2 process(es) x 1 x 400 = 800 windows, but an epoch has only"
            in too_many.stderr)
    muon = train(tmp_path / "b", text_file, "--train.parallel", "fsdp", "--train.optimizer", "muon",
                 check=False)
    assert (muon.returncode != 0
            and "error: train.optimizer muon needs each weight matrix whole" in muon.stderr)


def test_a_crashed_peer_ends_the_others_with_a_clear_message(text_file, tmp_path):
    """Two processes started by hand (what torchrun would set up), one killed: the other must not hang."""
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    cmd = [sys.executable, "-m", "tinygpt", "train", "--data", str(text_file), "--tokenizer", "char",
           "--out", str(tmp_path / "run"), *FLAGS, "--train.max_iters", "100000", "--train.dist_timeout",
           "30"]
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        wait_until_training(tmp_path / "run", procs[0])
        procs[1].kill()
        _, err = procs[0].communicate(timeout=300)  # not forever: train.dist_timeout (30 s) bounds the wait
    finally:
        for proc in procs:
            proc.kill()
    assert procs[0].returncode != 0
    assert "error: process 0 of 2: another process of the job failed or stopped answering" in err, err[-2000:]


@pytest.mark.slow
def test_two_nodes_on_one_machine(text_file, tmp_path):
    """Two torchrun "nodes" of one process each, meeting at a c10d rendezvous on localhost, as two machines
    would."""
    port = free_port()
    out = tmp_path / "run"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
              "--rdzv_backend=c10d",
              f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=tinygpt-test"]
    train_args = ["-m", "tinygpt", "train", "--data", str(text_file), "--tokenizer", "char", "--out",
                  str(out), *FLAGS,
                  "--train.checkpoint_interval", "100"]
    nodes = [subprocess.Popen([*launch, f"--node_rank={r}", *train_args], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    errs = [n.communicate(timeout=300)[1] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], errs[0][-2000:] + errs[1][-2000:]
    assert sum("2 processes (ddp), global batch 8 windows" in e for e in errs) == 1  # logged by rank 0 alone
    state = json.loads((out / "checkpoints" / "last" / "state.json").read_text())
    assert state["progress"]["step"] == 8 and state["progress"]["world"] == 2
    assert len([line for line in (out / "metrics.jsonl").read_text().splitlines() if line]) == 2


def test_a_different_number_of_processes_may_resume_and_is_told(text_file, tmp_path):
    out = tmp_path / "run"
    train(out, text_file)
    resumed = train(out, text_file, "--resume", "--train.max_iters", "12", procs=1)
    assert "resuming a job of 2 process(es) with 1: the data position carries over" in resumed.stderr
    state = json.loads((out / "checkpoints" / "last" / "state.json").read_text())
    assert state["progress"]["step"] == 12 and state["progress"]["world"] == 1


class GroupStarted(Exception):
    """Raised by the stand-in init_process_group: the test has seen what the group would have been."""


def process_group_of_resume(out: Path, monkeypatch, *flags: str) -> list[tuple[str, datetime.timedelta, str]]:
    """(backend, timeout, device set) that rank 0 of a two-process job resuming `out` starts its group
    with, on a host where CUDA is available (faked: this machine has none)."""
    groups, devices = [], []

    def start_group(backend, *args, timeout=None, **kwargs):
        groups.append((backend, timeout, devices[-1] if devices else "none"))
        raise GroupStarted

    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: devices.append(str(device)))
    monkeypatch.setattr(torch.distributed, "init_process_group", start_group)
    # the job's store, which rank 0 would host for the other process: one of this process's own
    monkeypatch.setattr(torch.distributed, "rendezvous",
                        lambda *args, **kwargs: iter([(torch.distributed.HashStore(), 0, 2)]))
    with pytest.raises(GroupStarted):
        main(["train", "--out", str(out), "--resume", *flags])
    return groups


def test_a_resumed_run_starts_its_process_group_from_its_saved_config(text_file, tmp_path, monkeypatch):
    """A CPU run resumed under torchrun on a GPU host: gloo (not nccl around a CPU model), the saved timeout;
    the changes the command asks for (train.* may change on resume) count as well."""
    out = tmp_path / "run"
    tiny = {k[2:]: v for k, v in zip(FLAGS[::2], FLAGS[1::2])}
    cfg = config.resolve(flags={"data.path": str(text_file), "data.tokenizer": "char", "train.device": "cpu",
                                "train.dist_timeout": 30, **tiny})
    tinygpt_run.create(cfg, out, log=lambda msg: None).lock.release()
    assert process_group_of_resume(out, monkeypatch) == [("gloo", datetime.timedelta(seconds=30), "none")]
    changed = process_group_of_resume(out, monkeypatch, "--train.device", "auto",
                                      "--train.dist_timeout", "45")
    assert changed == [("nccl", datetime.timedelta(seconds=45), "cuda:0")]


def test_the_place_in_the_job_comes_from_torchruns_environment(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert distributed.from_env() == distributed.SINGLE
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.from_env() == Dist(3, 4, 1, "ddp") and not distributed.from_env().main
