"""The training loop: set up, then step, evaluate and keep the best, save, and finish.

The optimizer (AdamW or Muon + AdamW), the schedule (cosine or warmup-stable-decay, planned from
max_iters, epochs or a time budget), exact resume, signals and the non-finite guard all meet here;
each lives in its own module (optim, schedule, state, step) and this file only puts them in order.
"""

from __future__ import annotations

import math
import random
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from tinygpt import checkpoint, rundir
from tinygpt.config import Config
from tinygpt.data.batches import EpochSampler, Split, eval_starts
from tinygpt.data.prepare import Dataset
from tinygpt.device import (
    autocast_dtype,
    compile_enabled,
    free_memory,
    is_out_of_memory,
    peak_flops,
    peak_memory_gib,
    use_cpu_threads,
)
from tinygpt.errors import Interrupted, TinyGPTError, UsageError
from tinygpt.model import GPT
from tinygpt.split_loss import LossSum, loss_metrics, loss_over
from tinygpt.train.distributed import (
    SINGLE,
    Dist,
    load_optimizer_state,
    peer_failure,
    train_device,
    whole_state,
    wrap,
)
from tinygpt.train.loggers import Logger, open_loggers
from tinygpt.train.optim import make_optimizer
from tinygpt.train.schedule import PROVISIONAL, BudgetPlanner, lr_at, planned_steps
from tinygpt.train.state import Progress, StopOnSignal, forget_metrics_after, rng_state, set_rng_state
from tinygpt.train.step import MaybeCompiled, StepResult, micro_batches, train_step


def train(cfg: Config, run_dir: Path, data: Dataset, resume_from: Path | None = None,
          log: Callable[[str], None] = print, elapsed_s: float = 0.0,
          init_state: dict[str, torch.Tensor] | None = None, dist: Dist = SINGLE,
          loggers: list[Logger] | None = None) -> dict[str, Any]:
    """Train cfg.model on data, writing checkpoints and metrics.jsonl into run_dir; returns the final metrics.

    resume_from is a checkpoint that checkpoint.newest or checkpoint.find returned (they verify it);
    elapsed_s is time already spent on the run before training (auto-sizing), counted against a budget;
    init_state holds the weights to start from instead of a random init (train.init_from); dist is this
    process's place in a torchrun job (every process calls train; rank 0 alone writes and logs); loggers
    receive every evaluation (default: metrics.jsonl and status.json on rank 0, see open_loggers)."""
    if loggers is None:
        loggers = open_loggers(cfg, run_dir) if dist.main else []
    trainer = None
    try:
        trainer = Trainer(cfg, run_dir, data, log, dist, loggers, resume_from, elapsed_s, init_state)
        trainer.start()
        with StopOnSignal() as stop:
            while trainer.progress.step < trainer.progress.total:
                trainer.step()
                last_step = trainer.progress.step >= trainer.progress.total
                if trainer.progress.step % cfg.train.eval_interval == 0 and not last_step:
                    if not trainer.evaluate_and_keep():
                        trainer.stopped_early = True
                        break
                # a signal reaches the processes at different steps
                (stopping,) = dist.agree(stop.signum is not None)
                if trainer.progress.step % cfg.train.checkpoint_interval == 0 and not last_step or stopping:
                    trainer.save("last")
                if stopping:
                    trainer.bar.close()
                    saved = rundir.checkpoint_dir(run_dir, "last")
                    raise Interrupted(stop.signum or signal.SIGTERM, saved, run_dir)
        final = trainer.finish()
        trainer.close_logs("finished")
        return final
    except BaseException as e:
        # an out-of-memory error is a RuntimeError too, but this process's own, not a peer's
        failure = out_of_memory(cfg, run_dir, trainer) if is_out_of_memory(e) else \
            peer_failure(e, dist) if isinstance(e, RuntimeError | torch.distributed.DistError) else None
        if trainer is not None:
            trainer.close_logs(*ending(failure or e))
        if failure is None:
            raise
        raise failure from None


def out_of_memory(cfg: Config, run_dir: Path, trainer: Trainer | None) -> TinyGPTError:
    """A device out-of-memory error as one line: what ran out, the ways to need less, the checkpoint kept."""
    t, m = cfg.train, cfg.model
    where = f" at step {trainer.progress.step + 1}" if trainer is not None else ""
    device = trainer.device if trainer is not None else t.device
    if trainer is not None:
        free_memory(trainer.device)
    half = (f"--train.batch_size {t.batch_size // 2} --train.grad_accum {t.grad_accum * 2} (the same global "
            "batch), " if t.batch_size > 1 else "")
    kept = checkpoint.valid_checkpoints(run_dir, ("last", "best"))
    return TinyGPTError(
        f"out of memory on {device}{where} (micro-batch {t.batch_size} x context {m.block_size}): try "
        f"{half}--train.activation_checkpointing true, or a shorter --model.block_size; --train.batch_size "
        f"auto finds the largest micro-batch that fits. Last checkpoint kept: {kept[0] if kept else 'none'}")


def ending(e: BaseException) -> tuple[str, str | None]:
    """How a session that raised e ended, for the loggers: interrupted (a signal, Ctrl-C) or failed (and
    why)."""
    if isinstance(e, Interrupted | KeyboardInterrupt):
        return "interrupted", None
    return "failed", (str(e).splitlines() or [type(e).__name__])[0]


class Trainer:
    """One training session's moving parts: model, optimizer, data order, progress and the files they go
    to."""

    def __init__(self, cfg: Config, run_dir: Path, data: Dataset, log: Callable[[str], None],
                 dist: Dist = SINGLE, loggers: Sequence[Logger] = (), resume_from: Path | None = None,
                 elapsed_s: float = 0.0, init_state: dict[str, torch.Tensor] | None = None):
        """The model from resume_from (or init_state's weights, or a random init), sharded or wrapped for the
        processes, its optimizer, the run's planned length, the clocks and the progress bar (see train)."""
        t = cfg.train
        self.cfg, self.run_dir, self.data, self.dist = cfg, run_dir, data, dist
        self.log = log if dist.main else (lambda msg: None)
        self.loggers = list(loggers)
        self.started: list[Logger] = []  # the loggers whose start ran, and so need a close
        self.device = train_device(dist, t)
        self.threads = use_cpu_threads() if self.device.type == "cpu" else None
        self.dtype = self.precision()
        # float16: the loss is scaled up so that small gradients survive (Micikevicius et al. 2018)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None
        self.model = self.new_model(init_state if resume_from is None else None)
        self.peak = peak_flops(self.device)
        self.sampler = EpochSampler(len(data.train.tokens), cfg.model.block_size, t.batch_size, t.seed,
                                    data.packed)
        self.tokens_per_step = dist.world * t.batch_size * t.grad_accum * cfg.model.block_size
        self.progress = Progress()
        self.stopped_early = False
        self.lr = 0.0  # the latest step's learning rate
        saved = self.restore_weights(resume_from) if resume_from is not None else None
        self.wrapped = wrap(self.model, dist)  # after the weights are in: FSDP shards them in place
        # the model, or its compiled form
        self.step_model = MaybeCompiled(self.wrapped, compile_enabled(t, self.device), self.log)
        self.optimizer = make_optimizer(self.model, t, self.device)
        if saved is not None:
            self.restore_state(resume_from, *saved)
        else:
            self.progress.elapsed_s = elapsed_s
        p = self.progress
        self.announce()
        if t.time_budget is None:  # from the config, which --resume may have changed
            p.total = planned_steps(t, self.sampler.windows_per_epoch // dist.world)
        elif not p.total:  # a provisional length until the speed is known
            p.total = PROVISIONAL
        self.planner = BudgetPlanner(t.time_budget, p.step > 0) if t.time_budget is not None else None
        self.bar = tqdm(total=p.total, initial=p.step, desc="train", file=sys.stderr, dynamic_ncols=True,
                        disable=None if dist.main else True, unit="step")
        self.interval_tokens, self.interval_start = 0, time.perf_counter()
        self.session_start, self.elapsed_before, self.first_step = time.perf_counter(), p.elapsed_s, p.step

    def precision(self) -> torch.dtype | None:
        """The autocast type (autocast_dtype), but not float16 under FSDP, whose sharded gradients the loss
        scaler does not handle here: auto falls back to float32 there, a forced float16 is refused."""
        dtype = autocast_dtype(self.cfg.train, self.device)
        if dtype == torch.float16 and self.dist.parallel == "fsdp":
            if self.cfg.train.dtype == "float16":
                raise UsageError("train.dtype float16 (loss scaling) does not work with train.parallel fsdp "
                                 "here; use train.parallel ddp, or train.dtype float32")
            self.log("note: float16 loss scaling does not work with fsdp here; training in float32")
            return None
        return dtype

    def new_model(self, init_state: dict[str, torch.Tensor] | None) -> GPT:
        """The same init on every process (init_state's weights where given), every generator seeded."""
        t = self.cfg.train
        torch.manual_seed(t.seed)
        random.seed(t.seed)
        np.random.seed(t.seed)
        model = GPT(self.cfg.model).to(self.device)
        if self.dist.rank > 0:  # but each its own dropout masks (rank 0 keeps the single-process stream)
            torch.manual_seed(t.seed + self.dist.rank)
        model.activation_checkpointing = t.activation_checkpointing
        if init_state is not None:
            model.load_state_dict(init_state)
        return model

    def announce(self) -> None:
        """Check that a step fits in an epoch, forget metrics past the restored step, say what trains."""
        t, dist, p = self.cfg.train, self.dist, self.progress
        step_windows, epoch = dist.world * t.grad_accum * t.batch_size, self.sampler.windows_per_epoch
        if epoch < step_windows:
            raise UsageError(f"a step takes {dist.world} process(es) x {t.grad_accum} x {t.batch_size} = "
                             f"{step_windows} windows, but an epoch has only {epoch}: use fewer processes, "
                             "a smaller train.batch_size or more data")
        if dist.main:
            forget_metrics_after(self.run_dir / rundir.METRICS, p.step)
        procs = (f", {dist.world} processes ({dist.parallel}), global batch {step_windows} windows"
                 if dist.active else "")
        precision = {torch.bfloat16: ", bf16 autocast", torch.float16: ", fp16 autocast with loss scaling",
                     None: ""}[self.dtype]
        threads = f", {self.threads}" if self.threads else ""
        self.log(f"model: {self.model.num_params() / 1e6:.2f}M parameters, device {self.device}{threads}"
                 f"{precision}{procs}; data: {len(self.data.train.tokens):,} "
                 f"train / {len(self.data.val.tokens):,} val tokens, {epoch:,} windows per epoch")

    def start(self) -> None:
        """Start the loggers (with the session's facts) and put the model in training mode."""
        p = self.progress
        facts = dict(step=p.step, total=p.total, params=self.model.num_params(non_embedding=False),
                     device=str(self.device),
                     dtype=str(self.dtype or torch.float32).removeprefix("torch."))
        for logger in self.loggers:
            logger.start(self.cfg, facts)
            self.started.append(logger)
        self.model.train()

    def restore_weights(self, ckpt: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        """The checkpoint's weights into the (not yet wrapped) model; returns its trainer and state files."""
        loaded = checkpoint.load(ckpt, self.device, into=self.model, verified=True)
        return loaded.trainer_state(), loaded.state

    def restore_state(self, ckpt: Path, trainer: dict[str, Any], state: dict[str, Any]) -> None:
        dist = self.dist
        load_optimizer_state(self.model, self.optimizer, trainer["optimizer"], dist)
        self.progress = Progress(**state["progress"])
        if self.scaler is not None and self.progress.scaler:
            self.scaler.load_state_dict(self.progress.scaler)
        self.sampler.load_state_dict(self.progress.sampler)
        saved_ranks = trainer.get("rng_ranks") or [trainer["rng"]]
        if dist.rank < len(saved_ranks):
            set_rng_state(saved_ranks[dist.rank], state["rng"])
        else:  # more processes than the job that saved: a fresh dropout stream for this one
            torch.manual_seed(self.cfg.train.seed + dist.rank)
        if self.progress.world != dist.world:
            self.log(f"resuming a job of {self.progress.world} process(es) with {dist.world}: the data "
                     "position carries over (it counts windows of the whole job), the global batch changes "
                     "with the number of processes, and this is not a bit-exact continuation")
        self.log(f"resuming from {ckpt} at step {self.progress.step}")

    def step(self) -> None:
        """One optimizer step at the scheduled learning rate, and its bookkeeping (progress, bar, budget
        plan)."""
        p, t = self.progress, self.cfg.train
        self.lr = lr_at(p.step, t, p.total)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        result = train_step(self.step_model, self.model, self.optimizer,
                            micro_batches(self.data, self.sampler, self.cfg, self.device, self.dist),
                            t.grad_clip, self.dtype, self.dist, self.scaler)
        if result.overflow and self.scaler is not None and self.scaler.get_scale() >= 1:
            p.overflow_skips += 1  # the scaler has lowered the scale; the next step tries again
        elif not result.finite:
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
            if self.dist.active:  # rank 0's clock plans for every process (a sum in which only rank 0 counts)
                (planned,) = self.dist.total(float(new_total or 0) if self.dist.main else 0.0)
                new_total = int(planned) or None
            if new_total is not None and new_total != p.total:
                if p.total >= PROVISIONAL:
                    self.log(f"time budget {t.time_budget:g} s: planning {new_total} steps")
                p.total = self.bar.total = new_total

    def nonfinite(self, result: StepResult) -> None:
        """A NaN/inf step (already skipped by train_step): stop the run, or go on with
        train.skip_nonfinite."""
        step = self.progress.step + 1
        if not self.cfg.train.skip_nonfinite:
            last = checkpoint.valid_checkpoints(self.run_dir, ("last", "best"))
            raise TinyGPTError(
                f"non-finite loss or gradient at step {step} (loss {result.loss.item()}, grad norm "
                f"{result.grad_norm.item()}); last good checkpoint: {last[0] if last else 'none'}. Lower "
                "--train.lr, or pass --train.skip_nonfinite true to skip such steps")
        self.log(f"warning: step {step}: non-finite loss or gradient, step skipped")

    def evaluate_and_keep(self) -> bool:
        """Periodic evaluation: log and record it, keep the best checkpoint; False to stop early
        (patience)."""
        p, t = self.progress, self.cfg.train
        tok_s = self.interval_tokens / (time.perf_counter() - self.interval_start)
        p.elapsed_s = self.elapsed()
        train_loss, val_loss = (self.loss(split, t.eval_iters * t.batch_size).loss
                                for split in (self.data.train, self.data.val))
        self.record(self.metrics(train_loss, val_loss, self.lr, tok_s))
        mfu = f", MFU {tok_s * self.model.flops_per_token() / self.peak:.1%}" if self.peak else ""
        skips = f", {p.overflow_skips} fp16 overflow skip(s)" if self.scaler is not None else ""
        self.log(f"step {p.step}: train {train_loss:.4f}, val {val_loss:.4f}, {tok_s:,.0f} tok/s{mfu}, peak "
                 f"memory {peak_memory_gib(self.device):.2f} GiB{skips}, ETA {self.eta()}")
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
        """The final evaluation (the whole val split, or train.final_eval_tokens of it), recorded and logged;
        the best and last checkpoints saved."""
        p, t = self.progress, self.cfg.train
        self.bar.close()
        p.elapsed_s = self.elapsed()
        tok_s = self.interval_tokens / max(1e-9, time.perf_counter() - self.interval_start)
        train_loss = self.loss(self.data.train, t.eval_iters * t.batch_size).loss
        block = self.cfg.model.block_size
        every = len(eval_starts(len(self.data.val.tokens), block, None, self.data.packed))
        cap = None if t.final_eval_tokens is None or t.final_eval_tokens // block >= every else \
            max(1, t.final_eval_tokens // block)
        val = self.loss(self.data.val, cap, count_bytes=True)
        val_loss = val.loss
        share = "whole val split" if cap is None else f"{cap:,} of the val split's {every:,} windows, spread"
        final = dict(self.metrics(train_loss, val_loss, lr_at(p.step, t, p.total), tok_s),
                     val_bpb=loss_metrics(val)["bits_per_byte"], final=True,
                     stopped_early=self.stopped_early)
        self.record(final)
        self.log(f"final (step {p.step}): train {train_loss:.4f}, val {val_loss:.4f} ({share}), "
                 f"{p.elapsed_s:.0f} s")
        if val_loss < p.best_val:
            p.best_val, p.bad_evals = val_loss, 0
            self.save("best")
        self.save("last")
        return final

    def elapsed(self) -> float:
        """Seconds of training in this run, earlier sessions included."""
        return self.elapsed_before + time.perf_counter() - self.session_start

    def eta(self) -> str:
        """Time left at this session's pace so far (evaluations included), as 1h02m, 3m05s or 12s."""
        p = self.progress
        done = p.step - self.first_step
        left = round((time.perf_counter() - self.session_start) / max(done, 1) * (p.total - p.step))
        h, m, s = left // 3600, left // 60 % 60, left % 60
        return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"

    def loss(self, split: Split, max_windows: int | None, count_bytes: bool = False) -> LossSum:
        """The loss summed over the windows, each process scoring its share; the target text's bytes too with
        count_bytes (for bits per byte)."""
        dist = self.dist
        tokenizer = self.data.tokenizer if count_bytes else None
        s = loss_over(self.model, split, self.cfg.train.batch_size, self.device, self.dtype, max_windows,
                      self.data.packed, tokenizer, shard=(dist.rank, dist.world))
        nats, targets, n_bytes = dist.total(s.nats, s.targets, s.bytes)
        return LossSum(nats, int(targets), int(n_bytes))

    def metrics(self, train_loss: float, val_loss: float, lr: float, tok_s: float) -> dict[str, Any]:
        p = self.progress
        return dict(step=p.step, train_loss=train_loss, val_loss=val_loss, val_ppl=math.exp(val_loss), lr=lr,
                    tokens_seen=p.tokens_seen, tokens_per_s=tok_s, elapsed_s=p.elapsed_s,
                    peak_memory_gib=peak_memory_gib(self.device), overflow_skips=p.overflow_skips)

    def record(self, entry: dict[str, Any]) -> None:
        for logger in self.loggers:  # rank 0's alone (the other processes have none)
            logger.log(entry, self.progress.total)

    def close_logs(self, outcome: str, error: str | None = None) -> None:
        """Tell the started loggers how the session ended (a failing logger must not hide the run's own
        error)."""
        for logger in self.started:
            try:
                logger.close(outcome, error)
            except Exception as e:  # noqa: BLE001 - reported, then the next logger
                self.log(f"warning: closing the {type(logger).__name__} failed: {e}")
        self.started = []

    def save(self, name: str) -> None:
        """Every process takes part (its RNG state; FSDP gathers the shards); rank 0 writes the checkpoint."""
        dist = self.dist
        self.progress.sampler, self.progress.world = self.sampler.state_dict(), dist.world
        if self.scaler is not None:
            self.progress.scaler = self.scaler.state_dict()
        rng_tensors, rng_plain = rng_state()
        ranks_rng = dist.gather(rng_tensors)
        model, optimizer = whole_state(self.model, self.optimizer, dist)
        error = None
        if dist.main:
            trainer = {"optimizer": optimizer, "rng": rng_tensors,
                       **({"rng_ranks": ranks_rng} if dist.active else {})}
            try:
                dest = rundir.checkpoint_dir(self.run_dir, name)
                checkpoint.save(dest, model, self.cfg, self.data.tokenizer,
                                trainer=trainer, state={"progress": vars(self.progress), "rng": rng_plain})
            except TinyGPTError as e:
                error = e
        (failed,) = dist.agree(error is not None)  # so that the other processes stop too, instead of waiting
        if error is not None:
            raise error
        if failed:
            raise TinyGPTError("process 0 could not write the checkpoint; see its message")
