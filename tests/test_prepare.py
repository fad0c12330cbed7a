"""Preparing token files from text and conversations (tinygpt.data.prepare)."""


import numpy as np
import pytest

from conftest import A, S, U, tok_for
from tinygpt.config import DataConfig
from tinygpt.data import batches, packing, prepare, stream
from tinygpt.data.templates import TEMPLATES
from tinygpt.errors import TinyGPTError


def test_prepare_writes_memmaps_and_reuses_the_cache(text_file, tmp_path, monkeypatch):
    cfg = DataConfig(tokenizer="char")
    ds = prepare.prepare_text(cfg, text_file, log=lambda m: None)
    assert isinstance(ds.train.tokens,
                      np.memmap) and ds.train.tokens.dtype == np.uint16 and ds.train.mask is None
    text = text_file.read_text()
    cut = int(len(text) * 0.9)  # the tail of the text is val
    assert ds.tokenizer.decode(ds.train.tokens.tolist()) == text[:cut]
    assert ds.tokenizer.decode(ds.val.tokens.tolist()) == text[cut:]

    def no_retokenizing(*a, **k):
        raise AssertionError("tokenized again despite the cache")
    monkeypatch.setattr(stream, "prepare_corpus", no_retokenizing)
    messages = []
    again = prepare.prepare_text(cfg, text_file, log=messages.append)
    assert "reusing" in messages[0] and np.array_equal(again.train.tokens, ds.train.tokens)
    own = prepare.copy_to(again, tmp_path / "run" / "data")
    assert (tmp_path / "run" / "data" / "train_000000.bin").exists() and np.array_equal(own.val.tokens,
                                                                                        ds.val.tokens)


def test_short_corpus_is_refused(tmp_path):
    cfg = DataConfig(tokenizer="char")
    (tmp_path / "tiny.txt").write_text("just a few words here")
    ds = prepare.prepare_text(cfg, tmp_path / "tiny.txt", log=lambda m: None)
    with pytest.raises(TinyGPTError, match="shorter than one training window"):
        prepare.check_length(ds, block_size=64)
    (tmp_path / "blank.txt").write_text("\n\n")
    with pytest.raises(TinyGPTError, match="is empty"):
        prepare.prepare_text(cfg, tmp_path / "blank.txt", log=lambda m: None)


def packed(tmp_path, pieces, window, pad_id):
    packer = packing.RowPacker(tmp_path, "t", window, pad_id, np.dtype(np.uint16))
    for ids, mask in pieces:
        packer.add(ids, mask)
    packer.close()
    return (np.fromfile(tmp_path / f"t{s}.bin", dtype=np.uint16 if s == "" else np.uint8)
            for s in ("", "_mask", "_segments"))


def test_long_conversations_split_between_exchanges_and_pack_without_crossing_rows(tmp_path):
    template = TEMPLATES["default"]
    tok = tok_for(template)
    conv = [S("be brief")] + [U("what is 2 plus 3?"), A("5")] * 6
    full, _ = template.render(tok, conv)
    window = len(full) // 2
    pieces, cut = packing.conversation_pieces(tok, template, conv, "assistant", window)
    assert cut == 0 and len(pieces) >= 2
    for ids, _ in pieces:
        text = tok.decode(ids)
        assert len(ids) <= window and text.startswith("<|endoftext|><|system|>be brief<|end|><|user|>")
    ids, mask, segs = packed(tmp_path, pieces + pieces[:1], window, tok.eot_id)
    rows = ids.reshape(-1, window)
    # rows start pieces
    assert all(tok.decode(r.tolist()).startswith("<|endoftext|><|system|>") for r in rows)
    assert (segs.reshape(-1, window)[:, 0] == 0).all() and len(segs) == len(ids)
    # padding and separators are not learned
    assert mask.dtype == np.uint8 and mask[ids == tok.eot_id].sum() == 0


def test_a_single_overlong_exchange_is_cut_and_counted():
    template = TEMPLATES["default"]
    tok = tok_for(template)
    pieces, cut = packing.conversation_pieces(tok, template, [U("hello there " * 20), A("5")], "assistant",
                                              30)
    assert cut == 1 and len(pieces[0][0]) == 30


def test_prepare_dialogs_masks_and_keeps_held_out_conversations(tmp_path):
    convs = [[U(f"what is {i} plus 1?"), A(f"{i + 1}")] for i in range(20)]
    ds = prepare.prepare_dialogs(DataConfig(tokenizer="char"), convs, "test", block_size=31,
                                 log=lambda m: None)
    assert ds.packed and len(ds.train.tokens) % 32 == 0 and ds.train.mask is not None
    assert ds.conversations("val") == convs[-2:] and len(ds.conversations("train")) == 18
    x, y, seg = batches.windows(ds.train, np.array([0]), 31)
    assert seg is not None and seg[0, 0] == 0 and seg[0].max() > 0  # several conversations share the row
    targets = ds.tokenizer.decode([t for t in y[0].tolist() if t >= 0])
    assert "plus" not in targets and "<|end|>" in targets
