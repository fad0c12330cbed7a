"""What a run directory says about its run, read without loading a model: its config, its metrics and its
status.

Everything here tolerates the files of a run that is still training, or that crashed: a missing status.json or
config.yaml reads as empty, and a half-written last line of metrics.jsonl is left out.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from tinygpt import checkpoint, config, rundir
from tinygpt.errors import TinyGPTError, UsageError


@dataclass
class RunRecord:
    dir: Path
    name: str  # the directory's name
    config: dict[str, Any]  # flat dotted keys ("model.n_layer") -> values; {} without config.yaml
    metrics: list[dict[str, Any]]  # metrics.jsonl's entries in order
    status: dict[str, Any]  # status.json; {} when absent or unreadable
    # `tinygpt eval --tasks` results: a row per task and metric, each task's newest (read_benchmarks)
    benchmarks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def last(self) -> dict[str, Any] | None:
        return self.metrics[-1] if self.metrics else None

    @property
    def final(self) -> dict[str, Any] | None:
        """The entry written when training finished (its val loss is over the whole val split), if it did."""
        return self.last if self.last and self.last.get("final") else None

    @property
    def best_val(self) -> float | None:
        return min((m["val_loss"] for m in self.metrics if m.get("val_loss") is not None), default=None)


def read_run(path: Path) -> RunRecord:
    """The record of the run directory `path`; UsageError when it holds neither config.yaml nor
    metrics.jsonl."""
    path = Path(path)
    if not rundir.is_run(path):
        raise UsageError(f"{path} is not a run directory (it has no {rundir.CONFIG} or {rundir.METRICS})")
    cfg, metrics = path / rundir.CONFIG, path / rundir.METRICS
    return RunRecord(path, path.resolve().name, flatten(config.load_yaml(cfg)) if cfg.is_file() else {},
                     read_metrics(metrics) if metrics.is_file() else [], rundir.read_status(path),
                     read_benchmarks(path / rundir.EVAL))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's entries. A process killed mid-write leaves its last line torn, so that one is skipped;
    an unreadable line anywhere else means the file was damaged some other way, and is refused."""
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    entries = []
    for number, line in enumerate(lines, start=1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            entry = None
        if isinstance(entry, dict):
            entries.append(entry)
        elif number < len(lines):
            raise TinyGPTError(f"{path} line {number} is not a JSON object; the file is damaged")
    return entries


def read_benchmarks(folder: Path) -> list[dict[str, Any]]:
    """The `tinygpt eval --tasks` results saved in `folder`: for each task, the metrics of its newest file
    (names sort by time), as rows {task, metric, value, stderr, samples, fewshot, step}. An unreadable file
    is passed over: a report shows what it can."""
    newest: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    for path in sorted(folder.glob("tasks-*.json")) if folder.is_dir() else []:
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            newest.update({task: (metrics, saved) for task, metrics in saved["results"].items()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return [row for task, (metrics, saved) in newest.items()
            for row in benchmark_rows({**saved, "results": {task: metrics}})]


def benchmark_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """harness.run_tasks's summary as rows {task, metric, value, stderr, samples, fewshot, step}."""
    settings = summary.get("settings") or {}
    return [{"task": task, "metric": name, "value": value, "stderr": metrics.get(f"{name}_stderr"),
             "samples": (summary.get("samples") or {}).get(task), "step": summary.get("step"),
             "fewshot": settings.get("num_fewshot")}
            for task, metrics in summary["results"].items() for name, value in metrics.items()
            if not name.endswith("_stderr") and isinstance(value, int | float)]


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections as dotted keys: {"model": {"n_layer": 2}} -> {"model.n_layer": 2}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def differing_keys(records: list[RunRecord]) -> dict[str, list[Any]]:
    """The config keys whose values are not the same in all records, each with its value per record (None
    where
    a record lacks the key), in the order of the first record's config."""
    keys = dict.fromkeys(k for r in records for k in r.config)
    values = {k: [r.config.get(k) for r in records] for k in keys}
    return {k: v for k, v in values.items() if any(x != v[0] for x in v)}


def parameter_count(record: RunRecord) -> int | None:
    """The model's parameter count: status.json's, else counted from a checkpoint's weights file header (which
    names every tensor's shape, so no weights are read); None when neither is there."""
    if isinstance(record.status.get("params"), int):
        return record.status["params"]
    for name in ("last", "best"):
        weights = rundir.checkpoint_dir(record.dir, name) / checkpoint.WEIGHTS
        try:
            with safe_open(str(weights), framework="pt") as f:
                return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        except (OSError, SafetensorError):
            continue
    return None


def run_labels(records: list[RunRecord]) -> list[str]:
    """A name per record for legends and tables: the directory's name, or its whole path where two runs share
    a name (runs/a/final and runs/b/final)."""
    names = [r.name for r in records]
    return [str(r.dir) if names.count(r.name) > 1 else r.name for r in records]
