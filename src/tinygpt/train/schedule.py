"""How long to train and at what learning rate: the schedule, the time-budget planner, and auto-sizing."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import torch

from tinygpt.config import Config, TrainConfig
from tinygpt.data.batches import EpochSampler
from tinygpt.data.prepare import Dataset
from tinygpt.model import GPT
from tinygpt.train.optim import make_optimizer
from tinygpt.train.step import micro_batches, train_step


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


# The planned length of a time-budgeted run until its speed is measured: "not known yet", never reached.
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


# The (n_layer, n_head, n_embd) shapes model.auto_size picks from, smallest first (heads of 32, then 64 wide).
SIZE_LADDER = ((4, 2, 64), (4, 3, 96), (4, 4, 128), (4, 6, 192), (6, 8, 256), (6, 6, 384), (8, 8, 512),
               (12, 12, 768))
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
    log(f"auto size: sizing the model to the {cfg.train.time_budget:g} s budget (--model.auto_size false or "
        "an explicit --model.n_layer/n_head/n_embd keeps the preset's size)")
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
            train_step(model, model, optimizer, micro_batches(data, sampler, trial_cfg, device),
                       cfg.train.grad_clip,
                       dtype)
            times.append(time.perf_counter() - begin)
        params = sum(p.numel() for p in model.transformer.h.parameters())
        left = cfg.train.time_budget - (time.perf_counter() - start)
        tokens = left / (sum(times[1:]) / 2) * tokens_per_step
        log(f"auto size: {n_layer} x {n_embd} ({params / 1e6:.2f}M block parameters) would see "
            f"{tokens / 1e6:.1f}M tokens, {tokens / params:.1f} per parameter")
        if tokens < TOKENS_PER_PARAM * params:
            break
        chosen = (n_layer, n_head, n_embd)
    cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd = chosen
    spent = time.perf_counter() - start
    log(f"auto size: chose n_layer {chosen[0]}, n_head {chosen[1]}, n_embd {chosen[2]} ({spent:.1f} s spent "
        "timing)")
    return spent
