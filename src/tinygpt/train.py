"""The training loop: AdamW, warm-up + cosine schedule, periodic evaluation, checkpoints, resume."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from tinygpt import checkpoint, config
from tinygpt.config import Config, TrainConfig
from tinygpt.data import Dataset, EpochSampler, check_length, windows
from tinygpt.device import MaybeCompiled, autocast, autocast_dtype, peak_flops, resolve_device
from tinygpt.errors import Interrupted, TinyGPTError
from tinygpt.evaluate import split_loss
from tinygpt.model import GPT
from tinygpt.optim import make_optimizer


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """Linear warm-up to cfg.lr, then cosine decay, or flat then linear decay (wsd), reaching cfg.min_lr
    at lr_decay_iters (default: `total`, the planned number of steps) and staying there."""
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / (cfg.warmup_iters + 1)
    end = cfg.lr_decay_iters or total
    if step >= end:
        return cfg.min_lr
    if cfg.schedule == "wsd":
        decay_start = max(cfg.warmup_iters, end - round(cfg.decay_fraction * end))
        frac = max(0.0, (step - decay_start) / max(1, end - decay_start))
        return cfg.lr + frac * (cfg.min_lr - cfg.lr)
    progress = (step - cfg.warmup_iters) / max(1, end - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def planned_steps(cfg: TrainConfig, windows_per_epoch: int) -> int:
    """Steps for max_iters or epochs (a time budget is planned later, from measured speed)."""
    if cfg.epochs is not None:
        return max(1, math.ceil(cfg.epochs * windows_per_epoch / (cfg.batch_size * cfg.grad_accum)))
    return cfg.max_iters


PROVISIONAL = 10**9


class BudgetPlanner:
    """Fit the number of steps to train.time_budget: once the speed is measured, and again at every
    evaluation, total = steps so far + remaining seconds / measured seconds per step (evaluations and
    checkpoints included). When the budget is spent, total = now."""

    SKIP = 3  # the first steps pay one-off costs (allocations, caches) and would skew the estimate
    MEASURE = 5  # steps timed before the first plan

    def __init__(self, budget: float, resumed: bool):
        self.budget = budget
        self.start: tuple[int, float] | None = None
        self.skip = 0 if resumed else self.SKIP

    def update(self, step: int, elapsed: float, now: float, at_eval: bool) -> int | None:
        """A new planned total, or None to keep the current one."""
        if elapsed >= self.budget:
            return step
        if self.start is None:
            if step >= self.skip:
                self.start = (step, now)
            return None
        steps = step - self.start[0]
        if steps == self.MEASURE or (at_eval and steps > self.MEASURE):
            return step + int((self.budget - elapsed) * steps / (now - self.start[1]))
        return None


def forward_backward(forward: Callable, data: Dataset, sampler: EpochSampler, cfg: Config, device: torch.device,
                     dtype: torch.dtype | None) -> torch.Tensor:
    """Gradients of one optimizer step (train.grad_accum micro-batches) in .grad; returns the last micro-batch's loss."""
    for _ in range(cfg.train.grad_accum):
        x, y, seg = windows(data.train, sampler.next_starts(), cfg.model.block_size)
        with autocast(device, dtype):
            _, loss = forward(x.to(device, non_blocking=True), y.to(device, non_blocking=True),
                              segments=None if seg is None else seg.to(device, non_blocking=True))
        (loss / cfg.train.grad_accum).backward()
    return loss


# The (n_layer, n_head, n_embd) shapes model.auto_size picks from, smallest first (heads of 32, then 64 wide).
SIZE_LADDER = ((4, 2, 64), (4, 3, 96), (4, 4, 128), (4, 6, 192), (6, 8, 256), (6, 6, 384), (8, 8, 512), (12, 12, 768))
# Training tokens per block parameter that auto_size wants the budget to afford; see choose_size.
TOKENS_PER_PARAM = 1.2


def choose_size(cfg: Config, data: Dataset, device: torch.device, dtype: torch.dtype | None,
                log: Callable[[str], None]) -> float:
    """model.auto_size: set cfg.model's n_layer, n_head and n_embd to the largest SIZE_LADDER shape whose
    measured speed lets the time budget feed it TOKENS_PER_PARAM tokens per block parameter (the smallest
    if none can); returns the seconds spent measuring, which count against the budget.

    Why a tokens-per-parameter rule: in a fixed time a bigger model learns more per token but sees fewer
    tokens, and the best trade sits at a roughly constant ratio (Hoffmann et al. 2022 found ~20 for large
    models trained to convergence). For short CPU budgets the ratio was measured here instead: on
    char-level Tiny Shakespeare with 120 s on 2 cores, 4 x 128 (1.8M tokens, 2.3 per parameter) reached
    val 1.63 where 4 x 192 (1.0M tokens, 0.58 per parameter) reached 1.74. Speeds are measured rather than
    estimated from FLOPs because small models on CPUs are far from their FLOP bound."""
    start = time.perf_counter()
    tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.model.block_size
    chosen = SIZE_LADDER[0]
    for n_layer, n_head, n_embd in SIZE_LADDER:
        trial = dataclasses.replace(cfg.model, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
        trial_cfg = dataclasses.replace(cfg, model=trial)
        model = GPT(trial).to(device)
        optimizer = make_optimizer(model, cfg.train, device)
        sampler = EpochSampler(len(data.train.tokens), trial.block_size, cfg.train.batch_size, cfg.train.seed,
                               data.packed)
        times = []
        for _ in range(3):  # the first step allocates the gradients and optimizer state: not timed
            begin = time.perf_counter()
            forward_backward(model, data, sampler, trial_cfg, device, dtype)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - begin)
        params = sum(p.numel() for p in model.transformer.h.parameters())
        left = cfg.train.time_budget - (time.perf_counter() - start)
        tokens = left / (sum(times[1:]) / 2) * tokens_per_step
        log(f"auto size: {n_layer} x {n_embd} ({params / 1e6:.2f}M block parameters) would see {tokens / 1e6:.1f}M "
            f"tokens, {tokens / params:.1f} per parameter")
        if tokens < TOKENS_PER_PARAM * params:
            break
        chosen = (n_layer, n_head, n_embd)
    cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd = chosen
    spent = time.perf_counter() - start
    log(f"auto size: chose n_layer {chosen[0]}, n_head {chosen[1]}, n_embd {chosen[2]} ({spent:.1f} s spent timing)")
    return spent


def _rng_state() -> tuple[dict[str, Any], dict[str, Any]]:
    """RNG states split into tensors (for trainer.pt) and JSON-able values (for state.json)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state_all()
    np_state = np.random.get_state()
    plain = {"python": list(random.getstate()[1]) + [random.getstate()[2]],
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    return tensors, plain


def _set_rng_state(tensors: dict[str, Any], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tensors["cuda"])
    py = plain["python"]
    random.setstate((3, tuple(py[:-1]), py[-1]))
    kind, keys, *rest = plain["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))


def _forget_metrics_after(path: Path, step: int) -> None:
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
    path.write_text("".join(keep))


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


def train(cfg: Config, run_dir: Path, data: Dataset, resume_from: Path | None = None,
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train cfg.model on data, writing checkpoints and metrics.jsonl into run_dir; returns the final metrics."""
    t = cfg.train
    device = resolve_device(t.device)
    dtype = autocast_dtype(t, device)
    check_length(data, cfg.model.block_size)
    torch.manual_seed(t.seed)
    random.seed(t.seed)
    np.random.seed(t.seed)

    sizing_s = 0.0
    if cfg.model.auto_size and resume_from is None:
        sizing_s = choose_size(cfg, data, device, dtype, log)
        config.save(cfg, run_dir / "config.yaml")  # the shape it chose is the run's shape
        torch.manual_seed(t.seed)  # the model's initialisation must not depend on how many shapes were timed
    model = GPT(cfg.model).to(device)
    model.activation_checkpointing = t.activation_checkpointing
    forward = MaybeCompiled(model, t.compile, log)
    peak = peak_flops(device)
    optimizer = make_optimizer(model, t, device)
    sampler = EpochSampler(len(data.train.tokens), cfg.model.block_size, t.batch_size, t.seed, data.packed)
    progress = Progress(elapsed_s=sizing_s)  # the time spent choosing a size counts against the budget
    if resume_from is not None:
        loaded = checkpoint.load(resume_from, device, into=model)
        trainer = loaded.trainer_state()
        optimizer.load_state_dict(trainer["optimizer"])
        progress = Progress(**loaded.state["progress"])
        sampler.load_state_dict(progress.sampler)
        _set_rng_state(trainer["rng"], loaded.state["rng"])
        log(f"resuming from {resume_from} at step {progress.step}")
    _forget_metrics_after(run_dir / "metrics.jsonl", progress.step)

    def save(name: str) -> None:
        progress.sampler = sampler.state_dict()
        rng_tensors, rng_plain = _rng_state()
        checkpoint.save(run_dir / checkpoint.CHECKPOINTS / name, model, cfg, data.tokenizer,
                        trainer={"optimizer": optimizer.state_dict(), "rng": rng_tensors},
                        state={"progress": vars(progress), "rng": rng_plain})

    def record(entry: dict[str, Any]) -> None:
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")

    log(f"model: {model.num_params() / 1e6:.2f}M parameters, device {device}"
        f"{', bf16 autocast' if dtype else ''}; data: {len(data.train.tokens):,} train / {len(data.val.tokens):,} val tokens, "
        f"{sampler.windows_per_epoch:,} windows per epoch")
    tokens_per_step = t.batch_size * t.grad_accum * cfg.model.block_size
    if t.time_budget is None:  # from the config, which --resume may have changed
        progress.total = planned_steps(t, sampler.windows_per_epoch)
    elif not progress.total:  # a provisional length until the speed is known
        progress.total = PROVISIONAL
    planner = BudgetPlanner(t.time_budget, progress.step > 0) if t.time_budget is not None else None
    bar = tqdm(total=progress.total, initial=progress.step, desc="train", file=sys.stderr, dynamic_ncols=True,
               disable=None, unit="step")
    interval_tokens, interval_start = 0, time.perf_counter()
    session_start, elapsed_before = time.perf_counter(), progress.elapsed_s
    stopped_early = False
    model.train()
    with StopOnSignal() as stop:
        while progress.step < progress.total:
            lr = lr_at(progress.step, t, progress.total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = forward_backward(forward, data, sampler, cfg, device, dtype)
            # clip_grad_norm_ also returns the norm, so one check catches a NaN/inf anywhere in the gradients
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or float("inf"))
            if not bool(torch.isfinite(norm + loss.detach())):
                if not t.skip_nonfinite:
                    last = checkpoint.valid_checkpoints(run_dir, ("last", "best"))
                    raise TinyGPTError(
                        f"non-finite loss or gradient at step {progress.step + 1} (loss {loss.item()}, grad norm "
                        f"{norm.item()}); last good checkpoint: {last[0] if last else 'none'}. Lower --train.lr, or "
                        "pass --train.skip_nonfinite true to skip such steps")
                log(f"warning: step {progress.step + 1}: non-finite loss or gradient, step skipped")
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            progress.step += 1
            progress.tokens_seen += tokens_per_step
            interval_tokens += tokens_per_step
            bar.update(1)
            if progress.step % 10 == 0:  # .item() waits for the device; not every step
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}")
            if planner is not None:
                now = time.perf_counter()
                new_total = planner.update(progress.step, elapsed_before + now - session_start, now,
                                           progress.step % t.eval_interval == 0)
                if new_total is not None and new_total != progress.total:
                    if progress.total >= PROVISIONAL:
                        log(f"time budget {t.time_budget:g} s: planning {new_total} steps")
                    progress.total = bar.total = new_total
            last_step = progress.step >= progress.total
            if progress.step % t.eval_interval == 0 and not last_step:
                tok_s = interval_tokens / (time.perf_counter() - interval_start)
                progress.elapsed_s = elapsed_before + time.perf_counter() - session_start
                train_loss, val_loss = (split_loss(model, split, t.batch_size, device, dtype, t.eval_iters * t.batch_size,
                                                   data.packed).loss for split in (data.train, data.val))
                entry = dict(step=progress.step, train_loss=train_loss, val_loss=val_loss, val_ppl=math.exp(val_loss),
                             lr=lr, tokens_seen=progress.tokens_seen, tokens_per_s=tok_s, elapsed_s=progress.elapsed_s)
                mfu = f", MFU {tok_s * model.flops_per_token() / peak:.1%}" if peak else ""
                record(entry)
                log(f"step {progress.step}: train {train_loss:.4f}, val {val_loss:.4f}, {tok_s:,.0f} tok/s{mfu}")
                if val_loss < progress.best_val:
                    progress.best_val, progress.bad_evals = val_loss, 0
                    save("best")
                else:
                    progress.bad_evals += 1
                    if t.patience and progress.bad_evals >= t.patience:
                        log(f"early stop: val loss has not improved for {t.patience} evaluations")
                        stopped_early = True
                        break
                interval_tokens, interval_start = 0, time.perf_counter()
            if progress.step % t.checkpoint_interval == 0 and not last_step or stop.signum is not None:
                save("last")
            if stop.signum is not None:
                bar.close()
                raise Interrupted(stop.signum, run_dir / checkpoint.CHECKPOINTS / "last", run_dir)
    bar.close()

    progress.elapsed_s = elapsed_before + time.perf_counter() - session_start
    tok_s = interval_tokens / max(1e-9, time.perf_counter() - interval_start)
    train_loss = split_loss(model, data.train, t.batch_size, device, dtype, t.eval_iters * t.batch_size, data.packed).loss
    val_loss = split_loss(model, data.val, t.batch_size, device, dtype, packed=data.packed).loss  # the whole val split
    final = dict(step=progress.step, train_loss=train_loss, val_loss=val_loss, val_ppl=math.exp(val_loss),
                 lr=lr_at(progress.step, t, progress.total), tokens_seen=progress.tokens_seen, tokens_per_s=tok_s,
                 elapsed_s=progress.elapsed_s, final=True, stopped_early=stopped_early)
    record(final)
    log(f"final (step {progress.step}): train {train_loss:.4f}, val {val_loss:.4f} (whole val split), "
        f"{progress.elapsed_s:.0f} s")
    if val_loss < progress.best_val:
        progress.best_val, progress.bad_evals = val_loss, 0
        save("best")
    save("last")
    return final
