"""Reading a corpus as a stream of text pieces, in bounded memory, whatever it is stored as.

A source is a text file or a folder of them (also gzip/xz/zstd-compressed), JSONL with a text field,
Parquet, or a Hugging Face `save_to_disk` folder. Each yields `Piece`s of at most about `chunk_bytes` of text
in reading order; a large file is cut into pieces after a newline between two non-space characters, where
GPT-2-style pre-tokenizers always split, so the cut changes no BPE token (see _line_cut). Every piece
carries its position in the input, counted in bytes of the files on disk, which the validation split uses
without a second pass (see stream.py).
"""

from __future__ import annotations

import gzip
import json
import lzma
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tinygpt.data.files import TEXT_SUFFIXES, visible_files
from tinygpt.errors import TinyGPTError

COMPRESSED = {".gz": "gzip", ".xz": "xz", ".zst": "zstd"}
SPACE = b" \t\r\n\x0b\x0c"


@dataclass
class Piece:
    text: str
    new_doc: bool  # the first piece of a document: an end-of-text id goes before it
    start: int  # position in the input (bytes on disk) where the piece begins
    raw: bytes | None = None  # plain text only: the bytes the text came from, so a split can cut at a byte


class BadInput(TinyGPTError):
    """A document that cannot be read; with --data.on_error skip it is counted and left out."""


def suffixes(extra: str) -> tuple[str, ...]:
    return TEXT_SUFFIXES + tuple(s if s.startswith(".") else f".{s}" for s in extra.split(",") if s)


def _open_bytes(path: Path) -> tuple[IO[bytes], IO[bytes]]:
    """(stream of the file's content, the raw file whose tell() is the position on disk)."""
    raw = path.open("rb")
    kind = COMPRESSED.get(path.suffix.lower())
    if kind == "gzip":
        return gzip.GzipFile(fileobj=raw), raw
    if kind == "xz":
        return lzma.LZMAFile(raw), raw
    if kind == "zstd":
        try:
            import zstandard
        except ImportError:
            raise TinyGPTError(f"{path} is zstd-compressed: `pip install zstandard` (or tinygpt[data]) to "
                               "read it") from None
        return zstandard.ZstdDecompressor().stream_reader(raw), raw
    return raw, raw


def _line_cut(block: bytes) -> int:
    """Where to end a piece within block: after the last newline with a non-space character on each side.
    GPT-2's pre-tokenizer makes such a newline a piece of its own, so cutting there changes no token; a
    newline after spaces is not one (the spaces and the newline of "a  \nb" are two pieces, "a  \n" at the
    end of a text ends in one)."""
    end = len(block)
    while (i := block.rfind(b"\n", 0, end - 1)) >= 0:
        if i > 0 and block[i + 1] not in SPACE and block[i - 1] not in SPACE:
            return i + 1
        end = i + 1
    while end > 1 and block[end - 1] & 0xC0 == 0x80:  # no good line: at least do not cut a character
        end -= 1
    return end - 1 if block[end - 1] >= 0xC0 else end


def _decode(block: bytes, where: str, offset: int) -> str:
    nul = block.find(b"\x00")
    if nul >= 0:
        raise BadInput(f"{where} looks like a binary file (NUL byte at offset {offset + nul}); "
                       "give UTF-8 text")
    try:
        return block.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"{where} is not valid UTF-8 (bad byte at offset {offset + e.start}); convert it, "
                       "e.g. `iconv -f latin1 -t utf-8`") from None


def text_pieces(path: Path, base: int, chunk_bytes: int) -> Iterator[Piece]:
    """A text file (compressed or not) as pieces of about chunk_bytes, cut at line starts."""
    stream, raw = _open_bytes(path)
    plain = stream is raw
    with raw, stream:
        carry, offset, first = b"", 0, True
        # One read ahead: the block before the end is the file's last and is not cut, so a file shorter than
        # a piece is one piece (cutting it at its last line start cost a tenth of a prepare's main process).
        ahead = stream.read(chunk_bytes)  # b"" only at the end (some readers return less before it)
        ahead_read = raw.tell()  # compressed: where a piece starts is told by the bytes read up to its end
        while True:
            data, read = ahead, ahead_read
            ahead = stream.read(chunk_bytes) if data else b""
            ahead_read = raw.tell()
            block = carry + data
            if first and offset == 0 and block.startswith(b"\xef\xbb\xbf"):  # a byte-order mark is not text
                block, offset = block[3:], 3
            cut = _line_cut(block) if ahead else len(block)
            piece, carry = block[:cut], block[cut:]
            text = _decode(piece, str(path), offset)
            if first and not text.strip():  # blank so far: no document yet
                if not ahead:
                    return  # an empty or blank file is no document
                carry = block
                continue
            if piece:
                yield Piece(text, first, base + (offset if plain else read), piece if plain else None)
                first, offset = False, offset + len(piece)
            if not ahead:
                return


def jsonl_pieces(path: Path, base: int, field: str, problems: Problems) -> Iterator[Piece]:
    """One document per line of a JSONL file: the line's `field` string."""
    stream, raw = _open_bytes(path)
    plain = stream is raw
    with raw, stream:
        position = 0
        for number, line in enumerate(stream, 1):
            start = position if plain else raw.tell()
            position += len(line)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                problems.report(f"{path} line {number} is not JSON")
                continue
            text = record.get(field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                problems.report(f"{path} line {number} has no string field {field!r} "
                                "(give --data.text_field)")
                continue
            yield Piece(text, True, base + start)


class Problems:
    """Bad documents: with on_error "error" the first ends the run with its line; with "skip" they are
    counted (and the first one kept to show) and left out."""

    def __init__(self, on_error: str):
        self.on_error, self.skipped, self.first = on_error, 0, ""

    def report(self, message: str) -> None:
        if self.on_error != "skip":
            raise BadInput(message + "; --data.on_error skip leaves such documents out")
        self.skipped += 1
        self.first = self.first or message


def column_pieces(path: Path, base: int, field: str) -> Iterator[Piece]:
    """The `field` column of a Parquet file, one document per row; positions advance with the rows."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if field not in pf.schema_arrow.names:
        raise BadInput(f"{path} has no column {field!r} (it has {', '.join(pf.schema_arrow.names)}); give "
                       "--data.text_field")
    rows, size = max(1, pf.metadata.num_rows), path.stat().st_size
    done = 0
    for batch in pf.iter_batches(columns=[field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str):
                yield Piece(text, True, base + size * done // rows)
            done += 1


def dataset_pieces(path: Path, field: str) -> Iterator[Piece]:
    """A Hugging Face `save_to_disk` folder (its train split, for a DatasetDict)."""
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    if field not in ds.column_names:
        raise BadInput(f"{path} has no column {field!r} (it has {', '.join(ds.column_names)}); give "
                       "--data.text_field")
    size = dataset_size(path)
    rows = max(1, len(ds))
    for i, text in enumerate(ds.select_columns([field]).to_iterable_dataset()):
        yield Piece(text[field], True, size * i // rows)


def dataset_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*.arrow"))


def is_dataset_folder(path: Path) -> bool:
    from tinygpt.data.dialogs import HF_MARKERS

    return any((path / m).is_file() for m in HF_MARKERS)


def _kind(path: Path) -> str:
    """What a file holds, by its suffix under any compression suffix: jsonl, parquet or text."""
    name = path.name.lower()
    for ending in COMPRESSED:
        name = name.removesuffix(ending)
    return "jsonl" if name.endswith(".jsonl") else "parquet" if name.endswith(".parquet") else "text"


def corpus_files(path: Path, text_suffixes: tuple[str, ...]) -> list[Path]:
    """The files of a corpus: the file itself, or a folder's text, JSONL and Parquet files (compressed or
    not), sorted by path, hidden ones skipped."""
    p = path.expanduser()
    if not p.exists():
        raise TinyGPTError(f"data path {p} does not exist")
    if p.is_file():
        return [p]
    wanted = text_suffixes + (".jsonl", ".parquet")

    def readable(f: Path) -> bool:
        name = f.name.lower()
        for ending in COMPRESSED:
            name = name.removesuffix(ending)
        return name.endswith(wanted)

    files = [f for f in visible_files(p) if readable(f)]
    if not files:
        raise TinyGPTError(f"folder {p} has no text files ({', '.join(wanted)}, or those compressed: "
                           f"{', '.join(COMPRESSED)}); --data.suffixes adds others")
    return files


def file_pieces(files: list[Path], d, problems: Problems) -> Iterator[Piece]:
    """The pieces of each file in turn, positions counted across the files. A file that turns out bad is
    left out from there on when problems skips (its pieces read before the fault are kept)."""
    problems.skipped, problems.first = 0, ""  # each pass (tokenizer sample, tokenizing) counts afresh
    base = 0
    for f in files:
        kind = _kind(f)
        if kind == "jsonl":
            reader = jsonl_pieces(f, base, d.text_field, problems)
        elif kind == "parquet":
            reader = column_pieces(f, base, d.text_field)
        else:
            reader = text_pieces(f, base, d.chunk_bytes)
        try:
            yield from reader
        except BadInput as e:
            problems.report(str(e))
        base += f.stat().st_size


def hub_rows(name: str) -> Iterator[dict]:
    """The train split of a Hugging Face Hub dataset, streamed: nothing is downloaded beyond what is read."""
    try:
        import datasets
    except ImportError:
        raise TinyGPTError("streaming a Hugging Face dataset needs `pip install datasets` (or "
                           "tinygpt[data])") from None
    try:
        return iter(datasets.load_dataset(name, split="train", streaming=True))
    except Exception as e:  # offline, no such dataset, a script: the hub client fails in many ways
        raise TinyGPTError(f"could not stream {name} from the Hugging Face Hub ({type(e).__name__}); "
                           "offline, download it with datasets, save_to_disk, and prepare that folder") \
            from None


def is_hub_text(name: str, field: str) -> bool:
    """Whether a Hub dataset holds documents (a `field` string per row) rather than conversations."""
    first = next(hub_rows(name), {})
    return isinstance(first.get(field), str) and "messages" not in first


def hub_pieces(name: str, field: str) -> Iterator[Piece]:
    """A Hub dataset's documents, row by row; their positions are row numbers (its size is unknown)."""
    for i, row in enumerate(hub_rows(name)):
        text = row.get(field)
        if not isinstance(text, str):
            raise BadInput(f"{name} row {i + 1} has no string field {field!r}; give --data.text_field")
        yield Piece(text, True, i)
