from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from tinygpt import tokenizer as tok_mod
from tinygpt.errors import TinyGPTError, UsageError
from tinygpt.tokenizer import EOT, Tokenizer, build_tokenizer, load_tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared/data"
RANKS = DATA / "gpt2.tiktoken"
needs_ranks = pytest.mark.skipif(not RANKS.exists(), reason=f"GPT-2 ranks file {RANKS} not present")

WORDS = "the quick brown fox jumps over lazy dog café naïve über tokens model <user> said hello".split()
TRICKY = "Crème brûlée 🍮!\n\n  double  spaces\ttab\r\n日本語 \u2581 <|endoftext|> end  "


def make_corpus(n_docs: int = 60, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        lines = (" ".join(rng.choices(WORDS, k=rng.randint(3, 12))) for _ in range(10))
        docs.append("\n".join(lines))
    return docs


CORPUS = make_corpus()
SPECIALS = ("<|user|>", "<|assistant|>")


@pytest.fixture(scope="module")
def trained() -> dict[str, Tokenizer]:
    toks = {
        "char": build_tokenizer("char", [*CORPUS, TRICKY], special_tokens=SPECIALS),
        "bpe": build_tokenizer("bpe", CORPUS, vocab_size=400, special_tokens=SPECIALS),
        "sp-bpe": build_tokenizer("sentencepiece", CORPUS, vocab_size=400, special_tokens=SPECIALS),
        "sp-unigram": build_tokenizer(
            "sentencepiece", CORPUS, vocab_size=400, special_tokens=SPECIALS, sp_model_type="unigram"
        ),
    }
    if RANKS.exists():
        toks["gpt2"] = build_tokenizer("gpt2", [], special_tokens=SPECIALS, gpt2_ranks=RANKS)
    return toks


KEYS = ["char", "bpe", "sp-bpe", "sp-unigram", pytest.param("gpt2", marks=needs_ranks)]


def test_char_vocab_is_sorted_corpus_characters() -> None:
    tok = build_tokenizer("char", ["hello world\n"])
    assert tok.kind == "char"
    assert tok.encode("hello") == [4, 3, 5, 5, 6]  # alphabet "\n dehlorw"
    assert tok.eot_id == 9 and tok.vocab_size == 10
    assert tok.decode(tok.encode("world hello\n")) == "world hello\n"


def test_char_unknown_characters_are_named() -> None:
    tok = build_tokenizer("char", ["hello"])
    with pytest.raises(TinyGPTError, match=r"'Z', 'é'.*training corpus"):
        tok.encode("hello Zé")


@pytest.mark.parametrize("key", KEYS)
def test_round_trip_and_save_load(trained: dict[str, Tokenizer], key: str, tmp_path: Path) -> None:
    tok = trained[key]
    ids = tok.encode(TRICKY)
    assert tok.decode(ids) == TRICKY
    assert all(0 <= i < tok.vocab_size for i in ids)
    tok.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert type(loaded) is type(tok) and loaded.special_tokens == tok.special_tokens
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.encode(TRICKY) == ids and loaded.decode(ids) == TRICKY
    assert loaded.fingerprint() == tok.fingerprint()
    assert json.loads((tmp_path / "tokenizer.json").read_text())["kind"] == tok.kind


@pytest.mark.parametrize("key", KEYS)
def test_special_tokens(trained: dict[str, Tokenizer], key: str) -> None:
    tok = trained[key]
    specials = tok.special_tokens
    assert list(specials) == [EOT, *SPECIALS]
    assert list(specials.values()) == list(range(tok.vocab_size - 3, tok.vocab_size))
    if key == "gpt2":
        assert tok.eot_id == 50256 and specials["<|user|>"] == 50257
    text = "hi<|endoftext|>there<|user|>"
    plain = tok.encode(text)
    assert not set(plain) & set(specials.values())
    assert tok.decode(plain) == text
    allowed = tok.encode(text, allow_special=True)
    assert allowed == [*tok.encode("hi"), tok.eot_id, *tok.encode("there"), specials["<|user|>"]]
    assert tok.decode(allowed) == text


@pytest.mark.parametrize("key", KEYS)
def test_encode_array_is_encode_as_an_array(trained: dict[str, Tokenizer], key: str) -> None:
    """The array path (tiktoken's own for gpt2) gives encode's ids: specials in the text stay ordinary."""
    tok = trained[key]
    for text in (TRICKY, "hi<|endoftext|>there<|user|>", "", CORPUS[0]):
        ids = tok.encode_array(text, "uint16")
        assert ids.dtype == np.uint16 and ids.tolist() == tok.encode(text)


def test_longest_special_wins_and_eot_is_first() -> None:
    tok = build_tokenizer("char", ["<user>: hi"], special_tokens=["<user>", "<user>:", EOT])
    assert list(tok.special_tokens) == [EOT, "<user>", "<user>:"]
    ids = tok.encode("<user>: hi<user>", allow_special=True)
    assert ids == [tok.special_tokens["<user>:"], *tok.encode(" hi"), tok.special_tokens["<user>"]]


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_vocab_size_is_honoured_and_training_is_deterministic(kind: str) -> None:
    corpus = make_corpus(120, seed=1)
    a = build_tokenizer(kind, corpus, vocab_size=300, special_tokens=SPECIALS)
    b = build_tokenizer(kind, corpus, vocab_size=300, special_tokens=SPECIALS)
    assert 260 <= a.vocab_size <= 300
    assert a.fingerprint() == b.fingerprint()
    assert a.encode(corpus[0]) == b.encode(corpus[0])
    other = build_tokenizer(kind, make_corpus(120, seed=2), vocab_size=300, special_tokens=SPECIALS)
    assert other.fingerprint() != a.fingerprint()


def test_bpe_learns_merges() -> None:
    tok = build_tokenizer("bpe", CORPUS, vocab_size=1000)
    text = "the quick brown fox"
    assert len(tok.encode(text)) < len(text.encode()) / 2


def test_bad_build_arguments() -> None:
    with pytest.raises(UsageError, match="at least 257"):
        build_tokenizer("bpe", CORPUS, vocab_size=200)
    with pytest.raises(UsageError, match="unknown tokenizer kind 'wordpiece'"):
        build_tokenizer("wordpiece", CORPUS)
    with pytest.raises(UsageError, match="model type 'word'"):
        build_tokenizer("sentencepiece", CORPUS, sp_model_type="word")
    with pytest.raises(UsageError, match="empty"):
        build_tokenizer("bpe", ["", ""])
    with pytest.raises(TinyGPTError, match="sentencepiece training failed"):
        build_tokenizer("sentencepiece", ["".join(map(chr, range(0x4E00, 0x4F00)))], vocab_size=300)


def test_decode_rejects_ids_outside_vocab(trained: dict[str, Tokenizer]) -> None:
    tok = trained["char"]
    with pytest.raises(TinyGPTError, match="outside"):
        tok.decode([tok.vocab_size])


@needs_ranks
def test_gpt2_matches_reference_counts(trained: dict[str, Tokenizer]) -> None:
    tok = trained["gpt2"]
    assert tok.encode("Hello world") == [15496, 995]
    text = (Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    split = int(0.9 * len(text))
    assert (len(tok.encode(text[:split])), len(tok.encode(text[split:]))) == (301_966, 36_059)


@needs_ranks
def test_gpt2_ranks_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TINYGPT_GPT2_RANKS", str(RANKS))
    assert build_tokenizer("gpt2", []).encode("Hello world") == [15496, 995]


def test_gpt2_missing_ranks_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nope.tiktoken"
    with pytest.raises(TinyGPTError, match=r"nope\.tiktoken"):
        build_tokenizer("gpt2", [], gpt2_ranks=missing)
    monkeypatch.setenv("TINYGPT_GPT2_RANKS", str(missing))
    with pytest.raises(TinyGPTError, match=r"nope\.tiktoken"):
        build_tokenizer("gpt2", [])
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("not a ranks file\n")
    with pytest.raises(TinyGPTError, match="not a tiktoken ranks file"):
        build_tokenizer("gpt2", [], gpt2_ranks=bad)


def test_gpt2_without_ranks_or_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline() -> dict[str, object]:
        raise ConnectionError("no network")

    monkeypatch.delenv("TINYGPT_GPT2_RANKS", raising=False)
    monkeypatch.setattr(tok_mod.openai_public, "gpt2", offline)
    with pytest.raises(TinyGPTError, match=r"--data\.gpt2_ranks PATH or set TINYGPT_GPT2_RANKS"):
        build_tokenizer("gpt2", [])


def test_load_errors(trained: dict[str, Tokenizer], tmp_path: Path) -> None:
    with pytest.raises(TinyGPTError, match=r"tokenizer\.json is missing"):
        load_tokenizer(tmp_path / "absent")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TinyGPTError, match="corrupt"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"kind": "morse", "special_tokens": {EOT: 0}}))
    with pytest.raises(TinyGPTError, match="unknown tokenizer kind 'morse'"):
        load_tokenizer(tmp_path)
    trained["sp-bpe"].save(tmp_path)
    (tmp_path / "sentencepiece.model").write_bytes(b"garbage")
    with pytest.raises(TinyGPTError, match="corrupt"):
        load_tokenizer(tmp_path)
