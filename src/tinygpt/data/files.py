"""Reading files from disk: the one place that decides what counts as text and which files a folder holds.

Both the corpus reader (sources) and the dialog readers (dialogs) start here, so neither imports the other.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from tinygpt.errors import TinyGPTError

TEXT_SUFFIXES = (".txt", ".md", ".text", ".rst")


def visible_files(root: Path) -> Iterator[Path]:
    """The files below root, sorted by path, skipping hidden files and anything inside hidden folders."""
    return iter(sorted(f for f in root.rglob("*") if f.is_file()
                       and not any(part.startswith(".") for part in f.relative_to(root).parts)))


def read_text_file(path: Path) -> str:
    """A UTF-8 text file's content. Refuses binary files and invalid UTF-8 with the byte offset,
    rather than guessing an encoding and training on mojibake."""
    raw = path.read_bytes()
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise TinyGPTError(f"{path} looks like a binary file (NUL byte at offset {nul}); give a UTF-8 text "
                           "file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise TinyGPTError(f"{path} is not valid UTF-8 (bad byte at offset {e.start}); "
                           "convert it, e.g. `iconv -f latin1 -t utf-8`") from None
    return text
