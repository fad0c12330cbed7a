"""The run directory's owner (tinygpt.rundir): its names, its lock, the mode of what it writes, the atomic
file and folder helpers that every writer shares, and which run a checkpoint folder belongs to."""

import os
import re
import shutil
from pathlib import Path

import pytest

import tinygpt
from conftest import tiny_flags
from tinygpt import rundir
from tinygpt.cli import main
from tinygpt.errors import TinyGPTError, UsageError
from tinygpt.evaluate import evaluate_run
from tinygpt.rundir import RunLock, atomic_file, atomic_folder, holder

SRC = Path(__file__).resolve().parents[1] / "src" / "tinygpt"


@pytest.fixture(scope="module")
def run_022(tmp_path_factory):
    """A run trained under the usual umask 022, with a cache of its own (its data files are made under it)."""
    root = tmp_path_factory.mktemp("rundir")
    text = root / "text.txt"
    text.write_text("".join(f"The {a} cat sat on mat {i}.\n" for i, a in enumerate(["red", "old"] * 100)))
    mask = os.umask(0o022)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("TINYGPT_CACHE", str(root / "cache"))
            assert main(["train", "--data", str(text), "--tokenizer", "char", "--out", str(root / "run"),
                         *tiny_flags()]) == 0
    finally:
        os.umask(mask)
    return root / "run"


def litter(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# Defect: status.json kept mkstemp's private 0600 while every other run file was world-readable.
def test_every_file_of_a_run_has_the_usual_mode(run_022):
    assert (run_022 / rundir.STATUS).is_file()
    modes = {str(p.relative_to(run_022)): oct(p.stat().st_mode & 0o777) for p in run_022.rglob("*")}
    usual = {k: oct(0o755) if (run_022 / k).is_dir() else oct(0o644) for k in modes}
    assert {k: v for k, v in modes.items() if v != usual[k]} == {}
    assert litter(run_022) == [] and litter(run_022 / rundir.CHECKPOINTS) == []


def test_atomic_file_replaces_whole_or_not_at_all(tmp_path):
    dest = tmp_path / "out" / "status.json"  # the folder is made on the way
    with atomic_file(dest) as tmp:
        tmp.write_text("old")
    with pytest.raises(OSError), atomic_file(dest) as tmp:
        tmp.write_text("half of the n")
        raise OSError(28, "No space left on device")
    assert dest.read_text() == "old" and litter(dest.parent) == []
    with atomic_file(dest) as tmp:
        tmp.write_text("new")
    assert dest.read_text() == "new" and litter(dest.parent) == []


def test_atomic_file_replaces_an_empty_folder(tmp_path):
    (tmp_path / "model.gguf").mkdir()
    with atomic_file(tmp_path / "model.gguf") as tmp:
        tmp.write_bytes(b"GGUF")
    assert (tmp_path / "model.gguf").read_bytes() == b"GGUF" and litter(tmp_path) == []


def test_atomic_folder_keeps_the_old_folder_until_the_new_one_is_complete(tmp_path):
    dest = tmp_path / "last"
    with atomic_folder(dest) as tmp:
        (tmp / "weights").write_text("old")
    with pytest.raises(RuntimeError), atomic_folder(dest) as tmp:
        (tmp / "weights").write_text("new")
        raise RuntimeError("the writer failed half-way")
    assert [p.name for p in dest.iterdir()] == ["weights"] and (dest / "weights").read_text() == "old"
    assert litter(tmp_path) == []
    with atomic_folder(dest) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "weights").write_text("new")
    assert [p.name for p in dest.iterdir()] == ["sub"] and (dest / "sub" / "weights").read_text() == "new"
    assert litter(tmp_path) == []  # the previous version (.old-last) is gone once the new one is in place


def test_atomic_folder_without_replace_keeps_what_another_process_finished_first(tmp_path):
    dest = tmp_path / "entry"
    with atomic_folder(dest, replace=False) as tmp:
        (tmp / "meta.json").write_text("first")
    with pytest.raises(OSError), atomic_folder(dest, replace=False) as tmp:
        (tmp / "meta.json").write_text("second")
    assert (dest / "meta.json").read_text() == "first" and litter(tmp_path) == []


def test_writers_of_exports_and_reports_refuse_an_unwritable_place_in_one_line():
    from tinygpt.export.output import staged
    from tinygpt.report.document import _write_atomic

    for folder in (True, False):
        with pytest.raises(TinyGPTError, match="cannot write to /proc: .*; choose a writable --out"), \
                staged(Path("/proc/tinygpt-export"), overwrite=False, folder=folder):
            pass
    with pytest.raises(TinyGPTError, match="cannot write /proc/tinygpt/report.md: .*; choose another --out"):
        _write_atomic(Path("/proc/tinygpt/report.md"), b"report")


def test_the_lock_is_held_by_one_holder_at_a_time_and_freed_on_release(tmp_path):
    lock = RunLock.acquire(tmp_path)
    who = holder(tmp_path)
    assert who["pid"] == os.getpid() and "command" in who
    with pytest.raises(UsageError, match=f"already being trained by process {os.getpid()}"):
        RunLock.acquire(tmp_path)
    lock.release()
    assert holder(tmp_path) is None
    RunLock.acquire(tmp_path).release()


def test_a_checkpoint_knows_its_run_and_a_lone_one_has_none(run_022, tmp_path, monkeypatch, capsys):
    ckpt = tinygpt.load(run_022, dtype="float32")
    assert ckpt.run_dir == run_022 and ckpt.home == run_022
    monkeypatch.chdir(run_022 / rundir.CHECKPOINTS / "last")
    assert rundir.run_of(Path(".")) == run_022.resolve()
    lone = tmp_path / "elsewhere" / rundir.CHECKPOINTS / "mine"  # a checkpoints/ folder, but not in a run
    shutil.copytree(run_022 / rundir.CHECKPOINTS / "last", lone)
    ckpt = tinygpt.load(lone, dtype="float32")
    assert ckpt.run_dir is None and ckpt.home == lone
    with pytest.raises(UsageError, match="outside a run directory, so it has no val split: pass --data"):
        evaluate_run(ckpt, log=lambda msg: None)
    text = run_022.parent / "text.txt"
    assert evaluate_run(ckpt, str(text), log=lambda msg: None)["run"] == str(lone)
    assert main(["eval", "--run", str(lone)]) == 2
    assert "pass --data FILE" in capsys.readouterr().err


def test_run_directory_names_are_spelled_only_in_rundir():
    """Other modules name the run directory's files through rundir's constants, never as string literals."""
    names = [rundir.CONFIG, rundir.METRICS, rundir.STATUS, rundir.LOCK, rundir.CHECKPOINTS, rundir.LATEST,
             rundir.REPORT]
    literal = re.compile(r"""(["'])(""" + "|".join(map(re.escape, names)) + r")\1")
    # data/, export/, tensorboard/ and wandb/ are also ordinary words: look for them joined onto a path
    joined = re.compile(r"""/\s*(["'])(data|export|tensorboard|wandb)\1""")
    not_runs = ("cache_root() / ", 'files("chatterbot_corpus") / ')  # the data cache and a package's files
    found = []
    for path in SRC.rglob("*.py"):
        if path.name == "rundir.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if literal.search(line) or (joined.search(line) and not any(s in line for s in not_runs)) \
                    or ('"manifest.json"' in line and path.name != "checkpoint.py"):
                found.append(f"{path.relative_to(SRC)}:{number}: {line.strip()}")
    assert found == []
