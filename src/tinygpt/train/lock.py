"""Which process is training a run: a lock file that the training process holds for as long as it lives.

`RUN/train.lock` is locked with flock(2) by the process that creates or resumes the run, and names it (pid,
host, command, start time). The kernel drops the lock when that process ends, however it ends (a SIGKILL, an
out-of-memory kill, a power cut on a local disk), so "is the run running?" is answered without guessing from
timestamps: `holder` asks for the same lock and is refused exactly while a trainer lives. A second
`tinygpt train --resume` into a running run is refused that way, naming the process.

flock is advisory and per machine: two machines sharing a network folder may not see each other's locks.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import IO, Any

from tinygpt.errors import UsageError

LOCK = "train.lock"


class RunLock:
    """The lock on one run directory, held from `acquire` until `release` or the end of the process."""

    def __init__(self, run_dir: Path, file: IO[str]):
        self.run_dir, self.file = run_dir, file

    @classmethod
    def acquire(cls, run_dir: Path) -> RunLock:
        """Lock run_dir (which must exist) for this process, or refuse in one line naming the process that holds it."""
        f = open(run_dir / LOCK, "a+")
        # A `tinygpt runs` probing at this very moment holds a shared lock for microseconds: try a few times.
        for attempt in range(5):
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == 4:
                    f.close()
                    raise UsageError(f"run {run_dir} is already being trained by {describe(holder(run_dir))}; wait for "
                                     "it to end, or stop it (kill -TERM <pid> saves a checkpoint) and resume then") from None
                time.sleep(0.05)
        f.seek(0)
        f.truncate()
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "command": command(), "started": time.time()}, f)
        f.flush()
        return cls(run_dir, f)

    def release(self) -> None:
        if not self.file.closed:
            self.file.close()  # closing the file drops the lock


def command() -> str:
    """This process's command line as its user typed it: `tinygpt train ...` (also for python -m tinygpt)."""
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    return " ".join(["tinygpt" if program in ("__main__.py", "tinygpt") else program, *sys.argv[1:]])


def holder(run_dir: Path) -> dict[str, Any] | None:
    """Who is training run_dir: the lock file's record (pid, host, command, started) while its process holds
    the lock; None when nobody does (a finished, stopped or crashed run, or one from before this lock existed)."""
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
    return f"process {who.get('pid', '?')} on {who.get('host', '?')} (`{who.get('command', '?')}`, started {started})"
