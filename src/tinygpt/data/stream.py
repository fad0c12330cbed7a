"""Preparing a text corpus of any size: streamed, tokenized on every core, written to shards as it goes.

Memory does not grow with the corpus: the input is read in pieces (sources.py), at most two pieces per
worker are in flight, and tokens go straight to shard files (shards.py). Two passes at most: trained
tokenizers first read the corpus once for their sample (char: its alphabet), then it is tokenized.

The validation split is the tail of the input, by position in the files on disk (their sizes are known
before reading, so no second pass is needed): plain text is cut at the exact byte (for a single file or a
folder this is the rule tinygpt always had: the last `val_fraction` of the text, the document it falls in
cut in two), while JSONL, Parquet, compressed files and datasets send each whole document to the split
where it starts.

A prepare works in `DIR.partial` and renames it to DIR when done; after each whole shard it notes where the
input stood (progress.json), so running it again after a kill continues from the last whole shard and
writes the same bytes as a run that was never stopped.
"""

from __future__ import annotations

import errno
import heapq
import json
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tinygpt.config import DataConfig
from tinygpt.data import sources, workers
from tinygpt.data.shards import ShardWriter
from tinygpt.errors import TinyGPTError
from tinygpt.rundir import atomic_file
from tinygpt.tokenizer import Tokenizer, build_tokenizer, load_tokenizer

FORMAT = 1  # the prepared-folder layout; meta.json says which
Item = tuple[str, bool, str]  # (split, starts a document, text)


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds every id: shards are read once per epoch, so half the bytes
    count."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


# ---------------------------------------------------------------- the tokenizer

def sample_texts(texts: Iterator[str], budget: int, seed: int = 0) -> list[str]:
    """At most `budget` bytes of the texts, whole ones, each equally likely to be kept (a bottom-k sample by
    a seeded random key, so one pass and bounded memory); kept in reading order. All of them when they are
    fewer than the budget."""
    rng, heap, size = random.Random(seed), [], 0  # heap of (-key, ordinal, text): the largest key on top
    for i, text in enumerate(texts):
        heapq.heappush(heap, (-rng.random(), i, text))
        size += len(text.encode())
        while size > budget and len(heap) > 1:
            size -= len(heapq.heappop(heap)[2].encode())
    return [text for _, _, text in sorted(heap, key=lambda e: e[1])]


def train_tokenizer(d: DataConfig, pieces: Callable[[], Iterator[sources.Piece]],
                    specials: Sequence[str], log) -> Tokenizer:
    """A new tokenizer of kind d.tokenizer for the corpus (gpt2 reads nothing)."""
    texts: list[str] = []
    if d.tokenizer == "char":  # every character of the corpus, streamed
        alphabet: set[str] = set()
        for p in pieces():
            alphabet.update(p.text)
        texts = ["".join(alphabet)]
    elif d.tokenizer != "gpt2":
        log(f"data: training the {d.tokenizer} tokenizer on up to {d.tokenizer_sample / 1e6:,.0f} MB of the "
            "corpus")
        texts = sample_texts((p.text for p in pieces()), d.tokenizer_sample)
    if d.tokenizer != "gpt2" and not any(texts):
        raise TinyGPTError(f"{d.path} is empty: there is no text to train on")
    return build_tokenizer(d.tokenizer, texts, vocab_size=d.vocab_size, special_tokens=specials,
                           gpt2_ranks=d.gpt2_ranks, sp_model_type=d.sp_model_type)


# ---------------------------------------------------------------- routing and tokenizing

def every_nth(d: DataConfig) -> int:
    return max(2, round(1 / d.val_fraction))


def route_every(pieces: Iterator[sources.Piece], every: int) -> Iterator[Item]:
    """For a stream of unknown length (a Hub dataset): every `every`-th document to val, the rest to train."""
    doc = -1
    for p in pieces:
        doc += p.new_doc
        yield "val" if doc % every == every - 1 else "train", p.new_doc, p.text


def route(pieces: Iterator[sources.Piece], cut: int) -> Iterator[Item]:
    """Each piece to train or val: val is everything from position `cut` on; plain text is cut at that byte
    (moved forward to a character boundary)."""
    for p in pieces:
        end = p.start + (len(p.raw) if p.raw is not None else 0)
        if p.start >= cut:
            yield "val", p.new_doc, p.text
        elif p.raw is None or end <= cut:
            yield "train", p.new_doc, p.text
        else:
            k = cut - p.start
            while k < len(p.raw) and p.raw[k] & 0xC0 == 0x80:
                k += 1
            head, tail = p.raw[:k].decode("utf-8"), p.raw[k:].decode("utf-8")
            if head:
                yield "train", p.new_doc, head
            if tail:
                yield "val", p.new_doc and not head, tail


def tasks(items: Iterator[Item], size: int) -> Iterator[list[Item]]:
    """Items grouped into tasks of about `size` characters: what one worker tokenizes at a time."""
    task: list[Item] = []
    chars = 0
    for item in items:
        task.append(item)
        chars += len(item[2])
        if chars >= size:
            yield task
            task, chars = [], 0
    if task:
        yield task


def _encode(texts: list[str], dtype: str) -> list[np.ndarray]:
    tok = workers.tokenizer()
    return [tok.encode_array(text, dtype) for text in texts]


# ---------------------------------------------------------------- writing, and continuing after a kill

class Writing:
    """The token stream's way into the shards: end-of-text ids between documents, the first `skip` ids of
    the task a continued prepare starts in left out (they are in its whole shards already), progress.json
    written after every whole shard."""

    def __init__(self, folder: Path, d: DataConfig, tok: Tokenizer, settings: dict, resume: dict | None,
                 interleaved: bool = False):
        self.folder, self.settings, self.tok, self.eot = folder, settings, tok, np.asarray([tok.eot_id])
        self.resume = resume or {"task": 0, "skip": 0, "started": {"train": False, "val": False},
                                 "splits": {"train": [0, 0], "val": [0, 0]}}
        dtype = token_dtype(tok.vocab_size)
        self.writers = {s: ShardWriter(folder, s, d.shard_tokens, dtype, *self.resume["splits"][s],
                                       on_shard=self._saved) for s in ("train", "val")}
        self.started = dict(self.resume["started"])
        self.task, self.offset, self.started_at_task = 0, 0, dict(self.started)
        # With both splits open at once (a Hub stream), a whole shard of one leaves the other's open shard
        # unsaved: such a prepare is not continued, it starts over.
        self.interleaved = interleaved

    def _saved(self, consumed: int = 0) -> None:
        if self.interleaved:
            return
        state = {"settings": self.settings, "task": self.task, "skip": self.offset + consumed,
                 "started": self.started_at_task,
                 "splits": {s: [w.shards, w.tokens] for s, w in self.writers.items()}}
        with atomic_file(self.folder / "progress.json") as tmp:
            tmp.write_text(json.dumps(state))

    def add(self, t: int, items: list[Item], arrays: list[np.ndarray]) -> None:
        """One tokenized task, in order."""
        self.task, self.offset, self.started_at_task = t, 0, dict(self.started)
        skip = self.resume["skip"] if t == self.resume["task"] else 0
        for (split, new_doc, _), ids in zip(items, arrays):
            if not len(ids):
                continue
            tail_reached = split == "val" and not self.interleaved
            if tail_reached and self.writers["train"].file is not None:  # the tail rule: train is done
                self.writers["train"].close()
                self._saved()
            parts = [self.eot, ids] if new_doc and self.started[split] else [ids]
            self.started[split] = True
            for arr in parts:
                if self.offset + len(arr) <= skip:
                    self.offset += len(arr)
                    continue
                arr = arr[max(0, skip - self.offset):]
                self.offset = max(self.offset, skip)
                self.writers[split].write(arr)
                self.offset += len(arr)

    def close(self) -> dict[str, int]:
        for w in self.writers.values():
            w.close()
        return {f"{s}_{k}": v for s, w in self.writers.items() for k, v in (("tokens", w.tokens),
                                                                              ("shards", w.shards))}


def _continued(partial: Path, settings: dict, log) -> dict | None:
    """What a killed prepare of the same corpus and settings left in `partial`, or None (starting over)."""
    try:
        state = json.loads((partial / "progress.json").read_text())
    except (OSError, ValueError):
        state = None
    if state and state.get("settings") == settings and (partial / "tokenizer").is_dir():
        whole = sum(n for n, _ in state["splits"].values())
        log(f"data: continuing the prepare in {partial} from its {whole} whole shard(s)")
        return state
    if partial.exists():
        log(f"data: starting over: {partial} holds no resumable prepare of these settings")
        shutil.rmtree(partial)
    return None


def corpus(path: Path, d: DataConfig, problems: sources.Problems,
           files: list[Path]) -> tuple[int | None, Callable[[], Iterator]]:
    """(size of the input on disk, None for a Hub stream; a function that starts reading it as pieces).
    `files`: input_files(path, d)."""
    if not path.exists() and d.format == "hf":
        return None, lambda: sources.hub_pieces(str(d.path), d.text_field)
    if path.is_dir() and sources.is_dataset_folder(path):
        return sources.dataset_size(path), lambda: sources.dataset_pieces(path, d.text_field)
    return sum(f.stat().st_size for f in files), lambda: sources.file_pieces(files, d, problems)


def input_files(path: Path, d: DataConfig) -> list[Path]:
    """The files the shards are made from (a dataset folder's too), which settings_of records; [] for a
    Hub stream."""
    if not path.exists() and d.format == "hf":
        return []
    if sources.is_dataset_folder(path):
        return sorted(f for f in path.rglob("*") if f.is_file())
    return sources.corpus_files(path, sources.suffixes(d.suffixes))


def settings_of(d: DataConfig, path: Path, tokenizer: Tokenizer | None, specials: Sequence[str],
                files: list[Path] | None = None) -> dict:
    """Everything the shards depend on: a continued prepare must have the same (`files`: input_files, when
    the caller has them)."""
    keys = ("tokenizer", "vocab_size", "sp_model_type", "val_fraction", "suffixes", "text_field",
            "tokenizer_sample", "on_error", "chunk_bytes", "shard_tokens")
    if not path.exists() and d.format == "hf":  # a Hub name: the name is all there is to compare
        return {"format": FORMAT, **{k: getattr(d, k) for k in keys}, "hub": str(d.path)}
    files = input_files(path, d) if files is None else files
    return {"format": FORMAT, **{k: getattr(d, k) for k in keys}, "specials": list(specials),
            "given_tokenizer": tokenizer.fingerprint() if tokenizer else None,
            "files": [[str(f), st.st_size, st.st_mtime_ns] for f in files for st in [f.stat()]]}


def prepare_corpus(d: DataConfig, path: Path, dest: Path, log, tokenizer: Tokenizer | None = None,
                   specials: Sequence[str] = ()) -> Tokenizer:
    """Tokenize the text corpus at `path` into the prepared folder `dest` (which must not exist yet) and
    return the tokenizer it saved there. With `tokenizer`, encode with it instead of training one."""
    began = time.monotonic()
    problems = sources.Problems(d.on_error)
    files = input_files(path, d)  # listed once: corpus() and settings_of() both need them
    total, pieces = corpus(path, d, problems, files)
    settings = settings_of(d, path, tokenizer, specials, files)
    partial = dest.with_name(dest.name + ".partial")
    resume = _continued(partial, settings, log)
    partial.mkdir(parents=True, exist_ok=True)
    try:
        tok = load_tokenizer(partial / "tokenizer") if resume else \
            tokenizer or train_tokenizer(d, pieces, specials, log)
        if not resume:
            tok.save(partial / "tokenizer")
        writing = Writing(partial, d, tok, settings, resume, interleaved=total is None)
        n_workers = workers.worker_count(d, total)
        documents = _tokenize(writing, pieces, total, d, n_workers)
    except TinyGPTError:  # bad input: mending it changes the settings, so nothing here could be continued
        shutil.rmtree(partial, ignore_errors=True)
        raise
    except OSError as e:  # a kill or a full disk keeps the whole shards for the next run
        if e.errno != errno.ENOSPC:
            raise
        raise TinyGPTError(f"the disk is full ({partial}): the whole shards written so far are kept; free "
                           "space and run the same command again to continue") from None
    sizes = writing.close()
    if not sizes["train_tokens"] or not sizes["val_tokens"]:
        shutil.rmtree(partial)
        if not sizes["train_tokens"] + sizes["val_tokens"]:
            raise TinyGPTError(f"{path} is empty: there is no text to train on")
        raise TinyGPTError(f"{path} is too short to split into train and val parts (val is the last "
                           f"{d.val_fraction:.0%} of the input)")
    meta = dict(format=FORMAT, source=str(path), dtype=token_dtype(tok.vocab_size).name,
                vocab_size=tok.vocab_size, tokenizer=tok.kind, **sizes, **documents, input_bytes=total,
                skipped_documents=problems.skipped, workers=n_workers,
                val_rule="tail" if total is not None else f"every {every_nth(d)}th document",
                seconds=round(time.monotonic() - began, 1))
    (partial / "progress.json").unlink(missing_ok=True)
    (partial / "meta.json").write_text(json.dumps(meta, indent=2))
    partial.rename(dest)
    log(summary(meta, problems))
    return tok


def _tokenize(writing: Writing, pieces: Callable[[], Iterator[sources.Piece]], total: int | None,
              d: DataConfig, n_workers: int) -> dict[str, int]:
    """Read, route, tokenize and write the whole corpus (tasks a continued prepare has written already are
    read and routed but not tokenized), with a progress bar on stderr; returns the document counts."""
    counts = {"train_documents": 0, "val_documents": 0}
    unit = "B" if total is not None else " documents"
    with tqdm(total=total, unit=unit, unit_scale=True, desc="tokenizing", disable=None, leave=False) as bar:
        def watched() -> Iterator[sources.Piece]:
            for p in pieces():
                bar.update(max(0, p.start - bar.n))
                yield p

        def counted() -> Iterator[Item]:
            routed = route_every(watched(), every_nth(d)) if total is None else \
                route(watched(), int(total * (1 - d.val_fraction)))
            for item in routed:
                counts[f"{item[0]}_documents"] += item[1]
                yield item

        start = writing.resume["task"]
        work = ((t, items) for t, items in enumerate(tasks(counted(), d.chunk_bytes)) if t >= start)
        tokenizer_dir, dtype = writing.folder / "tokenizer", writing.writers["train"].dtype.name
        jobs = ((t, items, ([i[2] for i in items], dtype)) for t, items in work)
        for (t, items), arrays in workers.in_order(jobs, _encode, writing.tok, tokenizer_dir, n_workers):
            writing.add(t, items, arrays)
            bar.set_postfix(tokens=f"{sum(w.tokens for w in writing.writers.values()):,}", refresh=False)
    return counts


def summary(meta: dict, problems: sources.Problems) -> str:
    tokens = meta["train_tokens"] + meta["val_tokens"]
    seconds, size = max(meta["seconds"], 1e-3), meta["input_bytes"]
    rate = f"({tokens / max(1, size):.3f} per byte) " if size else ""
    speed = f"{size / 1e6 / seconds:.1f} MB/s, " if size else f"{tokens / seconds:,.0f} tokens/s, "
    line = (f"data: {meta['train_documents'] + meta['val_documents']:,} documents, {tokens:,} tokens {rate}"
            f"in {seconds:.1f} s ({speed}{meta['workers']} worker(s))")
    if problems.skipped:
        line += f"; skipped {problems.skipped} bad document(s), the first: {problems.first}"
    return line
