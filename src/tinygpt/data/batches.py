"""From prepared token files to training and evaluation batches.

Both the trainer and the evaluator read windows of block_size + 1 tokens through `windows`; which
windows a training step sees is the EpochSampler's business, which an evaluation sees is eval_starts'.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Split:
    tokens: np.ndarray | TokenStream  # memory-mapped token ids
    mask: np.ndarray | None = None  # dialog data: 1 where the token is a training target
    segments: np.ndarray | None = None  # dialog data: which packed piece of its row each token belongs to


class TokenStream:
    """Shard files read as one token stream: windows may span the end of a shard (shards are only cuts of
    one stream, made at a fixed size)."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        self.dtype = parts[0].dtype

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: np.ndarray) -> np.ndarray:
        index = np.asarray(index)
        which = np.searchsorted(self.offsets, index, side="right") - 1
        out = np.empty(index.shape, dtype=self.dtype)
        for k in np.unique(which):
            chosen = which == k
            out[chosen] = self.parts[k][index[chosen] - self.offsets[k]]
        return out


def windows(split: Split, starts: np.ndarray,
            block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Inputs, next-token targets and segment numbers (or None for plain text), each
    (len(starts), block_size), for windows starting at `starts`; targets the mask excludes are -1,
    which the loss ignores."""
    index = starts[:, None] + np.arange(block_size + 1)
    t = torch.from_numpy(split.tokens[index].astype(np.int64))
    # y is a copy, not a view of t: callers mask targets in place (-1), which in a view would also write over
    # the inputs (an embedding index of -1: a crash of a 2-process job's final evaluation found it)
    x, y = t[:, :-1], t[:, 1:].clone()
    if split.mask is not None:
        y = y.masked_fill(torch.from_numpy(split.mask[index[:, 1:]] == 0), -1)
    segments = (None if split.segments is None
                else torch.from_numpy(split.segments[index[:, :-1]].astype(np.int64)))
    return x, y, segments


class EpochSampler:
    """Training windows drawn without replacement within an epoch.

    For text, epoch e cuts the token stream into back-to-back windows starting at a random shift
    (so successive epochs see different boundaries); packed dialog data has fixed rows. The
    windows are visited in a random order. Shift and order come from (seed, epoch), so the
    position in the data is just (epoch, index) and resuming needs nothing else.
    """

    def __init__(self, n_tokens: int, block_size: int, batch_size: int, seed: int, packed: bool = False):
        self.n_tokens, self.block_size, self.batch_size, self.seed = n_tokens, block_size, batch_size, seed
        self.packed = packed
        self.epoch, self.index = 0, 0
        self._order = self._epoch_starts(0)

    def _epoch_starts(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        if self.packed:
            return (self.block_size + 1) * rng.permutation(self.n_tokens // (self.block_size + 1))
        shift = int(rng.integers(self.block_size)) if self.n_tokens > 2 * self.block_size + 1 else 0
        n = (self.n_tokens - 1 - shift) // self.block_size
        return shift + self.block_size * rng.permutation(n)

    @property
    def windows_per_epoch(self) -> int:
        return len(self._order)

    def next_starts(self) -> np.ndarray:
        """Start offsets of the next batch; an epoch's last partial batch is dropped."""
        if self.index + self.batch_size > len(self._order):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._epoch_starts(self.epoch)
        starts = self._order[self.index: self.index + self.batch_size]
        self.index += self.batch_size
        return starts

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._epoch_starts(self.epoch)


def eval_starts(n_tokens: int, block_size: int, max_windows: int | None = None,
                packed: bool = False) -> np.ndarray:
    """Back-to-back windows over a split (all of them, or max_windows spread evenly): deterministic,
    so successive evaluations are comparable and consume no training randomness."""
    stride = block_size + 1 if packed else block_size
    n = (n_tokens - (0 if packed else 1)) // stride
    if max_windows is None or max_windows >= n:
        return np.arange(n) * stride
    return np.linspace(0, n - 1, max_windows).astype(np.int64) * stride


def batched(starts: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for i in range(0, len(starts), batch_size):
        yield starts[i: i + batch_size]
