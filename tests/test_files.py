"""Reading text files and folders (tinygpt.data.files, tinygpt.data.sources)."""

import pytest

from tinygpt.config import DataConfig
from tinygpt.data import sources
from tinygpt.errors import TinyGPTError


def read(path, **settings):
    d = DataConfig(**settings)
    files = sources.corpus_files(path, sources.suffixes(d.suffixes))
    return [p.text for p in sources.file_pieces(files, d, sources.Problems(d.on_error))]


def test_bad_files_are_refused_with_their_offset(tmp_path):
    with pytest.raises(TinyGPTError, match="does not exist"):
        read(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    assert read(tmp_path / "empty.txt") == []  # no document: prepare then says the corpus is too short
    (tmp_path / "bin.txt").write_bytes(b"abc\x00\x01\x02")
    with pytest.raises(TinyGPTError, match="binary file \\(NUL byte at offset 3\\)"):
        read(tmp_path / "bin.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(TinyGPTError, match="not valid UTF-8 \\(bad byte at offset 3\\)"):
        read(tmp_path / "latin1.txt")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(TinyGPTError, match="has no text files"):
        read(tmp_path / "folder")


def test_folder_reads_text_files_in_name_order(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.md").write_text("\ufefffirst")  # a BOM is not text
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("third")
    (tmp_path / "code.py").write_text("print(4)")
    (tmp_path / ".hidden.txt").write_text("skipped")
    assert read(tmp_path) == ["first", "second", "third"]
    assert read(tmp_path, suffixes=".py") == ["first", "second", "print(4)", "third"]


def test_a_large_file_is_read_in_pieces_cut_at_line_starts(tmp_path):
    text = "".join(f"line {i} caf\u00e9\n  indented {i}\n" for i in range(500))
    (tmp_path / "big.txt").write_text(text)
    pieces = read(tmp_path / "big.txt", chunk_bytes=1000)
    assert "".join(pieces) == text and len(pieces) > 10
    assert all(p.startswith("line ") for p in pieces)  # never before a space: BPE pre-tokenizers split there


def test_bad_documents_are_skipped_and_counted_on_request(tmp_path):
    (tmp_path / "a.txt").write_text("good text")
    (tmp_path / "b.txt").write_bytes(b"\x00binary")
    (tmp_path / "c.jsonl").write_text('{"text": "one"}\nnot json\n{"body": "x"}\n{"text": "two"}\n')
    with pytest.raises(TinyGPTError, match=r"b.txt looks like a binary file .*--data.on_error skip"):
        read(tmp_path)
    d = DataConfig(on_error="skip")
    problems = sources.Problems("skip")
    files = sources.corpus_files(tmp_path, sources.suffixes(""))
    texts = [p.text for p in sources.file_pieces(files, d, problems)]
    assert texts == ["good text", "one", "two"] and problems.skipped == 3
    with pytest.raises(TinyGPTError, match=r"c.jsonl line 2 is not JSON"):
        read(tmp_path / "c.jsonl")
    (tmp_path / "d.jsonl").write_text('{"text": "one"}\n{"body": "x"}\n')
    with pytest.raises(TinyGPTError, match=r"d.jsonl line 2 has no string field 'text'"):
        read(tmp_path / "d.jsonl")


def test_a_byte_order_mark_is_dropped_from_a_file_of_many_pieces(tmp_path):
    text = "".join(f"line {i}\n" for i in range(2000))
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + text.encode())
    pieces = read(tmp_path / "bom.txt", chunk_bytes=500)
    assert "".join(pieces) == text and len(pieces) > 5
