"""A run's position besides weights and optimizer: progress, RNG states, the metrics log, stop requests."""

from __future__ import annotations

import json
import random
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from tinygpt.rundir import atomic_file


def rng_state() -> tuple[dict[str, Any], dict[str, Any]]:
    """RNG states split into tensors (for trainer.pt) and JSON-able values (for state.json)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state_all()
    np_state = np.random.get_state()
    plain = {"python": list(random.getstate()[1]) + [random.getstate()[2]],
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    return tensors, plain


def set_rng_state(tensors: dict[str, Any], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tensors["cuda"])
    py = plain["python"]
    random.setstate((3, tuple(py[:-1]), py[-1]))
    kind, keys, *rest = plain["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))


def forget_metrics_after(path: Path, step: int) -> None:
    """Drop metrics a crashed session logged past the checkpoint we resume from (they will be logged
    again), and a last line cut short by the crash."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            if json.loads(line)["step"] <= step and line.endswith("\n"):
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    with atomic_file(path) as tmp:  # a crash while rewriting must not lose the lines kept
        tmp.write_text("".join(keep))


class StopOnSignal:
    """Turn the first SIGINT/SIGTERM into a request to stop after the current step (the loop then
    checkpoints and exits); a second one interrupts at once. Checkpoint writes are atomic, so even
    that loses nothing already saved."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        tqdm.write(f"\n{signal.Signals(signum).name}: finishing this step and saving a checkpoint "
                   "(press Ctrl-C again to quit at once)", file=sys.stderr)

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


@dataclass
class Progress:
    """Everything about the run's position besides model and optimizer: saved in state.json."""

    step: int = 0
    total: int = 0  # planned steps (from max_iters, epochs or the time budget)
    tokens_seen: int = 0
    elapsed_s: float = 0.0
    best_val: float = float("inf")
    bad_evals: int = 0
    sampler: dict[str, int] = field(default_factory=dict)
    world: int = 1  # processes of the job that saved it (torchrun)
    overflow_skips: int = 0  # float16 steps skipped because the gradients overflowed at the loss scale
    scaler: dict[str, Any] = field(default_factory=dict)  # float16: the loss scaler's state, for exact resume
