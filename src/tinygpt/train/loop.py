"""The training loop: set up, then step, evaluate and keep the best, save, and finish.

The optimizer (AdamW or Muon + AdamW), the schedule (cosine or warmup-stable-decay, planned from
max_iters, epochs or a time budget), exact resume, signals and the non-finite guard all meet here;
each lives in its own module (optim, schedule, state, step) and this file only puts them in order.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from tinygpt import checkpoint
from tinygpt.config import Config
from tinygpt.data.batches import EpochSampler, Split
from tinygpt.data.prepare import Dataset
from tinygpt.device import autocast_dtype, peak_flops, resolve_device
from tinygpt.errors import Interrupted, TinyGPTError
from tinygpt.evaluate import loss_over
from tinygpt.model import GPT
from tinygpt.train.optim import make_optimizer
from tinygpt.train.schedule import PROVISIONAL, BudgetPlanner, lr_at, planned_steps
from tinygpt.train.state import Progress, StopOnSignal, forget_metrics_after, rng_state, set_rng_state
from tinygpt.train.step import MaybeCompiled, StepResult, micro_batches, train_step


def train(cfg: Config, run_dir: Path, data: Dataset, resume_from: Path | None = None,
          log: Callable[[str], None] = print, elapsed_s: float = 0.0,
          init_state: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Train cfg.model on data, writing checkpoints and metrics.jsonl into run_dir; returns the final metrics.

    resume_from is a checkpoint that checkpoint.newest or checkpoint.find returned (they verify it);
    elapsed_s is time already spent on the run before training (auto-sizing), counted against a budget;
    init_state holds the weights to start from instead of a random init (train.init_from)."""
    trainer = Trainer(cfg, run_dir, data, log)
    if init_state is not None and resume_from is None:
        trainer.model.load_state_dict(init_state)
    trainer.start(resume_from, elapsed_s)
    with StopOnSignal() as stop:
        while trainer.progress.step < trainer.progress.total:
            trainer.step()
            last_step = trainer.progress.step >= trainer.progress.total
            if trainer.progress.step % cfg.train.eval_interval == 0 and not last_step:
                if not trainer.evaluate_and_keep():
                    trainer.stopped_early = True
                    break
            if trainer.progress.step % cfg.train.checkpoint_interval == 0 and not last_step or stop.signum is not None:
                trainer.save("last")
            if stop.signum is not None:
                trainer.bar.close()
                raise Interrupted(stop.signum, run_dir / checkpoint.CHECKPOINTS / "last", run_dir)
    return trainer.finish()


class Trainer:
    """One training session's moving parts: model, optimizer, data order, progress and the files they go to."""

    def __init__(self, cfg: Config, run_dir: Path, data: Dataset, log: Callable[[str], None]):
        t = cfg.train
        self.cfg, self.run_dir, self.data, self.log = cfg, run_dir, data, log
        self.device = resolve_device(t.device)
        self.dtype = autocast_dtype(t, self.device)
        torch.manual_seed(t.seed)
        random.seed(t.seed)
        np.random.seed(t.seed)
        self.model = GPT(cfg.model).to(self.device)
        self.model.activation_checkpointing = t.activation_checkpointing
        self.step_model = MaybeCompiled(self.model, t.compile, log)  # the model, or its compiled form
        self.peak = peak_flops(self.device)
        self.optimizer = make_optimizer(self.model, t, self.device)
        self.sampler = EpochSampler(len(data.train.tokens), cfg.model.block_size, t.batch_size, t.seed, data.packed)
        self.tokens_per_step = t.batch_size * t.grad_accum * cfg.model.block_size
        self.progress = Progress()
        self.stopped_early = False

    def start(self, resume_from: Path | None, elapsed_s: float) -> None:
        """Restore a checkpoint (or start at step 0), plan the length, start the clocks and the progress bar."""
        if resume_from is not None:
            self.restore(resume_from)
        else:
            self.progress.elapsed_s = elapsed_s
        t, p = self.cfg.train, self.progress
        forget_metrics_after(self.run_dir / "metrics.jsonl", p.step)
        self.log(f"model: {self.model.num_params() / 1e6:.2f}M parameters, device {self.device}"
                 f"{', bf16 autocast' if self.dtype else ''}; data: {len(self.data.train.tokens):,} train / "
                 f"{len(self.data.val.tokens):,} val tokens, {self.sampler.windows_per_epoch:,} windows per epoch")
        if t.time_budget is None:  # from the config, which --resume may have changed
            p.total = planned_steps(t, self.sampler.windows_per_epoch)
        elif not p.total:  # a provisional length until the speed is known
            p.total = PROVISIONAL
        self.planner = BudgetPlanner(t.time_budget, p.step > 0) if t.time_budget is not None else None
        self.bar = tqdm(total=p.total, initial=p.step, desc="train", file=sys.stderr, dynamic_ncols=True,
                        disable=None, unit="step")
        self.interval_tokens, self.interval_start = 0, time.perf_counter()
        self.session_start, self.elapsed_before = time.perf_counter(), p.elapsed_s
        self.model.train()

    def restore(self, ckpt: Path) -> None:
        loaded = checkpoint.load(ckpt, self.device, into=self.model, verified=True)
        trainer = loaded.trainer_state()
        self.optimizer.load_state_dict(trainer["optimizer"])
        self.progress = Progress(**loaded.state["progress"])
        self.sampler.load_state_dict(self.progress.sampler)
        set_rng_state(trainer["rng"], loaded.state["rng"])
        self.log(f"resuming from {ckpt} at step {self.progress.step}")

    def step(self) -> None:
        """One optimizer step at the scheduled learning rate, and its bookkeeping (progress, bar, budget plan)."""
        p, t = self.progress, self.cfg.train
        self.lr = lr_at(p.step, t, p.total)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        result = train_step(self.step_model, self.model, self.optimizer,
                            micro_batches(self.data, self.sampler, self.cfg, self.device), t.grad_clip, self.dtype)
        if not result.finite:
            self.nonfinite(result)
        p.step += 1
        p.tokens_seen += self.tokens_per_step
        self.interval_tokens += self.tokens_per_step
        self.bar.update(1)
        if p.step % 10 == 0:  # .item() waits for the device; not every step
            self.bar.set_postfix(loss=f"{result.loss.item():.3f}", lr=f"{self.lr:.2e}")
        if self.planner is not None:
            now = time.perf_counter()
            elapsed = self.elapsed_before + now - self.session_start
            new_total = self.planner.update(p.step, elapsed, now, p.step % t.eval_interval == 0)
            if new_total is not None and new_total != p.total:
                if p.total >= PROVISIONAL:
                    self.log(f"time budget {t.time_budget:g} s: planning {new_total} steps")
                p.total = self.bar.total = new_total

    def nonfinite(self, result: StepResult) -> None:
        """A NaN/inf step (already skipped by train_step): stop the run, or go on with train.skip_nonfinite."""
        step = self.progress.step + 1
        if not self.cfg.train.skip_nonfinite:
            last = checkpoint.valid_checkpoints(self.run_dir, ("last", "best"))
            raise TinyGPTError(
                f"non-finite loss or gradient at step {step} (loss {result.loss.item()}, grad norm "
                f"{result.grad_norm.item()}); last good checkpoint: {last[0] if last else 'none'}. Lower --train.lr, "
                "or pass --train.skip_nonfinite true to skip such steps")
        self.log(f"warning: step {step}: non-finite loss or gradient, step skipped")

    def evaluate_and_keep(self) -> bool:
        """Periodic evaluation: log and record it, keep the best checkpoint; False to stop early (patience)."""
        p, t = self.progress, self.cfg.train
        tok_s = self.interval_tokens / (time.perf_counter() - self.interval_start)
        p.elapsed_s = self.elapsed()
        train_loss, val_loss = (self.loss(split, t.eval_iters * t.batch_size) for split in (self.data.train, self.data.val))
        self.record(self.metrics(train_loss, val_loss, self.lr, tok_s))
        mfu = f", MFU {tok_s * self.model.flops_per_token() / self.peak:.1%}" if self.peak else ""
        self.log(f"step {p.step}: train {train_loss:.4f}, val {val_loss:.4f}, {tok_s:,.0f} tok/s{mfu}")
        if val_loss < p.best_val:
            p.best_val, p.bad_evals = val_loss, 0
            self.save("best")
        else:
            p.bad_evals += 1
            if t.patience and p.bad_evals >= t.patience:
                self.log(f"early stop: val loss has not improved for {t.patience} evaluations")
                return False
        self.interval_tokens, self.interval_start = 0, time.perf_counter()
        return True

    def finish(self) -> dict[str, Any]:
        """The final evaluation (the whole val split), recorded and logged; the best and last checkpoints saved."""
        p, t = self.progress, self.cfg.train
        self.bar.close()
        p.elapsed_s = self.elapsed()
        tok_s = self.interval_tokens / max(1e-9, time.perf_counter() - self.interval_start)
        train_loss = self.loss(self.data.train, t.eval_iters * t.batch_size)
        val_loss = self.loss(self.data.val, None)  # the whole val split
        final = dict(self.metrics(train_loss, val_loss, lr_at(p.step, t, p.total), tok_s), final=True,
                     stopped_early=self.stopped_early)
        self.record(final)
        self.log(f"final (step {p.step}): train {train_loss:.4f}, val {val_loss:.4f} (whole val split), {p.elapsed_s:.0f} s")
        if val_loss < p.best_val:
            p.best_val, p.bad_evals = val_loss, 0
            self.save("best")
        self.save("last")
        return final

    def elapsed(self) -> float:
        """Seconds of training in this run, earlier sessions included."""
        return self.elapsed_before + time.perf_counter() - self.session_start

    def loss(self, split: Split, max_windows: int | None) -> float:
        return loss_over(self.model, split, self.cfg.train.batch_size, self.device, self.dtype, max_windows,
                         self.data.packed).loss

    def metrics(self, train_loss: float, val_loss: float, lr: float, tok_s: float) -> dict[str, Any]:
        p = self.progress
        return dict(step=p.step, train_loss=train_loss, val_loss=val_loss, val_ppl=math.exp(val_loss), lr=lr,
                    tokens_seen=p.tokens_seen, tokens_per_s=tok_s, elapsed_s=p.elapsed_s)

    def record(self, entry: dict[str, Any]) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")

    def save(self, name: str) -> None:
        self.progress.sampler = self.sampler.state_dict()
        rng_tensors, rng_plain = rng_state()
        checkpoint.save(self.run_dir / checkpoint.CHECKPOINTS / name, self.model, self.cfg, self.data.tokenizer,
                        trainer={"optimizer": self.optimizer.state_dict(), "rng": rng_tensors},
                        state={"progress": vars(self.progress), "rng": rng_plain})
