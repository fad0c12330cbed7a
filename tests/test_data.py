import numpy as np
import pytest

from tinygpt.config import DataConfig
from tinygpt.data import batches, files, prepare
from tinygpt.errors import TinyGPTError
from tinygpt.tokenizer import build_tokenizer


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


def test_split_takes_the_tail_as_val():
    assert prepare.split_documents(["abcdefghij"], 0.1) == (["abcdefghi"], ["j"])
    train, val = prepare.split_documents(["aaaa", "bbbb", "cc"], 0.3)  # 10 chars, cut at 7
    assert train == ["aaaa", "bbb"] and val == ["b", "cc"]


def test_documents_are_joined_by_end_of_text():
    tok = build_tokenizer("char", ["ab"])
    ids = prepare.encode_documents(tok, ["ab", "ba"])
    assert ids.dtype == np.uint16
    assert ids.tolist() == [0, 1, tok.eot_id, 1, 0]


def test_prepare_writes_memmaps_and_reuses_the_cache(text_file, tmp_path, monkeypatch):
    cfg = DataConfig(tokenizer="char")
    docs = files.read_corpus(text_file)
    ds = prepare.prepare_text(cfg, docs, str(text_file), log=lambda m: None)
    assert isinstance(ds.train.tokens, np.memmap) and ds.train.tokens.dtype == np.uint16 and ds.train.mask is None
    text = docs[0]
    cut = int(len(text) * 0.9)
    assert ds.tokenizer.decode(ds.train.tokens.tolist()) == text[:cut]
    assert ds.tokenizer.decode(ds.val.tokens.tolist()) == text[cut:]

    def no_retokenizing(*a, **k):
        raise AssertionError("tokenized again despite the cache")
    monkeypatch.setattr(prepare, "build_tokenizer", no_retokenizing)
    messages = []
    again = prepare.prepare_text(cfg, docs, str(text_file), log=messages.append)
    assert "reusing" in messages[0] and np.array_equal(again.train.tokens, ds.train.tokens)
    own = prepare.copy_to(again, tmp_path / "run" / "data")
    assert (tmp_path / "run" / "data" / "train.bin").exists() and np.array_equal(own.val.tokens, ds.val.tokens)


def test_short_corpus_is_refused(tmp_path):
    cfg = DataConfig(tokenizer="char")
    ds = prepare.prepare_text(cfg, ["just a few words here"], "tiny.txt", log=lambda m: None)
    with pytest.raises(TinyGPTError, match="shorter than one training window"):
        prepare.check_length(ds, block_size=64)


def test_sampler_visits_each_window_once_per_epoch_and_resumes():
    sampler = batches.EpochSampler(n_tokens=1000, block_size=10, batch_size=7, seed=3)
    per_epoch = sampler.windows_per_epoch
    seen = np.concatenate([sampler.next_starts() for _ in range(per_epoch // 7)])
    assert len(set(seen.tolist())) == len(seen)  # without replacement
    assert len(np.unique(seen % 10)) == 1  # one shift per epoch: back-to-back windows
    state = sampler.state_dict()
    expected = [sampler.next_starts() for _ in range(30)]  # crosses into later epochs
    assert sampler.epoch >= 2
    again = batches.EpochSampler(n_tokens=1000, block_size=10, batch_size=7, seed=3)
    again.load_state_dict(state)
    assert all(np.array_equal(a, b) for a, b in zip(expected, [again.next_starts() for _ in range(30)]))
    other_seed = batches.EpochSampler(n_tokens=1000, block_size=10, batch_size=7, seed=4)
    assert not np.array_equal(other_seed.next_starts(), batches.EpochSampler(1000, 10, 7, 3).next_starts())


def test_windows_are_shifted_targets():
    tokens = np.arange(100, dtype=np.uint16)
    x, y, seg = batches.windows(batches.Split(tokens), np.array([0, 50]), 8)
    assert seg is None
    assert x[1].tolist() == list(range(50, 58)) and y[1].tolist() == list(range(51, 59))
    mask = (np.arange(100) % 2).astype(np.uint8)  # only odd tokens are targets
    _, y, _ = batches.windows(batches.Split(tokens, mask), np.array([10]), 4)
    assert y[0].tolist() == [11, -1, 13, -1]


def test_eval_windows_cover_the_split_or_spread_evenly():
    assert batches.eval_starts(101, 10).tolist() == list(range(0, 100, 10))
    picks = batches.eval_starts(1001, 10, max_windows=3)
    assert picks.tolist() == [0, 490, 990]
