"""Where a run's numbers go: metrics.jsonl always, status.json for `tinygpt runs`, and TensorBoard or W&B on
request.

The trainer knows only the Logger interface: `start` once the run's length is known, `log` at every evaluation
(the same entry metrics.jsonl gets), `close` with how the session ended. Everything else (plots, reports, the
run listing) reads the files afterwards, so nothing outside this module hooks into training.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

from tinygpt import rundir
from tinygpt.config import Config, log_targets
from tinygpt.errors import TinyGPTError


class Logger:
    """One destination for a run's metrics. `facts`: step (where this session starts), total, params, device,
    dtype."""

    def start(self, cfg: Config, facts: dict[str, Any]) -> None:
        pass

    def log(self, entry: dict[str, Any], total: int) -> None:
        pass

    def close(self, outcome: str, error: str | None = None) -> None:
        """outcome: finished, interrupted (a signal; a checkpoint was saved) or failed."""


def scalars(entry: dict[str, Any]) -> dict[str, float]:
    """The plotted numbers of a metrics entry (not its step, nor flags such as final)."""
    return {k: float(v) for k, v in entry.items()
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


class JsonlLog(Logger):
    """metrics.jsonl: one JSON object per evaluation, appended (a crash loses at most the line being
    written)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / rundir.METRICS

    def log(self, entry: dict[str, Any], total: int) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")


class StatusLog(Logger):
    """status.json: the session's state, position and facts, replaced atomically at start, at each evaluation
    and at the end. Whether the run is alive comes from its lock (train.lock), not from this file: a killed
    process leaves "running" here, which `tinygpt runs` reads as stopped."""

    def __init__(self, run_dir: Path, preset: str | None):
        self.path, self.status = run_dir / rundir.STATUS, {"state": "running", "preset": preset}
        previous = rundir.read_status(run_dir)
        if preset is None and previous.get("preset"):  # a resume without --preset keeps the run's recipe name
            self.status["preset"] = previous["preset"]

    def start(self, cfg: Config, facts: dict[str, Any]) -> None:
        self.status.update(facts, pid=os.getpid(), started=time.time(), error=None)
        self.write()

    def log(self, entry: dict[str, Any], total: int) -> None:
        self.status.update(step=entry["step"], total=total)
        self.write()

    def close(self, outcome: str, error: str | None = None) -> None:
        self.status.update(state=outcome, error=error)
        self.write()

    def write(self) -> None:
        self.status["updated"] = time.time()
        with rundir.atomic_file(self.path) as tmp:
            tmp.write_text(json.dumps(self.status))


class TensorBoardLog(Logger):
    """Scalars under RUN/tensorboard (`tensorboard --logdir runs`), the resolved config as hyper-parameters
    (the HParams tab, with val_loss as its metric) and as text."""

    def __init__(self, run_dir: Path):
        self.dir = run_dir / rundir.TENSORBOARD

    def start(self, cfg: Config, facts: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        # On resume, events a crashed session wrote after the checkpoint are dropped (purge_step), as in
        # metrics.jsonl.
        self.writer = SummaryWriter(str(self.dir), purge_step=facts["step"] + 1 if facts["step"] else None)
        self.writer.add_text("config", "```\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False) + "```")
        experiment, session_start, self.session_end = hparams(hyperparameters(cfg), {"val_loss": 0.0})
        for summary in (experiment, session_start):
            self.writer.file_writer.add_summary(summary)
        self.writer.flush()

    def log(self, entry: dict[str, Any], total: int) -> None:
        for key, value in scalars(entry).items():
            self.writer.add_scalar(key, value, entry["step"])
        self.writer.flush()  # evaluations are rare: show them at once to a live TensorBoard

    def close(self, outcome: str, error: str | None = None) -> None:
        self.writer.file_writer.add_summary(self.session_end)
        self.writer.close()


def hyperparameters(cfg: Config) -> dict[str, Any]:
    """The config as flat dotted keys with values TensorBoard's HParams accepts (numbers, strings,
    booleans)."""
    flat = {f"{s}.{k}": v for s, fields in cfg.to_dict().items() for k, v in fields.items()}
    return {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in flat.items()}


class WandbLog(Logger):
    """A Weights & Biases run in RUN/wandb, offline unless the user configured W&B (WANDB_MODE,
    WANDB_API_KEY);
    an offline run is uploaded later with `wandb sync RUN/wandb/offline-run-*`. Resuming continues the same
    W&B run (its id is kept in RUN/wandb/tinygpt-run-id)."""

    def __init__(self, run_dir: Path):
        self.dir = run_dir / rundir.WANDB

    def start(self, cfg: Config, facts: dict[str, Any]) -> None:
        import wandb

        self.dir.mkdir(exist_ok=True)
        id_file = self.dir / "tinygpt-run-id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id)
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "tinygpt"), name=self.dir.parent.name,
                                   dir=str(self.dir.parent), id=run_id, resume="allow", mode=mode,
                                   config={**cfg.to_dict(), "facts": facts})

    def log(self, entry: dict[str, Any], total: int) -> None:
        self.run.log(scalars(entry), step=entry["step"])

    def close(self, outcome: str, error: str | None = None) -> None:
        self.run.finish(exit_code=0 if outcome == "finished" else 1)


EXTRA = {"tensorboard": (TensorBoardLog, "torch.utils.tensorboard"), "wandb": (WandbLog, "wandb")}


def require(cfg: Config) -> None:
    """Fail in one line, before a run directory is touched, where a package that train.log needs is
    missing."""
    for name in log_targets(cfg.train.log):
        try:
            importlib.import_module(EXTRA[name][1])
        except ImportError:
            raise TinyGPTError(f"--train.log {name} needs {name}: pip install 'tinygpt[{name}]'") from None


def open_loggers(cfg: Config, run_dir: Path, preset: str | None = None) -> list[Logger]:
    """The run's loggers: metrics.jsonl and status.json, then each of train.log (whose packages `require`
    checked when the run was created or resumed)."""
    return [JsonlLog(run_dir), StatusLog(run_dir, preset), *(EXTRA[name][0](run_dir)
                                                             for name in log_targets(cfg.train.log))]
