"""Token shards on disk: writing them one whole file at a time, and taking in already tokenized corpora.

A prepared dataset holds each split as numbered shard files (`train_000000.bin`, ...) of raw token ids (uint16
where the vocabulary fits, else uint32) that training reads through memory maps as one stream. A shard
appears under its name only once it is complete and fsynced, so a killed prepare leaves whole shards and
one `.tmp` file, and can continue from the last whole shard.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from tinygpt.errors import TinyGPTError

LLMC_MAGIC, LLMC_HEADER_INTS = 20240520, 256  # llm.c / modded-nanogpt: 256 int32 header, then uint16 tokens


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


class ShardWriter:
    """Appends token arrays to one split's shards, closing a shard every `size` tokens. `on_shard(consumed)`
    is called after each shard is in place, with how many tokens of the current `write` it took."""

    def __init__(self, folder: Path, split: str, size: int, dtype: np.dtype, shards: int = 0,
                 tokens: int = 0, on_shard: Callable[[int], None] | None = None):
        self.folder, self.split, self.size, self.dtype = folder, split, size, np.dtype(dtype)
        self.shards, self.tokens, self.on_shard = shards, tokens, on_shard
        self.file, self.open_tokens = None, 0

    def write(self, ids: np.ndarray) -> None:
        ids = ids.astype(self.dtype, copy=False)
        done = 0
        while done < len(ids):
            if self.file is None:
                self.file, self.open_tokens = self._tmp().open("wb"), 0
            take = min(len(ids) - done, self.size - self.open_tokens)
            self.file.write(ids[done: done + take].tobytes())
            self.open_tokens, self.tokens, done = self.open_tokens + take, self.tokens + take, done + take
            if self.open_tokens == self.size:
                self.close()
                if self.on_shard:
                    self.on_shard(done)

    def close(self) -> None:
        """Put the open shard in place (a split's last shard is shorter than the others)."""
        if self.file is None:
            return
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self._tmp().rename(self.folder / shard_name(self.split, self.shards))
        self.file, self.shards = None, self.shards + 1

    def _tmp(self) -> Path:
        return self.folder / (shard_name(self.split, self.shards) + ".tmp")


def shard_files(folder: Path, split: str) -> list[Path]:
    return sorted(folder.glob(f"{split}_[0-9][0-9][0-9][0-9][0-9][0-9].bin"))


# ---------------------------------------------------------------- corpora that are already tokens

def token_inputs(path: Path) -> dict[str, list[tuple[Path, int]]] | None:
    """The token files of a nanoGPT folder (train.bin and val.bin, uint16) or of llm.c shards (files whose
    name holds "train" or "val", each with a 256 x int32 header, magic 20240520), as {split: [(file, byte
    offset of the tokens)]}; None when path is neither."""
    if path.is_dir() and (path / "train.bin").is_file() and (path / "val.bin").is_file() \
            and not (path / "meta.json").exists():
        return {"train": [(path / "train.bin", 0)], "val": [(path / "val.bin", 0)]}
    files = sorted(path.glob("*.bin")) if path.is_dir() else [path] if path.suffix == ".bin" else []
    if not any(_magic(f) == LLMC_MAGIC for f in files):  # each file's header is checked below
        return None
    found: dict[str, list[tuple[Path, int]]] = {"train": [], "val": []}
    for f in files:
        split = "val" if "val" in f.name else "train"
        found[split].append((f, _llmc_offset(f)))
    return found


def _magic(path: Path) -> int:
    with path.open("rb") as f:
        head = np.frombuffer(f.read(4), dtype="<i4")
    return int(head[0]) if len(head) else -1


def _llmc_offset(path: Path) -> int:
    """The byte offset of an llm.c shard's tokens, after checking its header against its size."""
    header = np.fromfile(path, dtype="<i4", count=LLMC_HEADER_INTS)
    if len(header) < LLMC_HEADER_INTS or header[0] != LLMC_MAGIC:
        found = int(header[0]) if len(header) else "nothing"
        raise TinyGPTError(f"{path}: shard header has magic {found}, expected {LLMC_MAGIC} (llm.c format)")
    offset = LLMC_HEADER_INTS * 4
    if path.stat().st_size != offset + 2 * int(header[2]):
        raise TinyGPTError(f"{path}: header says {int(header[2]):,} tokens but the file holds "
                           f"{(path.stat().st_size - offset) / 2:,} (truncated or not an llm.c shard)")
    return offset


def token_blocks(path: Path, offset: int, dtype: np.dtype, block: int = 1 << 24) -> Iterator[np.ndarray]:
    """A token file's ids in blocks of `block` tokens (bounded memory), checking its size first."""
    payload = path.stat().st_size - offset
    if payload % dtype.itemsize:
        raise TinyGPTError(f"{path}: {payload:,} bytes of tokens is not a multiple of {dtype.itemsize} "
                           f"({dtype.name}); is it a token file?")
    data = np.memmap(path, dtype=dtype, mode="r", offset=offset) if payload else np.zeros(0, dtype)
    for i in range(0, len(data), block):
        yield np.array(data[i: i + block])
