"""Many processes (torchrun): the process group, the model wrapper, and the few collectives training needs.

`Dist` describes this process's place in the job; outside torchrun it is one process of one and every
collective below returns its input, so the single-process path runs exactly as before. Everything that could
differ between processes (a stop request, a skipped step, the time-budget plan, evaluation losses) goes
through `agree`, `total` or `from_main`, so the ranks never disagree on the number of steps and never wait
for each other forever (`train.dist_timeout` bounds every collective).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from tinygpt.config import TrainConfig
from tinygpt.errors import TinyGPTError, UsageError
from tinygpt.model import GPT


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    parallel: str = "none"  # "ddp" or "fsdp" under torchrun

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def _reduce(self, values: list[float], op: Any) -> list[float]:
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    @property
    def device(self) -> torch.device:
        """Where collectives run: this process's GPU under nccl, else the CPU."""
        return torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")

    def agree(self, *flags: bool) -> list[bool]:
        """Each flag true on every process if it is true on any (a stop request, a non-finite step)."""
        return [v > 0 for v in self._reduce([float(f) for f in flags], dist.ReduceOp.MAX)]

    def total(self, *values: float) -> list[float]:
        """The sums over the processes (evaluation losses and their counts)."""
        return self._reduce(list(values), dist.ReduceOp.SUM)

    def from_main(self, obj: Any) -> Any:
        """Rank 0's value of obj, on every process."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every process's obj, in rank order, on every process."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


SINGLE = Dist()


def init(cfg: TrainConfig) -> Dist:
    """This process's Dist: from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) with the process group
    started (nccl with one GPU per local rank where CUDA is used, else gloo), or SINGLE outside torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in os.environ:
        return SINGLE
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=cfg.dist_timeout))
    return Dist(rank, world, local, "ddp")


def for_run(d: Dist, cfg: TrainConfig) -> Dist:
    """d with the run's parallel mode (a resumed run keeps the one it was saved with), checked."""
    if not d.active:
        return d
    if cfg.parallel == "fsdp" and cfg.optimizer == "muon":
        raise UsageError("train.optimizer muon needs each weight matrix whole, which train.parallel fsdp shards; "
                         "use train.parallel ddp with muon, or adamw with fsdp")
    return dataclasses.replace(d, parallel=cfg.parallel)


def device_for(d: Dist, device: torch.device) -> torch.device:
    """One GPU per local rank under torchrun."""
    return torch.device("cuda", d.local_rank) if d.active and device.type == "cuda" else device


def wrap(model: torch.nn.Module, d: Dist) -> torch.nn.Module:
    """What the training step calls: DDP around the model, or the model sharded in place by FSDP2 (each block,
    then the rest); the model itself where there is one process."""
    if not d.active:
        return model
    if d.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        p = next(model.parameters())
        return DistributedDataParallel(model, device_ids=[p.device.index] if p.device.type == "cuda" else None)
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise UsageError(f"train.parallel fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard, PyTorch 2.6+); "
                         f"this is PyTorch {torch.__version__}: use train.parallel ddp") from None
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    return model


@contextlib.contextmanager
def gradient_sync(wrapped: torch.nn.Module, d: Dist, sync: bool) -> Iterator[None]:
    """Around one micro-batch's forward and backward: gradients are averaged over the processes only when
    `sync` (the last micro-batch of a step), so accumulation costs one exchange per step, not one per micro-batch."""
    if not d.active or sync:
        yield
    elif d.parallel == "ddp":
        with wrapped.no_sync():
            yield
    else:
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)


def whole_state(model: GPT, optimizer: Any, d: Dist) -> tuple[GPT | None, Any]:
    """The model and optimizer state to save, whole: as they are, or under FSDP gathered from the shards (every
    process takes part; rank 0 gets them, as a plain model built around the gathered weights)."""
    if d.parallel != "fsdp" or not d.active:
        return model, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=whole)
    optim = get_optimizer_state_dict(model, optimizer, options=whole)
    if not d.main:
        return None, None
    with torch.device("meta"):  # no second copy: the gathered tensors become its parameters
        plain = GPT(model.config)
    # clone: the gathered tensors can be views into a larger buffer, which safetensors refuses to write
    plain.load_state_dict({k: v.clone() for k, v in weights.items()}, assign=True)
    if model.config.tie_weights and model.config.head == "linear":
        plain.lm_head.weight = plain.transformer.wte.weight
    return plain, optim


def load_optimizer_state(model: torch.nn.Module, optimizer: Any, saved: Any, d: Dist) -> None:
    """Put a saved optimizer state back: whole under FSDP (each process takes its shards of it)."""
    if d.parallel != "fsdp" or not d.active:
        optimizer.load_state_dict(saved)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, saved, options=StateDictOptions(full_state_dict=True))


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) value made whole; a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def peer_failure(e: BaseException, d: Dist) -> TinyGPTError | None:
    """The one-line error for a collective that failed because another process died or stopped answering."""
    if not d.active or not isinstance(e, RuntimeError | dist.DistError):
        return None
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    return TinyGPTError(f"process {d.rank} of {d.world}: another process of the job failed or stopped answering "
                        f"({first}); resume the job with --resume once every process can run")


def shutdown(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()
