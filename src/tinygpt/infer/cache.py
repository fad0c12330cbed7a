"""The KV caches the decode loops keep: keys and values of the tokens seen so far, so a new token's step
reads them instead of recomputing them. GPT takes any object with the model.Cache methods; these are the two
kinds decoding uses, one for rows that decode together (stream_tokens) and one for rows that join and leave
(continuous batching, infer.decoder)."""

from __future__ import annotations

from typing import TypeVar

import torch

from tinygpt.config import ModelConfig
from tinygpt.model import GPT, causal_positions

C = TypeVar("C", bound="KVCache")


class KVCache:
    """Preallocated keys and values for all layers, so decoding a token never reallocates. Every row is at the
    same position: a batch of sequences that started together (see SlotCache for rows that do not)."""

    # Filling a 124M model's cache with zeros took 58 ms per tensor (first touch of 38 MB), longer than a
    # token; this cache never reads a position before writing it, so it is left uninitialised. SlotCache
    # zeroes its own.
    allocate = staticmethod(torch.empty)

    def __init__(self, cfg: ModelConfig, batch_size: int, device: torch.device, dtype: torch.dtype):
        shape = (cfg.n_layer, batch_size, cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head)
        self.k = self.allocate(shape, device=device, dtype=dtype)
        self.v = self.allocate(shape, device=device, dtype=dtype)
        # Each layer's part as a view made once: indexing self.k[layer, :, :, a:b] dispatched four ops per
        # access, and per-op dispatch is what bounds a small model's decode step (bench/generate.py, 10M).
        self.layers = [(self.k[i], self.v[i]) for i in range(cfg.n_layer)]  # unbind's views refuse writes
        self.pos = 0  # tokens already cached; advanced by GPT.hidden after all layers ran

    @classmethod
    def for_model(cls: type[C], model: GPT, rows: int) -> C:
        """A cache of `rows` rows on the model's device, in its weights' dtype."""
        p = model.transformer.wte.weight
        return cls(model.config, rows, p.device, p.dtype)

    def positions(self, T: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Positions (T,) of T new tokens and the keys they may see (see GPT.hidden); refuses to overflow."""
        return causal_positions(self.pos, T, self.k.size(3), device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.layers[layer]
        keys.narrow(2, self.pos, k.size(2)).copy_(k)
        values.narrow(2, self.pos, v.size(2)).copy_(v)
        end = self.pos + k.size(2)
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)

    def advance(self, T: int) -> None:
        self.pos += T


class SlotCache(KVCache):
    """A KV cache whose rows hold unrelated sequences, each at its own length (continuous batching).

    A forward reads and writes the rows in `self.rows`: rows 0..n-1 for a decode step over the n active
    sequences, or a single row to prefill a sequence that joins. Keeping the active sequences in the first
    rows (a leaving sequence's row is refilled by the last one, see move) keeps that a slice, so attention
    reads views of the cache instead of gathering copies of it every layer.
    """

    # A row's keys and values past its length are read (and masked out): they must be finite, as a zero weight
    # times a NaN left in memory is still NaN.
    allocate = staticmethod(torch.zeros)

    def __init__(self, cfg: ModelConfig, slots: int, device: torch.device, dtype: torch.dtype):
        super().__init__(cfg, slots, device, dtype)
        self.lengths = [0] * slots  # tokens cached in each row (a list: reading it never syncs a device)
        self.rows = slice(0, 0)
        # Where this forward writes: positions (n, T), and how many keys it sees.
        self._written: tuple[torch.Tensor, int] | None = None

    def positions(self, T: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        starts = self.lengths[self.rows]
        block = self.k.size(3)
        if len(starts) == 1:  # one sequence: exactly the plain cache's computation
            pos, visible = causal_positions(starts[0], T, block, device)
            self._written = (pos[None], starts[0] + T)
            return pos, visible
        if max(starts) + T > block:
            raise ValueError(f"sequence of {max(starts) + T} tokens exceeds block_size {block}")
        pos = torch.tensor(starts, device=device)[:, None] + torch.arange(T, device=device)  # (n, T)
        end = max(starts) + T
        # Each row's queries see its own keys only: positions up to their own; the rest of the row is stale.
        visible = torch.arange(end, device=device) <= pos[:, :, None]  # (n, T, end)
        self._written = (pos, end)
        return pos, visible[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos, end = self._written
        rows = torch.arange(self.rows.start, self.rows.stop, device=k.device)[:, None]
        self.k[layer, rows, :, pos] = k.transpose(1, 2)  # (n, T) index pairs, each taking (n_head, head_size)
        self.v[layer, rows, :, pos] = v.transpose(1, 2)
        return self.k[layer, self.rows, :, :end], self.v[layer, self.rows, :, :end]

    def advance(self, T: int) -> None:
        for r in range(self.rows.start, self.rows.stop):
            self.lengths[r] += T

    def move(self, src: int, dst: int) -> None:
        """Copy row src's sequence into row dst (a leaving sequence's row, taken by the last active one)."""
        n = self.lengths[src]
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst] = n
