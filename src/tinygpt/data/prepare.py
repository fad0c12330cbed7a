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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinygpt.config import Config, DataConfig
from tinygpt.data import stream
from tinygpt.data.batches import Split, TokenStream
from tinygpt.data.corpus import builtin_conversations
from tinygpt.data.dialogs import Conversation, Message, detect_format, read_dialogs, write_dialogs
from tinygpt.data.shards import ShardWriter, shard_files, token_blocks, token_inputs
from tinygpt.data.sources import is_dataset_folder
from tinygpt.data.templates import TEMPLATES, ChatTemplate
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


def load_prepared(folder: Path) -> Dataset:
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

    return Dataset(load_tokenizer(folder / "tokenizer"), split("train"), split("val"), meta, folder)


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
    stream.prepare_corpus(cfg, path, dest, log, tokenizer)
    return load_prepared(dest)


def is_text_records(path: Path, fmt: str, field: str) -> bool:
    """Whether JSONL or a dataset folder holds documents (a `field` string per record) rather than
    conversations (a "messages" list)."""
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


def split_conversations(convs: Sequence[Conversation], val_fraction: float) -> tuple[list, list]:
    n_val = max(1, round(len(convs) * val_fraction))
    return list(convs[:-n_val]), list(convs[-n_val:])


def conversation_pieces(tok: Tokenizer, template: ChatTemplate, conv: Conversation, loss_on: str,
                        window: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    """A conversation as (ids, mask) pieces of at most `window` tokens, and how many were cut short.

    A conversation that does not fit is split between exchanges (user turn + replies), each piece
    repeating the system message, so no piece starts mid-turn. Only an exchange that alone exceeds
    the window is cut, keeping its beginning.
    """
    ids, mask = template.render(tok, conv, loss_on)
    if len(ids) <= window:
        return [(ids, mask)], 0
    system = conv[:1] if conv[0].role == "system" else []
    exchanges: list[list[Message]] = []
    for m in conv[len(system):]:
        if m.role != "assistant" or not exchanges:
            exchanges.append([])
        exchanges[-1].append(m)
    groups: list[list[Message]] = []
    for ex in exchanges:
        if groups and len(template.render(tok, system + groups[-1] + ex, loss_on)[0]) <= window:
            groups[-1] += ex
        else:
            groups.append(list(ex))
    pieces = [template.render(tok, system + g, loss_on) for g in groups]
    cut = sum(len(i) > window for i, _ in pieces)
    return [(i[:window], m[:window]) for i, m in pieces], cut


def pack(pieces: Sequence[tuple[list[int], list[int]]], window: int,
         pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lay pieces into rows of `window` tokens in order; a piece that does not fit in what is left of
    a row starts the next one, and the gap is padded with pad_id (masked out). Returns ids, loss mask
    and segment numbers (the piece's index within its row; padding gets one of its own), which keep
    packed pieces from attending to each other."""
    ids: list[int] = []
    mask: list[int] = []
    segs: list[int] = []

    def pad() -> None:
        gap = (-len(ids)) % window
        if gap:
            ids.extend([pad_id] * gap)
            mask.extend([0] * gap)
            segs.extend([segs[-1] + 1] * gap)

    for p_ids, p_mask in pieces:
        used = len(ids) % window
        if used and used + len(p_ids) > window:
            pad()
        seg = segs[-1] + 1 if len(ids) % window else 0
        ids.extend(p_ids)
        mask.extend(p_mask)
        segs.extend([seg] * len(p_ids))
    pad()
    return np.asarray(ids), np.asarray(mask, dtype=np.uint8), np.asarray(segs, dtype=np.uint8)


def prepare_dialogs(cfg: DataConfig, convs: Sequence[Conversation], source: str, block_size: int,
                    log=print, tokenizer: Tokenizer | None = None) -> Dataset:
    """Render conversations with the chat template, pack them into rows of block_size + 1 tokens
    with loss masks, and cache the result (the held-out conversations are kept for evaluation)."""
    template = TEMPLATES[cfg.chat_template]
    train_convs, val_convs = split_conversations(convs, cfg.val_fraction)
    if not train_convs:
        raise TinyGPTError(f"{source} has too few conversations to hold some out for validation")
    window = block_size + 1

    def build(folder: Path) -> dict:
        markup = [part.replace(s, "") for r in template.roles.values() for part in r
                  for s in template.specials]
        texts = [m.content for c in convs for m in c] + markup + [template.begin, template.end]
        # A given tokenizer (a run being finetuned or evaluated) may predate the template: add its markers.
        tok = tokenizer.with_specials(template.specials) if tokenizer else \
            build_tokenizer(cfg.tokenizer, [t for t in texts if t], vocab_size=cfg.vocab_size,
                            special_tokens=template.specials, gpt2_ranks=cfg.gpt2_ranks,
                            sp_model_type=cfg.sp_model_type)
        tok.save(folder / "tokenizer")
        meta: dict = dict(source=source, builtin=source == BUILTIN, packed=True, window=window,
                          chat_template=template.name,
                          loss_on=cfg.loss_on, vocab_size=tok.vocab_size, tokenizer=tok.kind)
        for name, part in (("train", train_convs), ("val", val_convs)):
            pieces, cut = [], 0
            for c in part:
                p, n = conversation_pieces(tok, template, c, cfg.loss_on, window)
                pieces += p
                cut += n
            ids, mask, segments = pack(pieces, window, tok.eot_id)
            ids = ids.astype(stream.token_dtype(tok.vocab_size))
            ids.tofile(folder / f"{name}.bin")
            mask.tofile(folder / f"{name}_mask.bin")
            segments.tofile(folder / f"{name}_segments.bin")
            write_dialogs(folder / f"{name}_dialogs.jsonl", part)
            meta.update({f"{name}_conversations": len(part), f"{name}_tokens": len(ids),
                         f"{name}_target_tokens": int(mask.sum()), f"{name}_cut_pieces": cut,
                         "dtype": ids.dtype.name})
            if cut:
                log(f"data: {cut} {name} exchange(s) longer than the {window}-token window were cut to fit")
        return meta

    key = _cache_key(cfg, [[[m.role, m.content] for m in c] for c in convs], template=template.name,
                     loss_on=cfg.loss_on, window=window, given_tokenizer=tokenizer
                     and tokenizer.fingerprint())
    return _cached(key, f"{source} ({len(convs):,} conversations, {cfg.tokenizer} tokenizer, "
                        f"{template.name} chat template)", build, log)


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
    return prepare_dialogs(d, read_dialogs(d.path, fmt), str(d.path), cfg.model.block_size, log, tokenizer)


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
        stream.prepare_corpus(d, path, tmp, log)
        if tmp != out:
            shutil.rmtree(out)
            tmp.rename(out)
        return load_prepared(out)
    ds = prepare(cfg, log)  # token files and conversations: through the cache, then a copy
    if out.exists():
        shutil.rmtree(out)
    return copy_to(ds, out)
