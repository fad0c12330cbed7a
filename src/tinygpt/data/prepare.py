"""From text or conversations on disk to prepared token files.

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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinygpt.config import Config, DataConfig
from tinygpt.data import stream
from tinygpt.data.batches import Split, TokenStream
from tinygpt.data.corpus import builtin_conversations
from tinygpt.data.dialogs import Conversation, detect_format, iter_dialogs, read_dialogs
from tinygpt.data.packing import write_conversations
from tinygpt.data.shards import ShardWriter, shard_files, token_blocks, token_inputs
from tinygpt.data.sources import is_dataset_folder, is_hub_text
from tinygpt.errors import TinyGPTError, UsageError
from tinygpt.rundir import atomic_folder
from tinygpt.tokenizer import Tokenizer, build_tokenizer, load_tokenizer

BUILTIN = "the built-in chat corpus"
CACHE_VERSION = 3  # bump when the token-file layout or the splitting rule changes


# ---------------------------------------------------------------- the prepared dataset

@dataclass
class Dataset:
    tokenizer: Tokenizer
    train: Split
    val: Split
    meta: dict
    folder: Path

    @property
    def packed(self) -> bool:
        """Dialog data is packed into fixed rows of block_size + 1 tokens; text is one stream."""
        return bool(self.meta.get("packed"))

    def conversations(self, split: str) -> list[Conversation]:
        path = self.folder / f"{split}_dialogs.jsonl"
        return read_dialogs(path, "jsonl") if path.exists() else []


def cache_root() -> Path:
    return Path(os.environ.get("TINYGPT_CACHE", Path.home() / ".cache" / "tinygpt"))


def _cache_key(cfg: DataConfig, content: object, **settings) -> str:
    settings.update(v=CACHE_VERSION, tokenizer=cfg.tokenizer, val_fraction=cfg.val_fraction)
    if cfg.tokenizer in ("bpe", "sentencepiece"):
        settings.update(vocab_size=cfg.vocab_size, sp_model_type=cfg.sp_model_type)
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    h.update(json.dumps(content).encode())
    return h.hexdigest()


def load_prepared(folder: Path, tokenizer: Tokenizer | None = None) -> Dataset:
    """The prepared dataset in `folder`; `tokenizer`: the one saved there, where the caller holds it already
    (reading GPT-2's ranks again took a tenth of a second)."""
    meta = json.loads((folder / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])

    def split(name: str) -> Split:
        if "format" in meta:  # shards (stream.py), read as one stream
            parts = [np.memmap(f, dtype=dtype, mode="r") for f in shard_files(folder, name)]
            return Split(parts[0] if len(parts) == 1 else TokenStream(parts))

        def optional(suffix: str) -> np.ndarray | None:
            f = folder / f"{name}_{suffix}.bin"
            return np.memmap(f, dtype=np.uint8, mode="r") if f.exists() else None
        return Split(np.memmap(folder / f"{name}.bin", dtype=dtype, mode="r"), optional("mask"),
                     optional("segments"))

    return Dataset(tokenizer or load_tokenizer(folder / "tokenizer"), split("train"), split("val"), meta,
                   folder)


def _cached(key: str, describe: str, build: Callable[[Path], dict], log) -> Dataset:
    """Load the prepared data for `key` from the cache, or build it there first. The build writes into a
    temporary sibling that is renamed into place, so a crash never leaves half a cache entry; an entry that
    another process finished first is kept."""
    dest = cache_root() / "data" / key[:24]
    if (dest / "meta.json").exists():
        log(f"data: reusing {describe}, cached in {dest}")
        return load_prepared(dest)
    log(f"data: preparing {describe}")
    try:
        with atomic_folder(dest, replace=False) as tmp:
            meta = build(tmp)
            (tmp / "meta.json").write_text(json.dumps(dict(meta, key=key), indent=2))
    except OSError:  # the build failed, or another process's finished copy won the rename
        if not (dest / "meta.json").exists():
            raise
    return load_prepared(dest)


def prepare_text(cfg: DataConfig, path: Path, log=print, tokenizer: Tokenizer | None = None) -> Dataset:
    """A text corpus (file, folder, JSONL, Parquet, dataset folder) tokenized into the cache and loaded. The
    cache key is the files' names, sizes and modification times with the settings, so a corpus is read only
    to be tokenized (a killed preparation continues where it stopped on the next run)."""
    key = _cache_key(cfg, stream.settings_of(cfg, path, tokenizer, ()))
    dest = cache_root() / "data" / key[:24]
    if (dest / "meta.json").exists():
        log(f"data: reusing {path}, prepared in {dest}")
        return load_prepared(dest)
    log(f"data: preparing {path} ({cfg.tokenizer} tokenizer) in {dest}")
    return load_prepared(dest, stream.prepare_corpus(cfg, path, dest, log, tokenizer))


def is_text_records(path: Path, fmt: str, field: str) -> bool:
    """Whether JSONL or a dataset folder holds documents (a `field` string per record) rather than
    conversations (a "messages" list)."""
    if fmt == "hf" and not path.exists():
        return is_hub_text(str(path), field)
    if fmt == "hf" and path.is_dir() and is_dataset_folder(path):
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = next(iter(ds.values()))
        names = ds.column_names
        return field in names and "messages" not in names
    first = path if path.is_file() else min(path.glob("*.jsonl"), default=None) if path.is_dir() else None
    if fmt not in ("jsonl", "dialogs-folder") or first is None or first.suffix != ".jsonl":
        return False
    with first.open("rb") as f:
        line = next((x for x in f if x.strip()), b"{}")
    try:
        record = json.loads(line)
    except ValueError:
        return False
    return isinstance(record, dict) and isinstance(record.get(field), str) and "messages" not in record


def prepared_folder(path: Path, tokenizer: Tokenizer | None, block_size: int) -> Dataset:
    """A folder written by `tinygpt prepare` (or a run's data folder), used as it is."""
    ds = load_prepared(path)
    if ds.packed and block_size + 1 != ds.meta["window"]:
        raise UsageError(f"{path} packs conversations into rows of {ds.meta['window']} tokens: train with "
                         f"--model.block_size {ds.meta['window'] - 1}, or prepare it again")
    if tokenizer is not None and ds.tokenizer.fingerprint() != tokenizer.fingerprint():
        raise TinyGPTError(f"{path} was prepared with another tokenizer than this run's; prepare the corpus "
                           "again from its text (tinygpt eval --data TEXT)")
    return ds


def prepare_tokens(cfg: DataConfig, path: Path, found: dict, log, tokenizer: Tokenizer | None) -> Dataset:
    """Already tokenized data (nanoGPT's train.bin/val.bin, llm.c shards), GPT-2 ids as uint16, copied into
    shards in the cache."""
    if (tokenizer.kind if tokenizer else cfg.tokenizer) != "gpt2":
        raise UsageError(f"{path} holds GPT-2 token ids: give --tokenizer gpt2")
    if not found["val"]:
        raise TinyGPTError(f"{path} has no validation tokens (a val.bin, or a shard with 'val' in its name)")
    files = [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for fs in found.values() for f, _ in fs]

    def build(folder: Path) -> dict:
        tok = tokenizer or build_tokenizer("gpt2", [], gpt2_ranks=cfg.gpt2_ranks)
        tok.save(folder / "tokenizer")
        sizes = {}
        for split, parts in found.items():
            writer = ShardWriter(folder, split, cfg.shard_tokens, np.dtype(np.uint16))
            for f, offset in parts:
                for block in token_blocks(f, offset, np.dtype(np.uint16)):
                    if len(block) and int(block.max()) >= tok.vocab_size:
                        raise TinyGPTError(f"{f} holds id {int(block.max())}, outside GPT-2's "
                                           f"{tok.vocab_size} ids")
                    writer.write(block)
            writer.close()
            sizes.update({f"{split}_tokens": writer.tokens, f"{split}_shards": writer.shards})
        return dict(format=stream.FORMAT, source=str(path), dtype="uint16", vocab_size=tok.vocab_size,
                    tokenizer=tok.kind, **sizes)

    key = _cache_key(cfg, files, tokens=True)
    return _cached(key, f"{path} (GPT-2 token ids)", build, log)


def prepare_dialogs(cfg: DataConfig, convs: Sequence[Conversation] | Callable[[], Iterator[Conversation]],
                    source: str, block_size: int, log=print, tokenizer: Tokenizer | None = None,
                    identity: object = None) -> Dataset:
    """Render conversations with the chat template, pack them into rows of block_size + 1 tokens with loss
    masks, and cache the result (the held-out conversations are kept for evaluation). `convs` is a list or a
    function that starts reading them (streamed: memory holds a batch); `identity` names them in the cache
    key (default: their content, which a list has)."""
    window = block_size + 1
    conversations = convs if callable(convs) else lambda: iter(convs)
    if identity is None:
        identity = [[[m.role, m.content] for m in c] for c in conversations()]

    def build(folder: Path) -> dict:
        meta = write_conversations(folder, cfg, conversations, window, tokenizer, log)
        return dict(source=source, builtin=source == BUILTIN, **meta)

    key = _cache_key(cfg, identity, template=cfg.chat_template, loss_on=cfg.loss_on, window=window,
                     given_tokenizer=tokenizer and tokenizer.fingerprint())
    return _cached(key, f"{source} (conversations, {cfg.tokenizer} tokenizer, {cfg.chat_template} chat "
                        "template)", build, log)


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
            os.link(f, target)  # prepared files are never written again, so sharing the inode is safe
        except OSError:
            shutil.copy2(f, target)
    return load_prepared(dest)


# ---------------------------------------------------------------- preparing a config's data

def prepare(cfg: Config, log=print, tokenizer: Tokenizer | None = None) -> Dataset:
    """The prepared dataset for a config: text or dialogs from cfg.data.path, or the built-in chat corpus.
    With `tokenizer`, encode with it instead of building one (to evaluate a trained run on new data, or to
    finetune it); for conversations it gains the chat template's markers where it lacks them."""
    d = cfg.data
    if d.path is None:
        return prepare_dialogs(d, builtin_conversations(seed=0), BUILTIN, cfg.model.block_size, log,
                               tokenizer)
    path = Path(d.path).expanduser()
    if (path / "meta.json").is_file():
        return prepared_folder(path, tokenizer, cfg.model.block_size)
    if (found := token_inputs(path)) is not None:
        return prepare_tokens(d, path, found, log, tokenizer)
    fmt = detect_format(path) if d.format == "auto" else d.format
    if fmt == "text" or is_text_records(path, fmt, d.text_field):
        return prepare_text(d, path, log=log, tokenizer=tokenizer)
    files = [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(path.rglob("*"))
             if f.is_file()] if path.is_dir() else [[str(path), *_stat(path)]]
    return prepare_dialogs(d, lambda: iter_dialogs(path, fmt), str(d.path), cfg.model.block_size, log,
                           tokenizer, identity=files)


def _stat(path: Path) -> list:
    """A local file's size and modification time; a hub name's nothing (its name is its identity)."""
    return [path.stat().st_size, path.stat().st_mtime_ns] if path.exists() else []


def check_length(ds: Dataset, block_size: int) -> None:
    for name, split in (("train", ds.train), ("val", ds.val)):
        if len(split.tokens) < block_size + 1:
            raise TinyGPTError(
                f"the {name} split has {len(split.tokens)} tokens, shorter than one training window "
                f"({block_size + 1}); give more text or lower --model.block_size")


def prepare_dataset(cfg: Config, out: Path, overwrite: bool = False, log=print) -> Dataset:
    """`tinygpt prepare`: the corpus of cfg.data written to the folder `out`, which `train --data` and
    `eval --data` then take as it is. A killed run of the same command continues (text corpora)."""
    if (out / "meta.json").exists() and not overwrite:
        raise UsageError(f"{out} holds a prepared dataset already; give --overwrite to replace it")
    if out.exists() and not (out / "meta.json").exists() and any(out.iterdir()):
        raise UsageError(f"{out} exists and is not a prepared dataset; choose another --out")
    d = cfg.data
    if d.path is None:
        raise UsageError("give the corpus to prepare: --data PATH")
    path = Path(d.path).expanduser()
    fmt = detect_format(path) if d.format == "auto" else d.format
    if token_inputs(path) is None and (fmt == "text" or is_text_records(path, fmt, d.text_field)):
        tmp = out.with_name(out.name + ".new") if out.exists() else out
        tok = stream.prepare_corpus(d, path, tmp, log)
        if tmp != out:
            shutil.rmtree(out)
            tmp.rename(out)
        return load_prepared(out, tok)
    ds = prepare(cfg, log)  # token files and conversations: through the cache, then a copy
    if out.exists():
        shutil.rmtree(out)
    return copy_to(ds, out)
