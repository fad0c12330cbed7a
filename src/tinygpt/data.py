"""From text on disk to training batches.

The corpus is tokenized once into flat token files (uint16 when the vocabulary
fits, else uint32) that training reads through numpy memory maps. Token files
and the tokenizer trained for them are cached under ``$TINYGPT_CACHE`` (default
``~/.cache/tinygpt``), keyed by the corpus content and the tokenizer settings,
so a second run on the same text does not tokenize again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tinygpt.config import DataConfig
from tinygpt.errors import TinyGPTError
from tinygpt.tokenizer import Tokenizer, build_tokenizer, load_tokenizer

TEXT_SUFFIXES = (".txt", ".md", ".text", ".rst")
CACHE_VERSION = 1  # bump when the token-file layout or the splitting rule changes


# ---------------------------------------------------------------- reading text

def read_text_file(path: Path) -> str:
    """A UTF-8 text file's content. Refuses binary files and invalid UTF-8 with the byte offset,
    rather than guessing an encoding and training on mojibake."""
    raw = path.read_bytes()
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise TinyGPTError(f"{path} looks like a binary file (NUL byte at offset {nul}); give a UTF-8 text file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise TinyGPTError(f"{path} is not valid UTF-8 (bad byte at offset {e.start}); "
                           "convert it, e.g. `iconv -f latin1 -t utf-8`") from None
    return text


def read_corpus(path: str | Path) -> list[str]:
    """The documents of a text file (one document) or of a folder of text files (one each, sorted by name)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise TinyGPTError(f"data path {p} does not exist")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
        if not files:
            raise TinyGPTError(f"folder {p} has no text files ({', '.join(TEXT_SUFFIXES)})")
    else:
        files = [p]
    docs = [t for t in (read_text_file(f) for f in files) if t.strip()]
    if not docs:
        raise TinyGPTError(f"{p} is empty: there is no text to train on")
    return docs


def split_documents(docs: Sequence[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Split at the character that leaves val_fraction of the corpus as the tail, cutting the
    document the boundary falls in (for one file this is the usual text[:n] / text[n:] split)."""
    total = sum(len(d) for d in docs)
    cut = int(total * (1 - val_fraction))
    train: list[str] = []
    val: list[str] = []
    seen = 0
    for d in docs:
        if seen + len(d) <= cut:
            train.append(d)
        elif seen >= cut:
            val.append(d)
        else:
            train.append(d[: cut - seen])
            val.append(d[cut - seen:])
        seen += len(d)
    return [d for d in train if d], [d for d in val if d]


def encode_documents(tok: Tokenizer, docs: Sequence[str]) -> np.ndarray:
    """Token ids of the documents, separated by end-of-text."""
    ids: list[int] = []
    for i, d in enumerate(docs):
        if i:
            ids.append(tok.eot_id)
        ids.extend(tok.encode(d))
    return np.asarray(ids, dtype=np.uint16 if tok.vocab_size <= 2**16 else np.uint32)


# ---------------------------------------------------------------- the prepared dataset

@dataclass
class Dataset:
    tokenizer: Tokenizer
    train: np.ndarray  # memory-mapped token ids
    val: np.ndarray
    meta: dict
    folder: Path


def cache_root() -> Path:
    return Path(os.environ.get("TINYGPT_CACHE", Path.home() / ".cache" / "tinygpt"))


def _cache_key(cfg: DataConfig, docs: Sequence[str], special_tokens: Sequence[str]) -> str:
    h = hashlib.sha256()
    settings = dict(v=CACHE_VERSION, tokenizer=cfg.tokenizer, specials=list(special_tokens),
                    val_fraction=cfg.val_fraction)
    if cfg.tokenizer in ("bpe", "sentencepiece"):
        settings.update(vocab_size=cfg.vocab_size, sp_model_type=cfg.sp_model_type)
    h.update(json.dumps(settings, sort_keys=True).encode())
    for d in docs:
        h.update(hashlib.sha256(d.encode()).digest())
    return h.hexdigest()


def _write_prepared(dest: Path, tok: Tokenizer, train: np.ndarray, val: np.ndarray, meta: dict) -> None:
    """Write token files and tokenizer into a temporary sibling, then rename: a crash leaves no half cache."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    tok.save(tmp / "tokenizer")
    train.tofile(tmp / "train.bin")
    val.tofile(tmp / "val.bin")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    try:
        tmp.rename(dest)
    except OSError:  # another process finished first; its copy is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)


def load_prepared(folder: Path) -> Dataset:
    meta = json.loads((folder / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    return Dataset(load_tokenizer(folder / "tokenizer"),
                   np.memmap(folder / "train.bin", dtype=dtype, mode="r"),
                   np.memmap(folder / "val.bin", dtype=dtype, mode="r"), meta, folder)


def prepare(cfg: DataConfig, docs: Sequence[str], source: str, special_tokens: Sequence[str] = (),
            log=print) -> Dataset:
    """Tokenize docs into the cache (unless this corpus and tokenizer setting were seen before) and load it."""
    train_docs, val_docs = split_documents(docs, cfg.val_fraction)
    if not train_docs or not val_docs:
        raise TinyGPTError(f"{source} is too short to split into train and val parts")
    key = _cache_key(cfg, docs, special_tokens)
    cached = cache_root() / "data" / key[:24]
    if (cached / "meta.json").exists():
        log(f"data: reusing the tokenized corpus cached in {cached}")
        return load_prepared(cached)
    log(f"data: tokenizing {source} ({sum(map(len, docs)):,} characters) with the {cfg.tokenizer} tokenizer")
    tok = build_tokenizer(cfg.tokenizer, list(docs), vocab_size=cfg.vocab_size, special_tokens=special_tokens,
                          gpt2_ranks=cfg.gpt2_ranks, sp_model_type=cfg.sp_model_type)
    train, val = encode_documents(tok, train_docs), encode_documents(tok, val_docs)
    meta = dict(source=source, key=key, dtype=train.dtype.name, vocab_size=tok.vocab_size,
                tokenizer=tok.kind, train_tokens=len(train), val_tokens=len(val),
                characters=sum(map(len, docs)), val_characters=sum(map(len, val_docs)))
    _write_prepared(cached, tok, train, val, meta)
    return load_prepared(cached)


def copy_to(ds: Dataset, dest: Path) -> Dataset:
    """Give a run its own copy of the prepared data (hard links where possible), so it can be resumed
    and evaluated even after the cache is cleared."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in ds.folder.rglob("*"):
        target = dest / f.relative_to(ds.folder)
        if f.is_dir():
            target.mkdir(exist_ok=True)
            continue
        try:
            os.link(f, target)  # token files are never written again, so sharing the inode is safe
        except OSError:
            shutil.copy2(f, target)
    return load_prepared(dest)


# ---------------------------------------------------------------- batches

def check_length(ds: Dataset, block_size: int) -> None:
    for name, split in (("train", ds.train), ("val", ds.val)):
        if len(split) < block_size + 1:
            raise TinyGPTError(
                f"the {name} split has {len(split)} tokens, shorter than one training window "
                f"({block_size + 1}); give more text or lower --model.block_size")


def windows(tokens: np.ndarray, starts: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets (len(starts), block_size) for windows starting at `starts`."""
    rows = tokens[starts[:, None] + np.arange(block_size + 1)].astype(np.int64)
    t = torch.from_numpy(rows)
    return t[:, :-1], t[:, 1:]


class EpochSampler:
    """Training windows drawn without replacement within an epoch.

    Epoch e cuts the token stream into back-to-back windows starting at a random shift (so
    successive epochs see different boundaries) and visits them in a random order. Both
    come from (seed, epoch), so the position in the data is just (epoch, index) and resuming
    needs nothing else.
    """

    def __init__(self, n_tokens: int, block_size: int, batch_size: int, seed: int):
        self.n_tokens, self.block_size, self.batch_size, self.seed = n_tokens, block_size, batch_size, seed
        self.epoch, self.index = 0, 0
        self._order = self._epoch_starts(0)

    def _epoch_starts(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
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


def eval_starts(n_tokens: int, block_size: int, max_windows: int | None = None) -> np.ndarray:
    """Back-to-back windows over a split (all of them, or max_windows spread evenly): deterministic,
    so successive evaluations are comparable and consume no training randomness."""
    n = (n_tokens - 1) // block_size
    picks = np.arange(n) if max_windows is None or max_windows >= n else np.linspace(0, n - 1, max_windows).astype(np.int64)
    return picks * block_size


def batched(starts: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for i in range(0, len(starts), batch_size):
        yield starts[i: i + batch_size]
