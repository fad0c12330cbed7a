"""Reading text files and folders (tinygpt.data.files)."""

import pytest

from tinygpt.data import files
from tinygpt.errors import TinyGPTError


def test_read_corpus_refuses_bad_files(tmp_path):
    with pytest.raises(TinyGPTError, match="does not exist"):
        files.read_corpus(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(TinyGPTError, match="is empty"):
        files.read_corpus(tmp_path / "empty.txt")
    (tmp_path / "bin.txt").write_bytes(b"abc\x00\x01\x02")
    with pytest.raises(TinyGPTError, match="binary file \\(NUL byte at offset 3\\)"):
        files.read_corpus(tmp_path / "bin.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(TinyGPTError, match="not valid UTF-8 \\(bad byte at offset 3\\)"):
        files.read_corpus(tmp_path / "latin1.txt")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(TinyGPTError, match="has no text files"):
        files.read_corpus(tmp_path / "folder")


def test_folder_reads_text_files_in_name_order(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.md").write_text("\ufefffirst")  # a BOM is not text
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("third")
    (tmp_path / ".hidden.txt").write_text("skipped")
    assert files.read_corpus(tmp_path) == ["first", "second", "third"]
