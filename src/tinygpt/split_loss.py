"""The next-token loss summed over a split's windows, and the figures it gives: loss, perplexity, bits per
byte.

Training's evaluations, `tinygpt eval` and `--dtype auto`'s quality check all measure a model this way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from tinygpt.data.batches import Split, eval_starts, windows
from tinygpt.device import autocast
from tinygpt.model import GPT, eval_mode
from tinygpt.tokenizer import Tokenizer


@dataclass
class LossSum:
    nats: float = 0.0
    targets: int = 0
    bytes: int = 0

    def __iadd__(self, other: LossSum) -> LossSum:
        self.nats, self.targets = self.nats + other.nats, self.targets + other.targets
        self.bytes += other.bytes
        return self

    @property
    def loss(self) -> float:
        return self.nats / max(self.targets, 1)


@torch.no_grad()
def loss_over(model: GPT, split: Split, batch_size: int, device: torch.device,
              dtype: torch.dtype | None = None, max_windows: int | None = None, packed: bool = False,
              tokenizer: Tokenizer | None = None, shard: tuple[int, int] = (0, 1)) -> LossSum:
    """Summed next-token loss over deterministic windows of a split (all of them when max_windows is None).
    With a tokenizer, also the UTF-8 bytes of the target text, for bits per byte (special tokens count 0).

    shard (rank, world): this process's share of the windows, for sums that the caller adds up over the
    processes. Every share runs the same number of forward passes (the short ones repeat a window and score
    none of it), as a sharded (FSDP) model needs every process at every forward."""
    block_size = model.config.block_size
    specials = set(tokenizer.special_tokens.values()) if tokenizer else set()
    starts, real = shard_windows(eval_starts(len(split.tokens), block_size, max_windows, packed), *shard)
    out = LossSum()
    with eval_mode(model):
        for first in range(0, len(starts), batch_size):
            x, y, seg = windows(split, starts[first:first + batch_size], block_size)
            y[max(0, real - first):] = -1  # the padding windows of a short share
            n = int((y >= 0).sum())
            if not n and shard[1] == 1:
                continue
            with autocast(device, dtype):
                _, loss = model(x.to(device), y.to(device), segments=None if seg is None else seg.to(device))
            out.nats += loss.item() * n
            out.targets += n
            if tokenizer is not None:
                for row in y.tolist():
                    text = tokenizer.decode([t for t in row if t >= 0 and t not in specials])
                    out.bytes += len(text.encode())
    return out


def shard_windows(starts: np.ndarray, rank: int, world: int) -> tuple[np.ndarray, int]:
    """Rank's consecutive share of the windows, padded to the longest share's length with copies of the first
    window, and how many of them are its own."""
    per = -(-len(starts) // world)
    mine = starts[rank * per:(rank + 1) * per]
    return np.concatenate([mine, np.repeat(starts[:1], per - len(mine))]), len(mine)


def loss_metrics(s: LossSum) -> dict[str, float]:
    return {"val_loss": s.loss, "perplexity": math.exp(s.loss),
            "bits_per_byte": s.nats / math.log(2) / max(s.bytes, 1), "target_tokens": s.targets}
