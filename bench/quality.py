"""Quality in a fixed time: train on character-level Tiny Shakespeare for 120 s and read the final val loss.

It runs the real command line, so everything a user gets is measured (data preparation, the
time-budget planner, evaluations, checkpoints):

    python -m tinygpt train --data data/tinyshakespeare.txt --tokenizer char \\
        --train.time_budget 120 --out <tmp> --overwrite [extra args]

(a time budget with no model-size flag sizes the model to the budget; `-- --model.auto_size false` keeps
the preset's size) and reports the final whole-validation-split loss (the metrics.jsonl line with "final":
true)
and the wall time of the command. Extra arguments pass through to `tinygpt train`:

    python bench/quality.py --preset cpu-tiny
    python bench/quality.py --budget 60 -- --train.lr 2e-3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import REPO, SHAKESPEARE, OtherLoad, load_warning, save_results

DATA = SHAKESPEARE
GOAL_VAL_LOSS = 1.65


def final_metrics(run_dir: Path) -> dict[str, Any] | None:
    """The run's final evaluation, or None where it never got that far."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return None
    finals = [e for e in map(json.loads, metrics.read_text().splitlines()) if e.get("final")]
    return finals[-1] if finals else None


def run(budget: float, extra: list[str]) -> dict[str, Any] | None:
    if not DATA.exists():
        print(f"quality: skipped ({DATA} not found)")
        return None
    # The child must import this checkout's tinygpt whether or not it is pip-installed.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "src"),
                                                                    os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory(prefix="tinygpt-quality-") as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "tinygpt", "train", "--data", str(DATA), "--tokenizer", "char",
               "--train.time_budget", f"{budget:g}", "--out", str(run_dir), "--overwrite", *extra]
        print("$ " + " ".join(cmd[1:]), flush=True)
        start = time.perf_counter()
        # The trainer's log goes to stderr and passes straight through, so its progress shows live.
        # Other processes matter here too: a slower step means fewer steps in the budget, so a higher loss.
        with OtherLoad() as load:
            proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        final = final_metrics(run_dir)
    if proc.returncode != 0 or final is None:
        print(f"quality: training failed (exit status {proc.returncode})")
        return dict(extra_args=extra, budget_s=budget, wall_s=wall, error=f"exit status {proc.returncode}")
    result = dict(extra_args=extra, budget_s=budget, wall_s=wall, val_loss=final["val_loss"],
                  train_loss=final["train_loss"], steps=final["step"], tokens_seen=final["tokens_seen"],
                  train_elapsed_s=final["elapsed_s"], goal_val_loss=GOAL_VAL_LOSS,
                  goal_met=final["val_loss"] <= GOAL_VAL_LOSS, other_load=load.share)
    print(f"quality ({' '.join(extra) or 'default preset'}): final val loss {result['val_loss']:.4f} "
          f"(goal <= {GOAL_VAL_LOSS}: {'met' if result['goal_met'] else 'missed'}), train loss "
          f"{result['train_loss']:.4f}, {result['steps']} steps, {result['tokens_seen']:,} tokens, "
          f"wall time {wall:.0f} s{load_warning(load.share)}")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                epilog="unrecognised arguments are passed to `tinygpt train`")
    p.add_argument("--budget", type=float, default=120.0, help="training time budget in seconds")
    p.add_argument("--quick", action="store_true", help="accepted for run_all; the budget is the benchmark")
    p.add_argument("--no-save", action="store_true", help="do not write bench/results.json")
    args, extra = p.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    result = run(args.budget, extra)
    if result is not None and not args.no_save:
        save_results("quality" + ("" if not extra else " " + " ".join(extra)), result)
    return result


if __name__ == "__main__":
    main()
