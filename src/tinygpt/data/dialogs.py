"""Conversations for chat training, read from the formats people have them in.

Every reader returns conversations as lists of ``Message``. Corpora that store only the
utterances (chatterbot, DailyDialog) get alternating roles, user first. All readers keep
only messages with text and conversations with at least one user and one assistant turn.
"""

from __future__ import annotations

import importlib.resources
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from tinygpt.config import yaml_error_line
from tinygpt.data.files import read_text_file, visible_files
from tinygpt.errors import TinyGPTError, UsageError

Role = Literal["system", "user", "assistant"]
ROLES: tuple[Role, ...] = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: str  # one of ROLES
    content: str


Conversation = list[Message]

DIALOG_FORMATS = ("jsonl", "chatterbot", "dailydialog", "hf")
SUFFIX_FORMATS = {".jsonl": "jsonl", ".yml": "chatterbot", ".yaml": "chatterbot"}
HF_MARKERS = ("dataset_dict.json", "dataset_info.json", "state.json")  # what save_to_disk writes
EOU = "__eou__"  # DailyDialog's end-of-utterance marker
SNIFF_BYTES = 4096  # DailyDialog's marker is on every line, the first one too


# ---------------------------------------------------------------- detection

def detect_format(path: str | Path) -> str:
    """The dialog format of a file or folder: one of DIALOG_FORMATS, "dialogs-folder" for a folder
    holding dialog files, or "text" for anything else (including paths that do not exist)."""
    p = Path(path).expanduser()
    if p.is_dir():
        if any((p / m).is_file() for m in HF_MARKERS):
            return "hf"
        return "dialogs-folder" if next(_dialog_files(p), None) else "text"
    if p.suffix.lower() == ".txt" and not p.is_file():
        return "text"
    return _file_format(p)


def _file_format(p: Path) -> str:
    """detect_format for a path known to be a file."""
    if p.suffix.lower() in SUFFIX_FORMATS:
        return SUFFIX_FORMATS[p.suffix.lower()]
    if p.suffix.lower() == ".txt":
        # The marker is on every DailyDialog line, so the head of the file decides. os.read, without a file
        # object: a folder of 13,000 files is sniffed in 0.09 s instead of 0.2, before any worker starts.
        fd = os.open(p, os.O_RDONLY)
        try:
            head = os.read(fd, SNIFF_BYTES)
        finally:
            os.close(fd)
        if EOU.encode() in head:
            return "dailydialog"
    return "text"


def _dialog_files(root: Path) -> Iterator[tuple[Path, str]]:
    """(file, format) for the dialog files below root, sorted by path, hidden ones skipped.
    Lazy, so that detection can stop at the first one without sniffing every .txt file."""
    for f in visible_files(root):
        fmt = _file_format(f)
        if fmt != "text":
            yield f, fmt


# ---------------------------------------------------------------- reading

def read_dialogs(path: str | Path, fmt: str = "auto") -> list[Conversation]:
    """The conversations in a dialog file, a folder of them, or (fmt "hf") a Hugging Face dataset,
    given as a folder saved with save_to_disk or as a hub name. fmt may be what detect_format found."""
    return list(iter_dialogs(path, fmt))


def iter_dialogs(path: str | Path, fmt: str = "auto") -> Iterator[Conversation]:
    """read_dialogs one conversation at a time: JSONL files and datasets are streamed, other files read
    one at a time, so memory holds one file of them at most."""
    if fmt not in ("auto", "dialogs-folder", *DIALOG_FORMATS):
        raise UsageError(f"unknown dialog format {fmt!r}; use auto or one of {', '.join(DIALOG_FORMATS)}")
    if fmt == "hf":
        yield from _read_hf(path)
        return
    p = Path(path).expanduser()
    if not p.exists():
        raise TinyGPTError(f"dialog path {p} does not exist (for a Hugging Face hub dataset pass the format "
                           "hf)")
    if fmt == "auto":
        fmt = detect_format(p)
    if fmt == "hf":
        yield from _read_hf(p)
        return
    if p.is_dir():
        # an explicit format reads only the files of that format
        files = [(f, ff) for f, ff in _dialog_files(p) if fmt in ("dialogs-folder", ff)]
    elif fmt == "text":
        raise TinyGPTError(f"no conversations in {p}: give a .jsonl, .yml/.yaml (chatterbot) or DailyDialog "
                           ".txt file, or name its format")
    else:
        files = [(p, fmt)]
    if not files:
        raise TinyGPTError(f"no conversations in {p}: it has no .jsonl, .yml/.yaml or DailyDialog .txt files")
    for f, ff in files:
        yield from _read_file(f, ff)


def chatterbot_english() -> list[Conversation]:
    """Every conversation of the English chatterbot corpus, by file name, in file order."""
    try:
        english = importlib.resources.files("chatterbot_corpus") / "data" / "english"
    except ModuleNotFoundError:
        raise TinyGPTError("the chatterbot corpus is not installed: `pip install "
                           "chatterbot-corpus`") from None
    # read through importlib.resources rather than as paths, which a zipped install does not have
    files = sorted((f for f in english.iterdir() if f.name.endswith(".yml")), key=lambda f: f.name)
    return [c for f in files for c in _kept(_chatterbot(f.read_text(encoding="utf-8"), f.name), f.name)]


def write_dialogs(path: str | Path, convs: Iterable[Conversation]) -> None:
    """Write conversations as jsonl, the format read_dialogs reads back unchanged."""
    Path(path).write_text("".join(dialog_line(c) for c in convs), encoding="utf-8")


def dialog_line(conv: Conversation) -> str:
    """One conversation as a JSONL line (with its newline), the form read_dialogs reads back unchanged."""
    messages = [{"role": m.role, "content": m.content} for m in conv]
    return json.dumps({"messages": messages}, ensure_ascii=False) + "\n"


def _read_file(path: Path, fmt: str) -> Iterator[Conversation]:
    if fmt == "jsonl":
        return _kept(_jsonl(_lines(path), str(path)), str(path))
    parse = {"chatterbot": _chatterbot, "dailydialog": _dailydialog}[fmt]
    return _kept(parse(read_text_file(path), str(path)), str(path))


def _lines(path: Path) -> Iterator[str]:
    """A UTF-8 file's lines, split at "\n" only (str.splitlines would also split at U+2028, which JSON
    allows inside strings), read as they come, with the checks of read_text_file."""
    with path.open("rb") as f:
        offset = 0
        for n, raw in enumerate(f):
            if n == 0 and raw.startswith(b"\xef\xbb\xbf"):
                raw, offset = raw[3:], 3
            if (nul := raw.find(b"\x00")) >= 0:
                raise TinyGPTError(f"{path} looks like a binary file (NUL byte at offset {offset + nul}); "
                                   "give a UTF-8 text file")
            try:
                yield raw.decode("utf-8").removesuffix("\n")
            except UnicodeDecodeError as e:
                raise TinyGPTError(f"{path} is not valid UTF-8 (bad byte at offset {offset + e.start}); "
                                   "convert it, e.g. `iconv -f latin1 -t utf-8`") from None
            offset += len(raw)


def _kept(convs: Iterable[Conversation], where: str) -> Iterator[Conversation]:
    """The conversations worth training on, with empty messages dropped; refuses a source with none."""
    kept = 0
    for conv in convs:
        conv = [m for m in conv if m.content.strip()]
        if {"user", "assistant"} <= {m.role for m in conv}:
            kept += 1
            yield conv
    if not kept:
        raise TinyGPTError(f"no conversations in {where}: each needs at least one user and one assistant "
                           "message")


def _alternating(turns: Iterable[Any]) -> Conversation:
    """user, assistant, user, ... for corpora that store only the utterances."""
    texts = [t for t in (str(t).strip() for t in turns if t is not None) if t]
    return [Message("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(texts)]


def _messages(raw: Any, where: str) -> Conversation:
    """A ``[{"role": ..., "content": ...}, ...]`` list, checked strictly: a typo in a role
    would otherwise silently train the model on the wrong speaker."""
    if not isinstance(raw, list):
        raise TinyGPTError(f'{where}: no "messages" list; write {{"messages": [{{"role": "user", "content": '
                           f'"..."}}, ...]}}')
    conv = []
    for i, m in enumerate(raw, 1):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise TinyGPTError(f'{where}: message {i} needs a "role" and a "content"')
        if m["role"] not in ROLES:
            raise TinyGPTError(f"{where}: message {i} has unknown role {m['role']!r}; use one of "
                               f"{', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise TinyGPTError(f"{where}: message {i} content is a {type(m['content']).__name__}; it must be "
                               "a string")
        conv.append(Message(m["role"], m["content"]))
    return conv


def _jsonl(lines: Iterable[str], where: str) -> Iterator[Conversation]:
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TinyGPTError(f"{where} line {n}: invalid JSON ({e.msg} at column {e.colno}); "
                               "each line must be one JSON object") from None
        yield _messages(obj.get("messages") if isinstance(obj, dict) else None, f"{where} line {n}")


def _chatterbot(text: str, where: str) -> Iterator[Conversation]:
    try:
        # BaseLoader keeps every scalar as its text: safe_load would turn "yes" into True and "12:30" into 750
        doc = yaml.load(text, Loader=yaml.BaseLoader)
    except yaml.YAMLError as e:
        line = yaml_error_line(e)
        at = f" line {line}" if line else ""
        raise TinyGPTError(f"{where}{at}: invalid YAML ({getattr(e, 'problem', None) or e}); fix the "
                           "file") from None
    convs = doc.get("conversations") if isinstance(doc, dict) else None
    if not isinstance(convs, list):
        raise TinyGPTError(f"{where}: no `conversations:` list; a chatterbot file lists conversations as "
                           "lists of turns")
    for i, conv in enumerate(convs, 1):
        # a lone string (trivia.yml has one) is a lone turn
        turns = conv if isinstance(conv, list) else [conv]
        if any(isinstance(t, (list, dict)) for t in turns):
            raise TinyGPTError(f"{where}: conversation {i} is not a list of texts")
        yield _alternating(turns)


def _dailydialog(text: str, where: str) -> Iterator[Conversation]:
    # text is kept as is, spaces before punctuation included: changing it is the tokenizer's business
    for line in text.split("\n"):
        yield _alternating(line.split(EOU))


# ---------------------------------------------------------------- Hugging Face datasets

def _read_hf(source: str | Path) -> Iterator[Conversation]:
    try:
        import datasets  # optional dependency, only needed here
    except ImportError:
        raise TinyGPTError("reading Hugging Face datasets needs the datasets package: `pip install "
                           "datasets`") from None
    local = Path(source).expanduser()
    if local.exists():
        try:
            ds = datasets.load_from_disk(str(local))
        except (FileNotFoundError, ValueError) as e:
            raise TinyGPTError(f"{local} is not a dataset saved with save_to_disk ({e})") from None
    else:
        try:
            ds = datasets.load_dataset(str(source))
        # the hub client fails in many ways (offline, not found, scripts); all mean the same here
        except Exception as e:
            raise TinyGPTError(f"could not load {source} from the Hugging Face hub ({type(e).__name__}): the "
                               "hub could not be reached or has no such dataset; pass a local folder saved "
                               "with save_to_disk") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    yield from _kept(_hf_conversations(ds, str(source)), str(source))


def _hf_conversations(ds: Any, where: str) -> Iterator[Conversation]:
    cols = ds.column_names
    if "messages" in cols:
        for i, (msgs,) in enumerate(_rows(ds, ["messages"]), 1):
            yield _messages(msgs, f"{where} row {i}")
    elif "dialog" in cols:
        for (turns,) in _rows(ds, ["dialog"]):
            yield _alternating(turns)
    elif "context" in cols and "response" in cols:
        for context, response in _rows(ds, ["context", "response"]):
            yield [Message("user", str(context or "")), Message("assistant", str(response or ""))]
    else:
        raise TinyGPTError(f"{where} has columns {', '.join(cols)}; supported are messages, dialog, "
                           "or context with response")


def _rows(ds: Any, columns: list[str]) -> Iterator[tuple]:
    """A dataset's rows, a thousand at a time: indexing a column would hold all of it in memory."""
    for batch in ds.select_columns(columns).iter(batch_size=1000):
        yield from zip(*(batch[c] for c in columns))
