"""tinygpt tokenizers as Hugging Face tokenizer.json and as GGUF vocabularies
(src/tinygpt/export/vocab.py)."""

from __future__ import annotations

import random
from pathlib import Path

import gguf
import pytest
import regex
import transformers

from conftest import SHARED_DATA
from tinygpt.errors import TinyGPTError
from tinygpt.export.vocab import GGUFVocab, TokenType, gguf_vocab, hf_tokenizer, write_vocab
from tinygpt.tokenizer import EOT, GPT2Tokenizer, Tokenizer, build_tokenizer

RANKS = SHARED_DATA / "gpt2.tiktoken"
SPECIALS = ["<|user|>", "<|assistant|>", "<|end|>"]
SAMPLES = [
    "12345 and 3.14",
    "runs  of   spaces    here ",
    "lines\nand\n\nblank\n\n\n",
    "\ttabs\t\tand\r\nCRLF",
    "café naïve über",
    "an emoji 🍮 and 🍕!",
    "<|user|>hello<|end|><|assistant|> hi there <|end|>" + EOT,
    "aaaaaaa ------- ======= !!!",
    "  leading and trailing  ",
    "<|user|",  # half a special is ordinary text
]
WORDS = ("the quick brown fox jumps over lazy dog café naïve über model said hello 12345 3.14 ---- "
         "aaaa !!").split()
NEEDS_RANKS = pytest.mark.skipif(not RANKS.exists(), reason=f"GPT-2 ranks file {RANKS} not present")
KINDS = ["char", "bpe", "sentencepiece", pytest.param("gpt2", marks=NEEDS_RANKS)]


def _corpus() -> list[str]:
    rng = random.Random(0)
    return ["\n".join(" ".join(rng.choices(WORDS, k=rng.randint(3, 12))) for _ in range(10))
            for _ in range(60)]


CORPUS = _corpus()


def _fuzz(n: int, seed: int) -> list[str]:
    """Random mixes of the corpus words, whitespace runs, digits, accents, an emoji and the specials."""
    rng = random.Random(seed)
    bits = [*WORDS, " ", "  ", "\n", "\t", "7", "42", "é", "🍮", ".", *SPECIALS, EOT]
    return ["".join(rng.choices(bits, k=rng.randint(1, 30))) for _ in range(n)]


TEXTS = SAMPLES + _fuzz(100, seed=1)


@pytest.fixture(scope="module")
def toks() -> dict[str, Tokenizer]:
    built = {
        "char": build_tokenizer("char", CORPUS + TEXTS, special_tokens=SPECIALS),
        "bpe": build_tokenizer("bpe", CORPUS, vocab_size=400, special_tokens=SPECIALS),
        "sentencepiece": build_tokenizer("sentencepiece", CORPUS, vocab_size=400, special_tokens=SPECIALS),
    }
    if RANKS.exists():
        built["gpt2"] = GPT2Tokenizer.build(RANKS, SPECIALS)
    return built


@pytest.fixture(scope="module")
def vocabs(toks: dict[str, Tokenizer]) -> dict[str, GGUFVocab]:
    return {kind: gguf_vocab(tok) for kind, tok in toks.items()}


@pytest.mark.parametrize("kind", KINDS)
def test_hf_tokenizer_folder_gives_tinygpt_ids(kind: str, toks: dict[str, Tokenizer], tmp_path: Path) -> None:
    tok = toks[kind]
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=hf_tokenizer(tok), eos_token=EOT)
    fast.save_pretrained(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert len(hf) == tok.vocab_size and hf.eos_token_id == tok.eot_id
    assert hf.convert_tokens_to_ids(SPECIALS) == [tok.special_tokens[s] for s in SPECIALS]
    for text in TEXTS:
        ids = tok.encode(text, allow_special=True)
        assert hf(text)["input_ids"] == ids, text  # default add_special_tokens: no BOS/EOS added
        assert hf.decode(ids) == text


def test_hf_char_drops_unknown_characters(toks: dict[str, Tokenizer]) -> None:
    tok = toks["char"]
    with pytest.raises(TinyGPTError, match="unknown to the char tokenizer"):
        tok.encode("aж")
    assert hf_tokenizer(tok).encode("aж").ids == tok.encode("a")


def test_hf_sentencepiece_reads_a_literal_marker_as_a_space(toks: dict[str, Tokenizer]) -> None:
    # The documented inexact case: tinygpt sends U+2581 as its bytes, HF (like llama.cpp) as a space.
    tok = toks["sentencepiece"]
    assert tok.encode("\u2581x")[:3] == [tok._sp.piece_to_id(f"<0x{b:02X}>") for b in "\u2581".encode()]
    assert hf_tokenizer(tok).encode("\u2581x").ids == tok.encode(" x")


def test_sentencepiece_unigram_is_refused() -> None:
    tok = build_tokenizer("sentencepiece", CORPUS, vocab_size=400, special_tokens=SPECIALS,
                          sp_model_type="unigram")
    for export in (hf_tokenizer, gguf_vocab):
        with pytest.raises(TinyGPTError, match="unigram"):
            export(tok)


def test_special_that_is_also_a_base_token_is_refused() -> None:
    tok = build_tokenizer("char", ["abc"], special_tokens=["b"])
    for export in (hf_tokenizer, gguf_vocab):
        with pytest.raises(TinyGPTError, match=r"\['b'\]"):
            export(tok)


def test_token_types_are_ggufs() -> None:
    assert {t.name: int(t) for t in TokenType} == {t.name: int(t) for t in gguf.TokenType}


def _write_and_read(v: GGUFVocab, path: Path, chat_template: str | None) -> dict[str, object]:
    writer = gguf.GGUFWriter(path, arch="gpt2")  # adds general.architecture itself
    write_vocab(writer, v, chat_template)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {name: field.contents() for name, field in gguf.GGUFReader(path).fields.items()
            if not name.startswith("GGUF.")}


# GGUFReader takes seconds over GPT-2's 100k strings; the fast tests check the gpt2 GGUFVocab itself.
@pytest.mark.parametrize("kind", [*KINDS[:-1], pytest.param("gpt2", marks=[NEEDS_RANKS, pytest.mark.slow])])
def test_gguf_file_holds_the_vocabulary(kind: str, toks: dict[str, Tokenizer], vocabs: dict[str, GGUFVocab],
                                        tmp_path: Path) -> None:
    tok, v = toks[kind], vocabs[kind]
    keys = _write_and_read(v, tmp_path / "vocab.gguf", chat_template="{{ messages }}")
    assert keys["general.architecture"] == "gpt2"
    tokens, types = keys["tokenizer.ggml.tokens"], keys["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == tok.vocab_size and tokens == v.tokens
    assert [tokens[i] for i in tok.special_tokens.values()] == list(tok.special_tokens)
    assert all(types[i] == TokenType.CONTROL for i in tok.special_tokens.values())
    assert keys["tokenizer.ggml.eos_token_id"] == keys["tokenizer.ggml.bos_token_id"] == tok.eot_id
    assert keys["tokenizer.ggml.add_bos_token"] is False and keys["tokenizer.ggml.add_space_prefix"] is False
    assert keys["tokenizer.chat_template"] == "{{ messages }}"
    expected = {"char": ("gpt2", "gpt-2"), "gpt2": ("gpt2", "gpt-2"), "bpe": ("gpt2", "refact"),
                "sentencepiece": ("llama", "default")}[kind]
    assert (keys["tokenizer.ggml.model"], keys["tokenizer.ggml.pre"]) == expected
    if v.model == "gpt2":
        assert keys["tokenizer.ggml.merges"] == v.merges and v.merges
        assert "tokenizer.ggml.scores" not in keys and set(types[:tok.eot_id]) == {TokenType.NORMAL}
    else:
        assert (keys["tokenizer.ggml.remove_extra_whitespaces"] is False
                and "tokenizer.ggml.merges" not in keys)
        assert keys["tokenizer.ggml.scores"] == pytest.approx(v.scores)
        sp = tok._sp
        assert types[0] == TokenType.UNKNOWN and types[sp.piece_to_id("<0x41>")] == TokenType.BYTE
        assert types[sp.piece_to_id("\u2581the")] == TokenType.NORMAL


def test_gguf_all_ascii_char_vocabulary_gets_a_merge_that_never_applies(tmp_path: Path) -> None:
    tok = build_tokenizer("char", ["hello world\n"])
    v = gguf_vocab(tok)
    assert v.merges == ["À À"]  # byte 0xC0 never occurs in UTF-8
    assert _write_and_read(v, tmp_path / "ascii.gguf", None)["tokenizer.ggml.merges"] == ["À À"]
    assert _reference_encode(v, "hello world\n") == tok.encode("hello world\n")


def test_gguf_token_lists_are_exactly_tinygpts_ids(vocabs: dict[str, GGUFVocab],
                                                   toks: dict[str, Tokenizer]) -> None:
    for kind, v in vocabs.items():
        assert len(v.tokens) == toks[kind].vocab_size and len(set(v.tokens)) == len(v.tokens), kind


# --- a stand-in for llama.cpp's tokenizer, applying the emitted merges ---------------------------------


def _gpt2_byte_chars() -> list[str]:
    # Written out again (not imported) so that the check does not share the code it checks.
    keep = [b for b in range(256) if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b]
    moved = {b: chr(0x100 + n) for n, b in enumerate(b for b in range(256) if b not in keep)}
    return [moved.get(b, chr(b)) for b in range(256)]


BYTE_CHARS = _gpt2_byte_chars()


_GPT2_RE = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")


def _pre_tokenize(pre: str, text: str) -> list[str]:
    """llama.cpp's regex splits: "refact" isolates each digit first, then GPT-2's regex."""
    pieces = [p for p in regex.split(r"(\p{N})", text) if p] if pre == "refact" else [text]
    return [word for piece in pieces for word in _GPT2_RE.findall(piece)]


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-level BPE as llama.cpp runs it: the lowest-ranked adjacent pair first, leftmost on ties."""
    symbols = [BYTE_CHARS[b] for b in word.encode()]
    while True:
        found = [(ranks[pair], i) for i, pair in enumerate(zip(symbols, symbols[1:])) if pair in ranks]
        if not found:
            return symbols
        _, i = min(found)
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]


def _reference_encode(v: GGUFVocab, text: str) -> list[int]:
    ranks = {tuple(m.split(" ")): r for r, m in enumerate(v.merges)}
    ids = {t: i for i, t in enumerate(v.tokens)}
    return [ids[s] for word in _pre_tokenize(v.pre, text) for s in _bpe(word, ranks)]


@pytest.mark.parametrize("kind", ["char", "bpe", pytest.param("gpt2", marks=NEEDS_RANKS)])
def test_gguf_merges_reproduce_tinygpt_ids(kind: str, toks: dict[str, Tokenizer],
                                           vocabs: dict[str, GGUFVocab]) -> None:
    tok, v = toks[kind], vocabs[kind]
    # Plain text only: llama.cpp splits the specials off before its BPE, as tinygpt does.
    for text in [t for t in SAMPLES if "<|" not in t] + CORPUS[:5]:
        assert _reference_encode(v, text) == tok.encode(text), text


def test_gguf_char_merges_build_characters_that_share_utf8_prefixes() -> None:
    # € and ₹ share E2 82, 🍮 and 🍕 share F0 9F 8D: the shared merges must still finish both.
    text = "€₹🍮🍕é€a₹ 🍕🍮"
    tok = build_tokenizer("char", [text])
    v = gguf_vocab(tok)
    assert len(v.tokens) == tok.vocab_size
    assert (_reference_encode(v, text) == tok.encode(text)
            and _reference_encode(v, text[::-1]) == tok.encode(text[::-1]))
