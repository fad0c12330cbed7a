"""The run directory: the names in it, who is training it, what its last session said, and how anything in
it (or in an export, a report or the data cache) is replaced whole.

A run directory holds::

    config.yaml      the resolved config, written once when the run is created
    data/            the run's own copy of its prepared data (token files and tokenizer)
    metrics.jsonl    one line per evaluation
    status.json      the last session's state and position, for `tinygpt runs`
    train.lock       held by the process training the run (see RunLock)
    checkpoints/     best/, last/ and the `latest` pointer (see checkpoint.py)
    tensorboard/, wandb/   with --train.log
    export/          `tinygpt export`'s default output
    report.png       `tinygpt report`'s default output for one run

Every file and folder that is rewritten in place goes through atomic_file or atomic_folder: it is built
beside its final name under a hidden temporary one, fsynced and renamed, so a crash leaves the old version or
the new one, never half of one. Files and folders get the mode every other file gets (0644 and 0755 under the
usual umask 022), not the private mode of mkstemp, mkdtemp or a writer's own temporary file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from tinygpt.errors import UsageError

CONFIG = "config.yaml"  # also a checkpoint's copy of the config
DATA = "data"
METRICS = "metrics.jsonl"
STATUS = "status.json"
LOCK = "train.lock"
CHECKPOINTS = "checkpoints"
LATEST = "latest"  # in checkpoints/: a file naming the most recently completed checkpoint
TENSORBOARD = "tensorboard"
WANDB = "wandb"
EXPORT = "export"
EVAL = "eval"  # benchmark results, one JSON file per `tinygpt eval --tasks` (harness.run_tasks)
REPORT = "report.png"


def is_run(path: Path) -> bool:
    """Whether path is a run directory: it holds config.yaml or metrics.jsonl."""
    return (path / CONFIG).is_file() or (path / METRICS).is_file()


def checkpoint_dir(run_dir: Path, name: str) -> Path:
    """Where checkpoint `name` (best, last) of a run lives."""
    return Path(run_dir) / CHECKPOINTS / name


def previous(path: Path) -> Path:
    """Where atomic_folder keeps path's previous version until the new one is in place (.old-NAME)."""
    return path.parent / f".old-{path.name}"


def run_of(ckpt: Path) -> Path | None:
    """The run directory that the checkpoint folder ckpt belongs to (RUN/checkpoints/NAME, or NAME's previous
    version); None for a checkpoint folder that stands on its own, copied out of its run. The path as given is
    tried first, so a relative one stays relative; then resolved (for `.` or a symlink)."""
    for path in (ckpt, ckpt.resolve()):
        if path.parent.name == CHECKPOINTS and is_run(path.parent.parent):
            return path.parent.parent
    return None


def read_status(run_dir: Path) -> dict[str, Any]:
    """status.json's contents; {} where it is missing or unreadable (runs from before it existed)."""
    try:
        return json.loads((Path(run_dir) / STATUS).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


# ---------------------------------------------------------------- replacing a file or folder whole

def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _settle(root: Path) -> None:
    """fsync every file and folder under root, root last, so that a rename of root publishes complete
    contents; and give each file the mode a new file gets here (root's, less the execute bits), since some
    writers make theirs private (safetensors 0.8 writes through a 0600 temporary file)."""
    mode = root.stat().st_mode & 0o666
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            path = Path(folder, name)
            if not path.is_symlink() and path.stat().st_mode & 0o777 != mode:
                path.chmod(mode)
            _fsync(path)
        _fsync(Path(folder))


def _remove(path: Path, strict: bool = True) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    except OSError:
        if strict:
            raise


def _temporary(dest: Path) -> Path:
    """A hidden name beside dest that nothing else uses."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    return dest.parent / f".tmp-{dest.name}-{secrets.token_hex(4)}"


def _move_into_place(new: Path, dest: Path) -> None:
    """Rename new to dest. A file replaces a file in one step; a folder cannot, so the previous dest is kept
    as .old-NAME until the new one is in place (a crash in between leaves it there to fall back on)."""
    old = previous(dest)
    if (dest.exists() or dest.is_symlink()) and (new.is_dir() or (dest.is_dir() and not dest.is_symlink())):
        _remove(old)  # left by such a crash; dest supersedes it
        dest.rename(old)
    os.replace(new, dest)
    _fsync(dest.parent)
    _remove(old, strict=False)  # the new version is in place: a leftover costs space, not correctness


@contextlib.contextmanager
def atomic_file(dest: Path) -> Iterator[Path]:
    """A new empty hidden file beside dest to write dest's new contents into; when the block ends it is
    fsynced and renamed over dest, and when the block raises it is removed and dest is left as it was."""
    tmp = _temporary(dest)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies, as to any file
    try:
        yield tmp
        _fsync(tmp)
        _move_into_place(tmp, dest)
    finally:
        _remove(tmp, strict=False)  # gone once renamed into place


@contextlib.contextmanager
def atomic_folder(dest: Path, replace: bool = True) -> Iterator[Path]:
    """A new empty hidden folder beside dest to build dest in; when the block ends its tree is fsynced and it
    is renamed to dest (see _move_into_place), and when the block raises it is removed and dest is left as it
    was. With replace=False an existing non-empty dest is kept: the rename fails with OSError instead."""
    tmp = _temporary(dest)
    tmp.mkdir()  # the umask applies, as to any folder
    try:
        yield tmp
        _settle(tmp)
        if replace:
            _move_into_place(tmp, dest)
        else:
            tmp.rename(dest)
            _fsync(dest.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone once renamed into place


# ---------------------------------------------------------------- who is training the run

class RunLock:
    """The lock on one run directory, held from `acquire` until `release` or the end of the process.

    train.lock is locked with flock(2) by the process that creates or resumes the run, and names it (pid,
    host, command, start time). The kernel drops the lock when that process ends, however it ends (a SIGKILL,
    an out-of-memory kill, a power cut on a local disk), so "is the run running?" is answered without guessing
    from timestamps: `holder` asks for the same lock and is refused exactly while a trainer lives. flock is
    advisory and per machine: two machines sharing a network folder may not see each other's locks."""

    def __init__(self, run_dir: Path, file: IO[str]):
        self.run_dir, self.file = run_dir, file

    @classmethod
    def acquire(cls, run_dir: Path) -> RunLock:
        """Lock run_dir (which must exist) for this process, or refuse in one line naming the process that
        holds it."""
        f = open(run_dir / LOCK, "a+")
        if not _lock_exclusively(f):
            f.close()
            raise UsageError(f"run {run_dir} is already being trained by {describe(holder(run_dir))}; wait "
                             "for it to end, or stop it (kill -TERM <pid> saves a checkpoint) and resume "
                             "then")
        f.seek(0)
        f.truncate()
        who = {"pid": os.getpid(), "host": socket.gethostname(), "command": command(), "started": time.time()}
        json.dump(who, f)
        f.flush()
        return cls(run_dir, f)

    def release(self) -> None:
        if not self.file.closed:
            self.file.close()  # closing the file drops the lock


def _lock_exclusively(f: IO[str]) -> bool:
    """Whether this process got the lock. A `tinygpt runs` probing at this very moment holds a shared lock for
    microseconds: try a few times."""
    for attempt in range(5):
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt < 4:
                time.sleep(0.05)
    return False


def command() -> str:
    """This process's command line as its user typed it: `tinygpt train ...` (also for python -m tinygpt)."""
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    return " ".join(["tinygpt" if program in ("__main__.py", "tinygpt") else program, *sys.argv[1:]])


def holder(run_dir: Path) -> dict[str, Any] | None:
    """Who is training run_dir: the lock file's record (pid, host, command, started) while its process holds
    the lock; None when nobody does (a finished, stopped or crashed run, or one older than the lock)."""
    path = Path(run_dir) / LOCK
    if not path.is_file():
        return None
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None  # granted: nobody holds it (closing the file gives it back)
        except BlockingIOError:
            pass
        try:
            return json.loads(f.read() or "{}")
        except json.JSONDecodeError:  # caught between the trainer's truncate and its write
            return {}


def describe(who: dict[str, Any] | None) -> str:
    """'process 1234 on host (tinygpt train ..., started 2026-12-02 10:00:00)', from holder's record."""
    if not who:
        return "another process"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(who["started"])) if "started" in who else "?"
    return (f"process {who.get('pid', '?')} on {who.get('host', '?')} (`{who.get('command', '?')}`, "
            f"started {started})")
