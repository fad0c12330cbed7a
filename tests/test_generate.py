"""Text streaming (tinygpt.infer.generate): pieces are whole UTF-8 characters, and generate() keeps its settings local."""

import torch

from tinygpt.config import ModelConfig, SampleConfig
from tinygpt.infer import generate
from tinygpt.model import GPT
from tinygpt.tokenizer import build_tokenizer


def test_stream_text_waits_for_the_rest_of_a_utf8_character(monkeypatch):
    tok = build_tokenizer("bpe", ["plain ascii text, ok"] * 20, vocab_size=300)
    snowman = tok.encode("\u2603")
    assert len(snowman) == 3  # never seen in training: its three UTF-8 bytes are three tokens
    sequence = snowman + tok.encode(" ok")
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=tok.vocab_size))

    def scripted(model, idx, sampling, stop_ids=(), generator=None, use_cache=True):
        for t in sequence:
            yield torch.tensor([t])
    monkeypatch.setattr(generate, "stream_tokens", scripted)
    pieces = list(generate.stream_text(model, tok, [tok.eot_id], SampleConfig(max_new_tokens=len(sequence))))
    assert "".join(pieces) == "\u2603 ok"
    assert all("\ufffd" not in p for p in pieces) and pieces[0].startswith("\u2603")


def test_text_pieces_end_where_a_stop_string_begins_and_never_show_part_of_one():
    tok = build_tokenizer("char", ["abc END xyz, some text"])
    text = generate.TextPieces(tok, stop_strings=["END", "zz"])
    shown = [text.push(tok.encode(c)) for c in "abc EN"]
    assert "".join(shown) == "abc " and not text.stopped  # "EN" may be the start of "END": held back
    assert text.push(tok.encode("D xyz")) == "" and text.stopped  # the stop string and all after it: never shown
    assert text.finish() == "" and text.shown == "abc "
    other = generate.TextPieces(tok, stop_strings=["END"])
    assert other.push(tok.encode("ab E")) == "ab " and other.push(tok.encode("x")) == "Ex"  # not a stop after all
    assert other.finish() == ""


def test_text_pieces_strip_a_replys_outer_whitespace():
    tok = build_tokenizer("char", ["  hi there \n"])
    text = generate.TextPieces(tok, strip=True)
    pieces = [text.push(tok.encode(c)) for c in "  hi there \n"] + [text.finish()]
    assert "".join(pieces) == "hi there" and pieces[:3] == ["", "", "h"]
