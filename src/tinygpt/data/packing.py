"""Conversations as training rows: rendered with the chat template, cut between exchanges to fit the
window, and packed into fixed rows of block_size + 1 tokens with loss masks, one row at a time."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO

import numpy as np

from tinygpt.config import DataConfig
from tinygpt.data import workers
from tinygpt.data.dialogs import Conversation, Message, dialog_line
from tinygpt.data.stream import sample_texts, token_dtype
from tinygpt.data.templates import TEMPLATES, ChatTemplate
from tinygpt.errors import TinyGPTError
from tinygpt.tokenizer import Tokenizer, build_tokenizer

Piece = tuple[list[int], list[int]]  # ids, loss mask


def conversation_pieces(tok: Tokenizer, template: ChatTemplate, conv: Conversation, loss_on: str,
                        window: int) -> tuple[list[Piece], int]:
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


def pieces_of(convs: list[Conversation], template: str, loss_on: str,
              window: int) -> list[tuple[list[Piece], int]]:
    """conversation_pieces for a batch of conversations, with the pool's tokenizer (a worker's job)."""
    return [conversation_pieces(workers.tokenizer(), TEMPLATES[template], c, loss_on, window) for c in convs]


class RowPacker:
    """Lays pieces into rows of `window` tokens in order, writing each row once it is full: a piece that
    does not fit in what is left of a row starts the next one, and the gap is padded with pad_id (masked
    out). Segment numbers (the piece's index within its row; padding gets one of its own) keep packed
    pieces from attending to each other."""

    def __init__(self, folder: Path, split: str, window: int, pad_id: int, dtype: np.dtype):
        self.window, self.pad_id, self.dtype = window, pad_id, dtype
        self.files: list[IO[bytes]] = [(folder / f"{split}{s}.bin").open("wb")
                                       for s in ("", "_mask", "_segments")]
        self.ids: list[int] = []
        self.mask: list[int] = []
        self.segs: list[int] = []
        self.tokens = self.targets = 0

    def add(self, ids: Sequence[int], mask: Sequence[int]) -> None:
        used = len(self.ids)
        if used and used + len(ids) > self.window:
            self._pad()
        seg = self.segs[-1] + 1 if self.ids else 0
        self.ids += ids
        self.mask += mask
        self.segs += [seg] * len(ids)
        if len(self.ids) == self.window:
            self._flush()

    def _pad(self) -> None:
        gap = self.window - len(self.ids)
        self.ids += [self.pad_id] * gap
        self.mask += [0] * gap
        self.segs += [self.segs[-1] + 1] * gap
        self._flush()

    def _flush(self) -> None:
        for f, values, dtype in zip(self.files, (self.ids, self.mask, self.segs),
                                    (self.dtype, np.uint8, np.uint8)):
            f.write(np.asarray(values, dtype=dtype).tobytes())
        self.tokens += len(self.ids)
        self.targets += sum(self.mask)
        self.ids, self.mask, self.segs = [], [], []

    def close(self) -> None:
        if self.ids:
            self._pad()
        for f in self.files:
            f.close()


def survey(conversations: Iterator[Conversation], budget: int,
           want_texts: bool) -> tuple[int, int, list[str]]:
    """One pass: how many conversations, their characters, and (want_texts) the message texts a tokenizer
    learns from: all of them, or a seeded sample of `budget` bytes when there are more."""
    n = chars = 0

    def contents() -> Iterator[str]:
        nonlocal n, chars
        for conv in conversations:
            n += 1
            for m in conv:
                chars += len(m.content)
                yield m.content

    texts = sample_texts(contents(), budget) if want_texts else []
    for _ in contents():  # what sampling did not read (all of it without a sample)
        pass
    return n, chars, texts


def write_conversations(folder: Path, d: DataConfig, conversations: Callable[[], Iterator[Conversation]],
                        window: int, tokenizer: Tokenizer | None, log) -> dict:
    """Render, cut and pack the conversations into rows (train: all but the last val_fraction of them, val:
    those), written as they are packed, with the conversations themselves (for evaluation)."""
    template = TEMPLATES[d.chat_template]
    n, chars, texts = survey(conversations(), d.tokenizer_sample, tokenizer is None)
    n_val = max(1, round(n * d.val_fraction))
    if n - n_val < 1:
        raise TinyGPTError(f"{d.path or 'the corpus'} has too few conversations to hold some out for "
                           "validation")
    markup = [part.replace(s, "") for r in template.roles.values() for part in r for s in template.specials]
    # A given tokenizer (a run being finetuned or evaluated) may predate the template: add its markers.
    learn = [t for t in texts + markup + [template.begin, template.end] if t]
    tok = tokenizer.with_specials(template.specials) if tokenizer else build_tokenizer(
        d.tokenizer, learn, vocab_size=d.vocab_size, special_tokens=template.specials,
        gpt2_ranks=d.gpt2_ranks, sp_model_type=d.sp_model_type)
    tok.save(folder / "tokenizer")
    dtype = token_dtype(tok.vocab_size)
    packers = {s: RowPacker(folder, s, window, tok.eot_id, dtype) for s in ("train", "val")}
    dialogs = {s: (folder / f"{s}_dialogs.jsonl").open("w", encoding="utf-8") for s in ("train", "val")}
    seen, cut = {"train": 0, "val": 0}, {"train": 0, "val": 0}
    jobs = ((i, batch, (batch, template.name, d.loss_on, window))
            for i, batch in enumerate(_batches(conversations(), 256)))
    for (_, batch), results in workers.in_order(jobs, pieces_of, tok, folder / "tokenizer",
                                                workers.worker_count(d, chars)):
        for conv, (pieces, n_cut) in zip(batch, results):
            split = "train" if seen["train"] < n - n_val else "val"
            for ids, mask in pieces:
                packers[split].add(ids, mask)
            dialogs[split].write(dialog_line(conv))
            seen[split], cut[split] = seen[split] + 1, cut[split] + n_cut
    meta: dict = dict(packed=True, window=window, chat_template=template.name, loss_on=d.loss_on,
                      vocab_size=tok.vocab_size, tokenizer=tok.kind, dtype=np.dtype(dtype).name)
    for s in ("train", "val"):
        packers[s].close()
        dialogs[s].close()
        meta.update({f"{s}_conversations": seen[s], f"{s}_tokens": packers[s].tokens,
                     f"{s}_target_tokens": packers[s].targets, f"{s}_cut_pieces": cut[s]})
        if cut[s]:
            log(f"data: {cut[s]} {s} exchange(s) longer than the {window}-token window were cut to fit")
    return meta


def _batches(items: Iterator, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
