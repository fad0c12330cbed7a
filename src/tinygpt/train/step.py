"""One optimizer step, the piece that the trainer, auto-sizing and the training benchmark share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tinygpt.config import Config
from tinygpt.data.batches import EpochSampler, windows
from tinygpt.data.prepare import Dataset
from tinygpt.device import autocast
from tinygpt.train.distributed import SINGLE, Dist, full_tensor, gradient_sync
from tinygpt.train.optim import Optimizers, members

# (inputs, targets, segment numbers or None), each (batch, block_size), on the training device
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


@dataclass
class StepResult:
    loss: torch.Tensor  # the last micro-batch's loss, still on the device (reading it waits for the device)
    grad_norm: torch.Tensor  # the global gradient norm before clipping
    finite: bool  # False: the loss or a gradient was NaN/inf, and the update was skipped
    overflow: bool = False  # float16: the gradients overflowed at this loss scale (the scaler lowers it)


def micro_batches(data: Dataset, sampler: EpochSampler, cfg: Config, device: torch.device,
                  dist: Dist = SINGLE) -> list[Batch]:
    """This process's train.grad_accum micro-batches of the next step's training windows, on the device.

    Every process draws the whole step's world * grad_accum micro-batches from the same sampler and keeps
    its own consecutive share, so the shares are disjoint, their union is exactly what one process with
    world * grad_accum micro-batches would see, and the sampler's position is the same everywhere."""
    batches: list[Batch] = []
    for i in range(dist.world * cfg.train.grad_accum):
        starts = sampler.next_starts()
        if i // cfg.train.grad_accum != dist.rank:
            continue
        x, y, segments = windows(data.train, starts, cfg.model.block_size)
        batches.append((x.to(device, non_blocking=True), y.to(device, non_blocking=True),
                        None if segments is None else segments.to(device, non_blocking=True)))
    return batches


def train_step(step_model: torch.nn.Module | MaybeCompiled, model: torch.nn.Module,
               optimizer: torch.optim.Optimizer | Optimizers, batches: Sequence[Batch], grad_clip: float,
               dtype: torch.dtype | None, dist: Dist = SINGLE,
               scaler: torch.amp.GradScaler | None = None) -> StepResult:
    """Forward and backward over the micro-batches (gradients averaged over them and, under torchrun, over
    the processes at the last one), the global gradient norm clipped to grad_clip (0: not clipped), then the
    update, skipped on every process when the loss or the norm is not finite on any.
    `step_model` computes the loss: the model, its DDP wrapper or their compiled form (MaybeCompiled);
    `model` owns the parameters. With a scaler (float16) the loss is scaled up before the backward pass, so
    that small gradients do not flush to zero in float16, and the gradients are scaled back before clipping;
    gradients that overflow at that scale skip the update and lower the scale (the scaler's update)."""
    wrapped = step_model.model if isinstance(step_model, MaybeCompiled) else step_model
    for i, (x, y, segments) in enumerate(batches):
        with gradient_sync(wrapped, dist, i == len(batches) - 1):
            with autocast(x.device, dtype):
                _, loss = step_model(x, y, segments=segments)
            part = loss / len(batches)
            (scaler.scale(part) if scaler is not None else part).backward()
    for part_optimizer in members(optimizer) if scaler is not None else []:
        scaler.unscale_(part_optimizer)
    # clip_grad_norm_ also returns the norm, so one check catches a NaN/inf anywhere in the gradients
    norm = full_tensor(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf")))
    bad_loss, bad_grad = dist.agree(not bool(torch.isfinite(loss.detach())), not bool(torch.isfinite(norm)))
    bad = bad_loss or bad_grad
    if not bad:
        if scaler is not None:
            for part_optimizer in members(optimizer):
                scaler.step(part_optimizer)
        else:
            optimizer.step()
    if scaler is not None:
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, norm, not bad, overflow=scaler is not None and bad_grad and not bad_loss)


class MaybeCompiled:
    """Call a torch.compile'd model, falling back to the eager one (with a one-line notice) if compiling
    fails, which happens at the first call rather than at torch.compile()."""

    def __init__(self, model: torch.nn.Module, enabled: bool, log):
        self.model, self.log = model, log
        self.fn = torch.compile(model) if enabled else model

    def __call__(self, *args, **kwargs):
        try:
            return self.fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any compiler failure means: run eagerly
            if self.fn is self.model:
                raise
            self.log(f"note: torch.compile failed ({str(e).splitlines()[0][:120]}); continuing without it")
            self.fn = self.model
            return self.fn(*args, **kwargs)
