"""A tinygpt tokenizer as other runtimes spell it: a Hugging Face ``tokenizers`` object (what
becomes ``tokenizer.json``) and the ``tokenizer.*`` keys of a GGUF file for llama.cpp.

Both keep tinygpt's ids: the base vocabulary first, then the special tokens (EOT first), which
the other runtime matches in text the way ``encode(text, allow_special=True)`` does.

Known limits:

* char: a character outside the alphabet makes tinygpt raise; the HF tokenizer and llama.cpp
  drop it (neither has an unknown token for it).
* sentencepiece: tinygpt sends a literal "\u2581" in the text as its three byte tokens; the
  HF tokenizer and llama.cpp (as for their own SentencePiece models) cannot tell it from an
  escaped space and treat it as one. In principle also: when two overlapping pairs would make
  the same piece, SentencePiece and llama.cpp merge the leftmost, the HF BPE the one listed
  first (never seen in testing).
* sentencepiece unigram has no form in either (refused with a TinyGPTError).
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING

from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from tinygpt.errors import TinyGPTError
from tinygpt.tokenizer import (
    BPETokenizer,
    CharTokenizer,
    GPT2Tokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    byte_level_alphabet,
)

if TYPE_CHECKING:  # gguf is needed only by whoever writes the file, and hands us the writer
    import gguf

_SP_SPACE = "\u2581"
# A byte that never occurs in UTF-8: a merge of two of them can never apply (see _char_merges).
_NEVER_BYTE = 0xC0


class TokenType(IntEnum):
    """gguf.TokenType's values (also SentencePiece's piece types), without importing gguf."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


@dataclass(frozen=True)
class GGUFVocab:
    """What llama.cpp reads from a GGUF file's ``tokenizer.ggml.*`` keys."""

    model: str  # "gpt2": byte-level BPE with merges; "llama": SentencePiece with scores
    pre: str  # llama.cpp's name for the pre-tokenizer regexes
    tokens: list[str]  # by id; byte-level strings for "gpt2", pieces for "llama", specials as written
    token_types: list[int]
    merges: list[str]  # "left right", byte-level strings, rank order
    scores: list[float] | None
    eos_id: int
    add_space_prefix: bool = False
    add_bos: bool = False


_BYTE_CHARS = byte_level_alphabet()


def _byte_level(data: bytes) -> str:
    return "".join(_BYTE_CHARS[b] for b in data)


def _specials_by_id(tok: Tokenizer) -> list[str]:
    return sorted(tok.special_tokens, key=tok.special_tokens.__getitem__)


def _add_specials(hf: HFTokenizer, tok: Tokenizer) -> HFTokenizer:
    # normalized=False: matched in the raw text, as tinygpt's allow_special does.
    hf.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in _specials_by_id(tok)])
    # A special that is also a base token keeps the base id in HF, which would move tinygpt's ids.
    clashes = [s for s, i in tok.special_tokens.items() if hf.token_to_id(s) != i]
    if clashes:
        raise TinyGPTError(f"special token(s) {clashes} are also ordinary tokens of the {tok.kind} "
                           "vocabulary, so the export cannot keep their ids; rename them")
    return hf


# --- gpt2: tiktoken ranks -------------------------------------------------------------------------


def _gpt2_ranks(tok: GPT2Tokenizer) -> list[bytes]:
    """Each rank's bytes, by rank, from the canonical ranks file the tokenizer saves."""
    lines = tok._ranks_file.splitlines()
    by_rank = {int(rank): base64.b64decode(token) for token, rank in (line.split() for line in lines)}
    if sorted(by_rank) != list(range(len(by_rank))):
        raise TinyGPTError("the GPT-2 ranks have gaps, so they have no byte-level BPE form; use a complete "
                           "ranks file")
    return [by_rank[r] for r in range(len(by_rank))]


def _last_merge(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The pair tiktoken merges last to make ``token``: BPE over its bytes with the ranks below its own
    (always the lowest-ranked adjacent pair first, as tiktoken does) stops at exactly two parts."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, at = rank, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1], rank)
            if r < best:
                best, at = r, i
        if at < 0:
            raise TinyGPTError(f"GPT-2 token {token!r} cannot be built by merges of lower ranks; the ranks "
                               "file is not a BPE vocabulary")
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    return parts[0], parts[1]


def _gpt2_merges(by_rank: list[bytes]) -> list[str]:
    """tiktoken keeps only ranks; HF and llama.cpp want the merges, whose order is the rank order of
    the tokens they make."""
    ranks = {token: r for r, token in enumerate(by_rank)}
    pairs = (_last_merge(token, r, ranks) for r, token in enumerate(by_rank) if len(token) > 1)
    return [f"{_byte_level(a)} {_byte_level(b)}" for a, b in pairs]


def _hf_gpt2(tok: GPT2Tokenizer) -> HFTokenizer:
    by_rank = _gpt2_ranks(tok)
    vocab = {_byte_level(token): r for r, token in enumerate(by_rank)}
    merges = [tuple(m.split(" ")) for m in _gpt2_merges(by_rank)]
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's regex
    hf.decoder = decoders.ByteLevel()
    return hf


# --- bpe: HF byte-level BPE --------------------------------------------------------------------------


def _hf_bpe(tok: BPETokenizer) -> HFTokenizer:
    return HFTokenizer.from_str(tok._model.to_str())  # a copy: adding the specials must not touch tok


def _bpe_parts(tok: BPETokenizer) -> tuple[list[str], list[str]]:
    """Tokens by id and merges "a b", from the model's own JSON."""
    model = json.loads(tok._model.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    tokens = sorted(vocab, key=vocab.__getitem__)
    # tokenizers writes merges as pairs since 0.20 and as "a b" strings before.
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


# --- char -------------------------------------------------------------------------------------------


def _hf_char(tok: CharTokenizer) -> HFTokenizer:
    # BPE without merges and without a pre-tokenizer looks each character up on its own. A character
    # outside the alphabet has no token and, with no unknown token set, is dropped.
    hf = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(tok._alphabet)}, merges=[]))
    hf.decoder = decoders.Fuse()  # without a decoder, HF joins tokens with spaces
    return hf


def _char_merges(alphabet: str) -> list[str]:
    """Merges that build each multi-byte character from its UTF-8 bytes, left to right: lead byte +
    2nd byte, then that + 3rd byte, ... The intermediate prefixes need no token of their own (llama.cpp
    looks merges up by text and only the final symbols by id), so the token list stays exactly
    tinygpt's ids. No merge can cross characters: a merge's left side starts with a lead byte, its right
    side is one continuation byte, and in valid UTF-8 a continuation byte follows only its own
    character's earlier bytes. So for text the char tokenizer accepts, every character ends as its own
    token, whatever the merge order."""
    merges: dict[str, None] = {}  # ordered set: characters that share a prefix share its merges
    for c in alphabet:
        data = c.encode()
        for n in range(1, len(data)):
            merges[f"{_byte_level(data[:n])} {_byte_level(data[n:n + 1])}"] = None
    if not merges:
        # All ASCII: nothing to merge, but gguf drops an empty array and llama.cpp then refuses the
        # file, so one merge of a byte UTF-8 never contains.
        never = _byte_level(bytes([_NEVER_BYTE]))
        merges[f"{never} {never}"] = None
    return list(merges)


# --- sentencepiece ---------------------------------------------------------------------------------


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _proto_fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of one protobuf message. Enough of protobuf to read a SentencePiece
    model without depending on the protobuf package, which sentencepiece does not install."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            yield key >> 3, value
            continue
        if wire == 2:  # length-delimited: strings, bytes, nested messages
            size, pos = _varint(data, pos)
        elif wire in (1, 5):  # fixed 64 and 32 bits
            size = 8 if wire == 1 else 4
        else:
            raise TinyGPTError(f"the SentencePiece model has protobuf wire type {wire}, which it never uses; "
                               "it is corrupt")
        yield key >> 3, data[pos:pos + size]
        pos += size


@dataclass(frozen=True)
class _Piece:
    text: str
    score: float
    type: TokenType


def _sp_model(tok: SentencePieceTokenizer) -> tuple[str, list[_Piece]]:
    """Model type ("bpe" or "unigram") and the pieces by id. ModelProto: pieces = 1, trainer_spec = 2;
    SentencePiece: piece = 1, score = 2, type = 3 (its values are gguf's token types); TrainerSpec:
    model_type = 3 (1 unigram, 2 bpe)."""
    model_type, pieces = 1, []  # protobuf omits fields at their defaults: unigram, score 0, NORMAL
    for number, value in _proto_fields(tok._proto):
        if number == 1 and isinstance(value, bytes):
            fields = dict(_proto_fields(value))
            raw = fields.get(2, b"\0\0\0\0")
            score = struct.unpack("<f", raw)[0] if isinstance(raw, bytes) else 0.0
            pieces.append(_Piece(bytes(fields[1]).decode(), score, TokenType(fields.get(3, 1))))
        elif number == 2 and isinstance(value, bytes):
            model_type = int(dict(_proto_fields(value)).get(3, 1))
    names = {1: "unigram", 2: "bpe"}
    if model_type not in names:
        raise TinyGPTError(f"SentencePiece model type {model_type} is not one tinygpt trains; retrain the "
                           "tokenizer")
    return names[model_type], pieces


def _sp_bpe_pieces(tok: SentencePieceTokenizer) -> list[_Piece]:
    model_type, pieces = _sp_model(tok)
    if model_type != "bpe":
        raise TinyGPTError("a sentencepiece unigram tokenizer has no exact Hugging Face BPE or GGUF form; "
                           "train with the sentencepiece bpe model type to export it")
    return pieces


def _sp_merges(pieces: list[_Piece]) -> list[tuple[str, str]]:
    """SentencePiece BPE merges any two adjacent symbols whose concatenation is a normal piece, the
    highest-scoring first; HF needs that as merges, so every split of a normal piece into two normal
    pieces, in score order."""
    normal = {p.text for p in pieces if p.type == TokenType.NORMAL}
    order = sorted((i for i, p in enumerate(pieces) if p.type == TokenType.NORMAL),
                   key=lambda i: (-pieces[i].score, i))
    return [(pieces[i].text[:k], pieces[i].text[k:]) for i in order for k in range(1, len(pieces[i].text))
            if pieces[i].text[:k] in normal and pieces[i].text[k:] in normal]


def _hf_sentencepiece(tok: SentencePieceTokenizer) -> HFTokenizer:
    pieces = _sp_bpe_pieces(tok)
    unk = next(p.text for p in pieces if p.type == TokenType.UNKNOWN)
    vocab = {p.text: i for i, p in enumerate(pieces)}
    # The whole text is one word, as in SentencePiece (no pre-tokenizer); characters without a piece
    # become their <0xXX> byte pieces, as SentencePiece's byte fallback does.
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=_sp_merges(pieces), unk_token=unk, byte_fallback=True))
    # tinygpt's SentencePiece normalizes with "identity", which still escapes spaces (only " ").
    hf.normalizer = normalizers.Replace(" ", _SP_SPACE)
    hf.decoder = decoders.Sequence([decoders.Replace(_SP_SPACE, " "), decoders.ByteFallback(),
                                    decoders.Fuse()])
    return hf


# --- public -----------------------------------------------------------------------------------------


def hf_tokenizer(tok: Tokenizer) -> HFTokenizer:
    """A Hugging Face fast tokenizer that encodes text to ``tok.encode(text, allow_special=True)``'s ids
    and decodes them back (see the module notes for the limits). No post-processor: nothing adds BOS or
    EOS."""
    if isinstance(tok, GPT2Tokenizer):
        hf = _hf_gpt2(tok)
    elif isinstance(tok, BPETokenizer):
        hf = _hf_bpe(tok)
    elif isinstance(tok, CharTokenizer):
        hf = _hf_char(tok)
    elif isinstance(tok, SentencePieceTokenizer):
        hf = _hf_sentencepiece(tok)
    else:
        raise TinyGPTError(f"no Hugging Face tokenizer form for the {tok.kind} tokenizer")
    return _add_specials(hf, tok)


def _base_vocab(tok: Tokenizer) -> tuple[str, list[str], list[str]]:
    """The byte-level BPE kinds: pre-tokenizer name, base tokens by id and merges."""
    if isinstance(tok, GPT2Tokenizer):
        by_rank = _gpt2_ranks(tok)
        return "gpt-2", [_byte_level(t) for t in by_rank], _gpt2_merges(by_rank)
    if isinstance(tok, BPETokenizer):
        # "refact" is llama.cpp's digits-one-by-one, then GPT-2's regex: tinygpt's two pre-tokenizers.
        return "refact", *_bpe_parts(tok)
    if isinstance(tok, CharTokenizer):
        # Merges never cross characters (see _char_merges), so the pre-tokenizer cannot change the ids.
        alphabet = tok._alphabet
        return "gpt-2", [_byte_level(c.encode()) for c in alphabet], _char_merges(alphabet)
    raise TinyGPTError(f"no GGUF vocabulary form for the {tok.kind} tokenizer")


def gguf_vocab(tok: Tokenizer) -> GGUFVocab:
    """The tokenizer as llama.cpp's GGUF keys: "gpt2" (byte-level BPE) for char, gpt2 and bpe, "llama"
    for sentencepiece bpe. Specials follow the base tokens as CONTROL, under their tinygpt ids."""
    specials = _specials_by_id(tok)
    control = [int(TokenType.CONTROL)] * len(specials)
    if isinstance(tok, SentencePieceTokenizer):
        pieces = _sp_bpe_pieces(tok)
        # -1000 for the specials, as llama.cpp's own converter scores added tokens.
        vocab = GGUFVocab(model="llama", pre="default", tokens=[p.text for p in pieces] + specials,
                          token_types=[int(p.type) for p in pieces] + control, merges=[],
                          scores=[p.score for p in pieces] + [-1000.0] * len(specials), eos_id=tok.eot_id)
    else:
        pre, tokens, merges = _base_vocab(tok)
        vocab = GGUFVocab(model="gpt2", pre=pre, tokens=tokens + specials,
                          token_types=[int(TokenType.NORMAL)] * len(tokens) + control, merges=merges,
                          scores=None, eos_id=tok.eot_id)
    # llama.cpp maps token text to id and aborts the load when two ids share a text.
    if len(set(vocab.tokens)) != len(vocab.tokens):
        clashes = sorted(s for s in specials if vocab.tokens.count(s) > 1)
        raise TinyGPTError(f"special token(s) {clashes} are also ordinary tokens of the {tok.kind} "
                           "vocabulary, so the GGUF vocabulary would have two ids for one text; rename them")
    return vocab


def write_vocab(writer: gguf.GGUFWriter, v: GGUFVocab, chat_template: str | None = None) -> None:
    """Add the tokenizer keys to a GGUF file. llama.cpp's defaults for add_bos_token, add_space_prefix and
    remove_extra_whitespaces are true, and wrong for tinygpt, so all are written."""
    writer.add_tokenizer_model(v.model)
    writer.add_tokenizer_pre(v.pre)
    writer.add_token_list(v.tokens)
    writer.add_token_types(v.token_types)
    if v.model == "gpt2":
        # add_array would drop it silently, and llama.cpp refuses a gpt2 model without merges
        if not v.merges:
            raise TinyGPTError("a gpt2-model GGUF vocabulary needs merges")
        writer.add_token_merges(v.merges)
    if v.scores is not None:
        writer.add_token_scores(v.scores)
    writer.add_eos_token_id(v.eos_id)
    # tinygpt has no BOS; llama.cpp would default it to an ordinary token (1 or 11), so it is EOT, as in
    # GPT-2.
    writer.add_bos_token_id(v.eos_id)
    writer.add_add_bos_token(v.add_bos)
    writer.add_add_space_prefix(v.add_space_prefix)
    if v.model == "llama":
        writer.add_remove_extra_whitespaces(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
