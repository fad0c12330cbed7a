"""Many processes (torchrun): the process group, the model wrapper, and the few collectives training needs.

`Dist` describes this process's place in the job; outside torchrun it is one process of one and every
collective below returns its input, so the single-process path runs exactly as before. The processes first
meet at the job's store, where rank 0 hands the others the run it set up (`meet`, `from_main`); the process
group starts after that (`start_group`), from the run's own config, so a resumed run trains on the device,
with the backend and the timeout it was saved with (or that --resume changed). Everything that could differ
between processes (a stop request, a skipped step, the time-budget plan, evaluation losses) goes through
`agree` or `total`, so the ranks never disagree on the number of steps and never wait for each other forever
(`train.dist_timeout` bounds every collective).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist

from tinygpt.config import TrainConfig
from tinygpt.device import resolve_device
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
        torch_dist.all_reduce(t, op=op)
        return t.tolist()

    @property
    def device(self) -> torch.device:
        """Where collectives run: this process's GPU under nccl, else the CPU."""
        nccl = torch_dist.get_backend() == "nccl"
        return torch.device("cuda", self.local_rank) if nccl else torch.device("cpu")

    def agree(self, *flags: bool) -> list[bool]:
        """Each flag true on every process if it is true on any (a stop request, a non-finite step)."""
        return [v > 0 for v in self._reduce([float(f) for f in flags], torch_dist.ReduceOp.MAX)]

    def total(self, *values: float) -> list[float]:
        """The sums over the processes (evaluation losses and their counts)."""
        return self._reduce(list(values), torch_dist.ReduceOp.SUM)

    def gather(self, obj: Any) -> list[Any]:
        """Every process's obj, in rank order, on every process."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        torch_dist.all_gather_object(out, obj)
        return out


SINGLE = Dist()


def from_env() -> Dist:
    """This process's place in the job, from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), or SINGLE
    outside torchrun: the one place that reads them."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in os.environ:
        return SINGLE
    return Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")), "ddp")


def meet(dist: Dist, timeout_s: float) -> torch_dist.Store:
    """The job's key-value store (torchrun's, or one that rank 0 hosts at MASTER_ADDR:MASTER_PORT), where the
    processes meet before their process group exists; its operations wait up to timeout_s seconds."""
    store, _, _ = next(torch_dist.rendezvous("env://", dist.rank, dist.world,
                                             timeout=datetime.timedelta(seconds=timeout_s)))
    return store


def from_main(store: torch_dist.Store, dist: Dist, obj: Any) -> Any:
    """Rank 0's obj (anything JSON can hold), on every process: the others wait for it at the store."""
    # torchrun keeps its store across the restarts of a job (--max-restarts): a key per attempt
    key = f"tinygpt/from_main/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    if dist.main:
        store.set(key, json.dumps(obj))
        return obj
    return json.loads(store.get(key))


def start_group(dist: Dist, cfg: TrainConfig, store: torch_dist.Store) -> None:
    """Start the process group on the store for a run with this config: nccl where it trains on CUDA (see
    train_device), else gloo; cfg.dist_timeout bounds every collective."""
    if not dist.active or torch_dist.is_initialized():
        return
    device = train_device(dist, cfg)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=cfg.dist_timeout)
    store.set_timeout(timeout)
    torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=torch_dist.PrefixStore(
        "default_pg", store), rank=dist.rank, world_size=dist.world, timeout=timeout)


def for_run(dist: Dist, cfg: TrainConfig) -> Dist:
    """dist with the run's parallel mode (a resumed run keeps the one it was saved with), checked."""
    if not dist.active:
        return dist
    if cfg.parallel == "fsdp" and cfg.optimizer == "muon":
        raise UsageError("train.optimizer muon needs each weight matrix whole, which train.parallel fsdp "
                         "shards; use train.parallel ddp with muon, or adamw with fsdp")
    return dataclasses.replace(dist, parallel=cfg.parallel)


def train_device(dist: Dist, cfg: TrainConfig) -> torch.device:
    """Where a run with this config trains: train.device (resolve_device's rule), one GPU per local rank under
    torchrun. The process group's backend follows from it (see start_group)."""
    device = resolve_device(cfg.device)
    return torch.device("cuda", dist.local_rank) if dist.active and device.type == "cuda" else device


def wrap(model: torch.nn.Module, dist: Dist) -> torch.nn.Module:
    """What the training step calls: DDP around the model, or the model sharded in place by FSDP2 (each block,
    then the rest); the model itself where there is one process."""
    if not dist.active:
        return model
    if dist.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        p = next(model.parameters())
        return DistributedDataParallel(model, device_ids=[p.device.index] if p.device.type == "cuda"
                                       else None)
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise UsageError("train.parallel fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard, PyTorch "
                         f"2.6+); this is PyTorch {torch.__version__}: use train.parallel ddp") from None
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    return model


@contextlib.contextmanager
def gradient_sync(wrapped: torch.nn.Module, dist: Dist, sync: bool) -> Iterator[None]:
    """Around one micro-batch's forward and backward: gradients are averaged over the processes only when
    `sync` (the last micro-batch of a step), so accumulation costs one exchange per step, not one per
    micro-batch."""
    if not dist.active or sync:
        yield
    elif dist.parallel == "ddp":
        with wrapped.no_sync():
            yield
    else:
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)


def whole_state(model: GPT, optimizer: Any, dist: Dist) -> tuple[GPT | None, Any]:
    """The model and optimizer state to save, whole: as they are, or under FSDP gathered from the shards
    (every
    process takes part; rank 0 gets them, as a plain model built around the gathered weights)."""
    if dist.parallel != "fsdp" or not dist.active:
        return model, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=whole)
    optim = get_optimizer_state_dict(model, optimizer, options=whole)
    if not dist.main:
        return None, None
    with torch.device("meta"):  # no second copy: the gathered tensors become its parameters
        plain = GPT(model.config)
    # clone: the gathered tensors can be views into a larger buffer, which safetensors refuses to write
    plain.load_state_dict({k: v.clone() for k, v in weights.items()}, assign=True)
    if model.config.tie_weights and model.config.head == "linear":
        plain.lm_head.weight = plain.transformer.wte.weight
    return plain, optim


def load_optimizer_state(model: torch.nn.Module, optimizer: Any, saved: Any, dist: Dist) -> None:
    """Put a saved optimizer state back: whole under FSDP (each process takes its shards of it)."""
    if dist.parallel != "fsdp" or not dist.active:
        optimizer.load_state_dict(saved)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, saved, options=StateDictOptions(full_state_dict=True))


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) value made whole; a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def peer_failure(e: BaseException, dist: Dist) -> TinyGPTError | None:
    """The one-line error for a collective that failed because another process died or stopped answering."""
    if not dist.active or not isinstance(e, RuntimeError | torch_dist.DistError):
        return None
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    return TinyGPTError(f"process {dist.rank} of {dist.world}: another process of the job failed or stopped "
                        f"answering ({first}); resume the job with --resume once every process can run")


def shutdown(dist: Dist) -> None:
    if dist.active and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
