"""`tinygpt runs`: one line per run directory, with its state told from its lock, status and checkpoints."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from tinygpt import rundir
from tinygpt.checkpoint import MANIFEST, candidates
from tinygpt.errors import UsageError
from tinygpt.report.records import RunRecord, read_run
from tinygpt.rundir import holder

COLUMNS = ("run", "preset", "state", "step", "best val", "final val", "age")


@dataclass
class RunLine:
    record: RunRecord
    state: str
    step: str
    age_s: float

    def cells(self) -> tuple[str, ...]:
        r = self.record
        final = r.final
        return (r.name, r.status.get("preset") or "-", self.state, self.step,
                f"{r.best_val:.4f}" if r.best_val is not None else "-",
                f"{final['val_loss']:.4f}" if final else "-", age(self.age_s))


def has_checkpoint(run_dir: Path) -> bool:
    """Whether some checkpoint is in place (not verified: that reads every weight; --resume verifies)."""
    return any((ckpt / MANIFEST).is_file() for ckpt in candidates(run_dir))


def state_of(record: RunRecord) -> str:
    """running (its lock is held), finished, interrupted (resumable), or failed (an error, or nothing to
    resume)."""
    who = holder(record.dir)
    if who is not None:
        return f"running (pid {who.get('pid', '?')})"
    said = record.status.get("state")
    if said == "finished" or (not said and record.last is not None and record.last.get("final")):
        return "finished"
    if said == "failed":
        return "failed: " + (record.status.get("error") or "?")[:60]
    if not has_checkpoint(record.dir):
        return "failed (no checkpoint)"
    return "interrupted (resumable)"  # a signal, or a process killed outright (its status still says running)


def describe_run(run_dir: Path) -> RunLine:
    r = read_run(run_dir)
    step = r.status.get("step", r.last["step"] if r.last else 0)
    total = r.status.get("total")
    files = [run_dir / name for name in (rundir.STATUS, rundir.METRICS, rundir.CONFIG)]
    files = [p for p in files if p.exists()]
    updated = r.status.get("updated") or max((p.stat().st_mtime for p in files),
                                             default=run_dir.stat().st_mtime)
    return RunLine(r, state_of(r), f"{step}/{total}" if total else str(step), time.time() - updated)


def age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def list_runs(root: Path) -> list[RunLine]:
    """The run directories directly under root, newest first."""
    if not root.is_dir():
        raise UsageError(f"{root} is not a folder of runs (train one with `tinygpt train --out {root}/NAME`)")
    dirs = [p for p in root.iterdir() if p.is_dir() and rundir.is_run(p)]
    return sorted((describe_run(p) for p in dirs), key=lambda line: line.age_s)


def table(lines: list[RunLine]) -> str:
    """The lines as an aligned text table under a header."""
    rows = [COLUMNS, *(line.cells() for line in lines)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
