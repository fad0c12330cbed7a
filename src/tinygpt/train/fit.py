"""`--train.batch_size auto`: the largest micro-batch that fits the device's memory, at the global batch.

A GPU's memory, not its speed, usually decides the micro-batch; the global batch (micro-batch x grad_accum)
is what the learning rate was tuned for, so it is kept and grad_accum makes up the difference.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from tinygpt.config import Config
from tinygpt.device import free_memory, is_out_of_memory
from tinygpt.errors import TinyGPTError
from tinygpt.model import GPT
from tinygpt.train.optim import make_optimizer
from tinygpt.train.step import train_step

# Devices whose memory is probed. On a CPU the limit is RAM, where a batch that does not fit swaps rather than
# failing, and the preset's batch is already sized for it.
PROBED = ("cuda", "mps")


def fit_batch(cfg: Config, device: torch.device, dtype: torch.dtype | None,
              log: Callable[[str], None]) -> None:
    """Choose cfg.train.batch_size and grad_accum in place (see TrainConfig.batch_size); auto_batch is then
    false, so the saved config holds the choice and a resumed run keeps it."""
    t = cfg.train
    t.auto_batch = False
    global_batch = t.batch_size * t.grad_accum
    if device.type not in PROBED:
        log(f"train.batch_size auto: on {device.type} the configured batch stays ({t.batch_size} x "
            f"grad_accum {t.grad_accum})")
        return
    start = time.perf_counter()
    batch = largest_that_fits(global_batch, lambda b: step_fits(cfg, device, dtype, b))
    if batch is None:
        raise TinyGPTError(f"out of memory on {device} even with a micro-batch of 1 x context "
                           f"{cfg.model.block_size}: try --train.activation_checkpointing true, a shorter "
                           "--model.block_size or a smaller model")
    t.batch_size, t.grad_accum = batch, global_batch // batch
    log(f"train.batch_size auto: micro-batch {batch} x grad_accum {t.grad_accum} (global batch "
        f"{global_batch}) fits on {device}; found in {time.perf_counter() - start:.0f} s")


def largest_that_fits(global_batch: int, fits: Callable[[int], bool]) -> int | None:
    """The largest divisor of global_batch that fits (so the global batch is kept exactly), None if even 1
    fails. Halving first: global_batch, then after each failure the largest divisor at most half of it;
    then upwards through the divisors between the one that fitted and the one that did not, until one fails
    (memory only grows with the batch). 18 with room for 8: 18, 9, 3 (fit), 6 (fit), giving 6."""
    divisors = [d for d in range(1, global_batch + 1) if global_batch % d == 0]
    failed = batch = global_batch
    while not fits(batch):
        if batch == 1:
            return None
        failed, batch = batch, max(d for d in divisors if d <= batch // 2)
    for larger in (d for d in divisors if batch < d < failed):
        if not fits(larger):
            break
        batch = larger
    return batch


def step_fits(cfg: Config, device: torch.device, dtype: torch.dtype | None, batch: int) -> bool:
    """Whether one training step at this micro-batch runs without running out of device memory; the memory
    it took is given back either way."""
    try:
        try_step(cfg, device, dtype, batch)
        return True
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        return False
    finally:
        free_memory(device)


def try_step(cfg: Config, device: torch.device, dtype: torch.dtype | None, batch: int) -> None:
    """One forward, backward and optimizer step of a fresh model on random tokens: the activations, gradients
    and optimizer state that training will hold at this micro-batch."""
    model = GPT(cfg.model).to(device)
    model.activation_checkpointing = cfg.train.activation_checkpointing
    optimizer = make_optimizer(model, cfg.train, device)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    x = torch.randint(cfg.model.vocab_size or 256, (batch, cfg.model.block_size), device=device)
    train_step(model, model, optimizer, [(x, x, None)], cfg.train.grad_clip, dtype, scaler=scaler)
