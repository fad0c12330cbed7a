"""Tokenizers behind one interface: characters, GPT-2 BPE (tiktoken), byte-level BPE
trained with HF ``tokenizers``, and SentencePiece.

Every kind has a base vocabulary with ids ``0..N-1``; special tokens are appended after
it (``N``, ``N+1``, ...), EOT first, which puts GPT-2's EOT on its own id 50256. Specials
are handled here rather than by the backends so that "<|endoftext|>" appearing in
ordinary text never becomes the EOT id unless the caller asks for it.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import io
import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import sentencepiece as spm
import tiktoken
from tiktoken_ext import openai_public
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from tinygpt.errors import TinyGPTError, UsageError

EOT = "<|endoftext|>"
CONFIG_FILE = "tokenizer.json"
DEFAULT_VOCAB_SIZE = 4096
GPT2_RANKS_ENV = "TINYGPT_GPT2_RANKS"
_SP_META = "\u2581"  # SentencePiece's whitespace marker


def _special_names(extra: Sequence[str]) -> list[str]:
    names = list(dict.fromkeys([EOT, *extra]))
    if not all(isinstance(s, str) and s for s in names):
        raise UsageError(f"special tokens must be non-empty strings, got {list(extra)!r}")
    return names


class Tokenizer(ABC):
    kind: ClassVar[str]
    special_tokens: dict[str, int]

    def __init__(self, base_size: int, specials: Sequence[str]) -> None:
        self._base_size = base_size
        self.special_tokens = {s: base_size + i for i, s in enumerate(_special_names(specials))}
        self._special_by_id = {i: s for s, i in self.special_tokens.items()}
        # Longest first, so a registered "<user>:" wins over a registered "<user>".
        alternatives = sorted(self.special_tokens, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")

    @property
    def vocab_size(self) -> int:
        return self._base_size + len(self.special_tokens)

    @property
    def eot_id(self) -> int:
        return self.special_tokens[EOT]

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        if not allow_special:
            return self._encode(text)
        ids: list[int] = []
        # With a capturing group, re.split alternates ordinary text and matched specials.
        for i, part in enumerate(self._special_re.split(text)):
            if i % 2:
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self._encode(part))
        return ids

    def encode_array(self, text: str, dtype: np.dtype | str) -> np.ndarray:
        """encode(text) as an array of `dtype` (ordinary text: no special ids)."""
        ids = self._encode(text)
        return np.fromiter(ids, dtype=dtype, count=len(ids))  # 13 ns a token where np.asarray took 17

    def decode(self, ids: Sequence[int]) -> str:
        out: list[str] = []
        run: list[int] = []
        for raw in ids:
            i = int(raw)  # accept numpy and torch scalars
            if not 0 <= i < self.vocab_size:
                raise TinyGPTError(
                    f"token id {i} is outside the {self.kind} tokenizer's vocabulary "
                    f"(0..{self.vocab_size - 1}); use the tokenizer the model was trained with"
                )
            special = self._special_by_id.get(i)
            if special is None:
                run.append(i)
                continue
            # Backends decode whole runs, so a character split across several ids survives.
            if run:
                out.append(self._decode(run))
                run = []
            out.append(special)
        if run:
            out.append(self._decode(run))
        return "".join(out)

    def with_specials(self, extra: Sequence[str]) -> Tokenizer:
        """This tokenizer with the special tokens in `extra` that it lacks appended after its own, so every
        existing id keeps its meaning (a model trained with it can grow rows for the new ones)."""
        grown = copy.copy(self)
        Tokenizer.__init__(grown, self._base_size, [*self.special_tokens, *extra])
        return grown

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            for name, data in self._files().items():
                (directory / name).write_bytes(data)
        except OSError as e:
            raise TinyGPTError(f"cannot save the tokenizer to {directory}: {e.strerror}; use a writable "
                               "path") from None

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for name, data in sorted(self._files().items()):
            digest.update(f"{name}\0{len(data)}\0".encode())
            digest.update(data)
        return digest.hexdigest()

    def _files(self) -> dict[str, bytes]:
        settings, files = self._state()
        config = {"kind": self.kind, "special_tokens": self.special_tokens, **settings}
        return {CONFIG_FILE: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(), **files}

    @abstractmethod
    def _encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def _decode(self, ids: list[int]) -> str: ...

    @abstractmethod
    def _state(self) -> tuple[dict[str, Any], dict[str, bytes]]:
        """Settings for tokenizer.json, and model files by name."""

    @classmethod
    @abstractmethod
    def _restore(cls, directory: Path, config: dict[str, Any], specials: list[str]) -> Tokenizer: ...


class CharTokenizer(Tokenizer):
    kind = "char"

    def __init__(self, alphabet: str, specials: Sequence[str]) -> None:
        self._alphabet = alphabet
        self._index = {c: i for i, c in enumerate(alphabet)}
        super().__init__(len(alphabet), specials)

    @classmethod
    def train(cls, texts: Sequence[str], specials: Sequence[str]) -> CharTokenizer:
        return cls("".join(sorted(set().union(*texts))), specials)

    def _encode(self, text: str) -> list[int]:
        try:
            return [self._index[c] for c in text]
        except KeyError:
            unknown = sorted(set(text) - self._index.keys())
            shown = ", ".join(map(repr, unknown[:10])) + (", ..." if len(unknown) > 10 else "")
            raise TinyGPTError(
                f"text has {len(unknown)} character(s) unknown to the char tokenizer ({shown}); it only "
                "knows characters seen in its training corpus, so train on text that contains them "
                "or use a byte-level kind (bpe, gpt2, sentencepiece)"
            ) from None

    def _decode(self, ids: list[int]) -> str:
        return "".join(self._alphabet[i] for i in ids)

    def _state(self) -> tuple[dict[str, Any], dict[str, bytes]]:
        return {"alphabet": self._alphabet}, {}

    @classmethod
    def _restore(cls, directory: Path, config: dict[str, Any], specials: list[str]) -> Tokenizer:
        return cls(str(config["alphabet"]), specials)


def byte_level_alphabet() -> list[str]:
    """GPT-2's byte-level alphabet: entry b is the printable character that stands for byte b in its
    vocab.json
    and merges (and in every byte-level BPE, GGUF's included). Printable Latin-1 bytes stand for themselves;
    the other 68 (controls, space, ...) are moved, in byte order, to the code points from 256 up."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), 256)]
    moved = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(moved)) for b in range(256)]


def ranks_from_vocab(vocab: dict[str, int], fix: str) -> dict[bytes, int]:
    """tiktoken ranks from a Hugging Face GPT-2 vocab.json (byte-level strings -> ids, which are the
    ranks)."""
    back = {c: b for b, c in enumerate(byte_level_alphabet())}
    try:
        return {bytes(back[c] for c in token): int(i) for token, i in vocab.items()}
    except (KeyError, TypeError, ValueError):
        raise TinyGPTError(f"the vocabulary is not GPT-2's byte-level kind; {fix}") from None


def _read_ranks(path: Path, fix: str) -> dict[bytes, int]:
    # Parsed here rather than by tiktoken.load.load_tiktoken_bpe: that copies every local
    # file into tiktoken's download cache keyed by path and keeps serving the copy after
    # the file changes; save() needs the bytes anyway.
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TinyGPTError(f"cannot read GPT-2 ranks file {path} ({e.strerror}); {fix}") from None
    try:
        pairs = (line.split() for line in data.splitlines() if line)
        ranks = {base64.b64decode(tok, validate=True): int(rank) for tok, rank in pairs}
    except ValueError:
        ranks = {}
    if not ranks:
        raise TinyGPTError(f"{path} is not a tiktoken ranks file (lines of 'base64-token rank'); {fix}")
    return ranks


class GPT2Tokenizer(Tokenizer):
    kind = "gpt2"
    RANKS_FILE = "gpt2.tiktoken"

    def __init__(self, ranks: dict[bytes, int], specials: Sequence[str]) -> None:
        # Canonical tiktoken format (the official gpt2.tiktoken is byte-identical to it), so
        # the fingerprint does not depend on where the ranks came from.
        by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
        self._ranks_file = b"".join(base64.b64encode(tok) + b" %d\n" % rank for tok, rank in by_rank)
        pattern = openai_public.r50k_pat_str
        base = max(ranks.values()) + 1
        # EOT is registered with tiktoken only for encode_to_numpy, which looks for specials first: with
        # none its empty pattern matches everywhere (9 MB/s where 16 was measured). It never yields the id,
        # since no special is allowed; tinygpt's own specials are handled by Tokenizer.encode.
        self._enc = tiktoken.Encoding("gpt2", pat_str=pattern, mergeable_ranks=ranks,
                                      special_tokens={EOT: base})
        super().__init__(base, specials)

    @classmethod
    def build(cls, ranks_path: str | Path | None, specials: Sequence[str]) -> GPT2Tokenizer:
        fix = f"pass --data.gpt2_ranks PATH or set {GPT2_RANKS_ENV} to a gpt2.tiktoken file"
        path = ranks_path or os.environ.get(GPT2_RANKS_ENV)
        if path:
            return cls(_read_ranks(Path(path), fix), specials)
        try:  # tiktoken's own download and cache, as used by tiktoken.get_encoding("gpt2")
            ranks = openai_public.gpt2()["mergeable_ranks"]
        except Exception as e:  # network, proxy and hash failures all surface differently
            raise TinyGPTError(f"could not download the GPT-2 vocabulary ({type(e).__name__}); "
                               f"{fix}") from None
        return cls(ranks, specials)

    def _encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_array(self, text: str, dtype: np.dtype | str) -> np.ndarray:
        # No Python list of ids: 16 MB/s of Python source on one core, where encode_ordinary and np.fromiter
        # made 14 (tiktoken 0.14, 2-core EPYC)
        ids = self._enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
        return ids.astype(dtype, copy=False)

    def _decode(self, ids: list[int]) -> str:
        return self._enc.decode(ids)

    def _state(self) -> tuple[dict[str, Any], dict[str, bytes]]:
        return {}, {self.RANKS_FILE: self._ranks_file}

    @classmethod
    def _restore(cls, directory: Path, config: dict[str, Any], specials: list[str]) -> Tokenizer:
        fix = "the saved tokenizer is incomplete; save it again"
        return cls(_read_ranks(directory / cls.RANKS_FILE, fix), specials)


class BPETokenizer(Tokenizer):
    kind = "bpe"
    MODEL_FILE = "hf_bpe.json"

    def __init__(self, model: HFTokenizer, specials: Sequence[str]) -> None:
        self._model = model
        super().__init__(model.get_vocab_size(), specials)

    @classmethod
    def train(cls, texts: Sequence[str], vocab_size: int, specials: Sequence[str]) -> BPETokenizer:
        names = _special_names(specials)
        target = vocab_size - len(names)
        if target < 256:
            raise UsageError(
                f"vocab_size {vocab_size} is too small for the bpe tokenizer: it needs at least "
                f"{256 + len(names)} (256 byte symbols + {len(names)} special tokens); raise vocab_size"
            )
        model = HFTokenizer(models.BPE())
        # One token per digit (as LLaMA does): numbers then share their pieces, which is what lets a
        # small model learn arithmetic instead of memorising a token per number.
        model.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False)])
        model.decoder = decoders.ByteLevel()
        # All 256 byte symbols up front, so text with bytes unseen in training still encodes.
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        trainer = trainers.BpeTrainer(vocab_size=target, initial_alphabet=alphabet, show_progress=False)
        model.train_from_iterator(texts, trainer=trainer)
        return cls(model, names)

    def _encode(self, text: str) -> list[int]:
        return self._model.encode(text, add_special_tokens=False).ids

    def _decode(self, ids: list[int]) -> str:
        return self._model.decode(ids)

    def _state(self) -> tuple[dict[str, Any], dict[str, bytes]]:
        return {}, {self.MODEL_FILE: self._model.to_str().encode()}

    @classmethod
    def _restore(cls, directory: Path, config: dict[str, Any], specials: list[str]) -> Tokenizer:
        model = HFTokenizer.from_str((directory / cls.MODEL_FILE).read_text(encoding="utf-8"))
        return cls(model, specials)


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"
    MODEL_FILE = "sentencepiece.model"
    MODEL_TYPES = ("bpe", "unigram")

    def __init__(self, model_proto: bytes, specials: Sequence[str]) -> None:
        self._proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        # SentencePiece decodes its marker as a space, so a literal one in the text is sent
        # as its UTF-8 bytes, which decode back to the marker itself.
        self._meta_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in _SP_META.encode()]
        super().__init__(self._sp.get_piece_size(), specials)

    @classmethod
    def train(
        cls, texts: Sequence[str], vocab_size: int, specials: Sequence[str], model_type: str
    ) -> SentencePieceTokenizer:
        if model_type not in cls.MODEL_TYPES:
            raise UsageError(f"unknown sentencepiece model type {model_type!r}; choose "
                             f"{' or '.join(cls.MODEL_TYPES)}")
        names = _special_names(specials)
        # SentencePiece trains on sentences; newlines reach the model through byte fallback,
        # which round-trips them (and any other unseen character) exactly.
        lines = [line for text in texts for line in text.split("\n") if line]
        writer = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines), model_writer=writer, model_type=model_type,
                vocab_size=vocab_size - len(names),
                hard_vocab_limit=False,  # a small corpus yields a smaller vocabulary instead of an error
                byte_fallback=True, normalization_rule_name="identity",
                add_dummy_prefix=False, remove_extra_whitespaces=False,
                unk_id=0, bos_id=-1, eos_id=-1,
                max_sentence_length=1 << 20,  # the default silently drops lines over 4 KB
                num_threads=1,  # the trained model depends on the thread count
                minloglevel=2,
            )
        except RuntimeError as e:
            # Drop the C++ source location and assertion that precede sentencepiece's reason.
            reason = " ".join(str(e).split()).rsplit("] ", 1)[-1].rstrip(".")
            raise TinyGPTError(f"sentencepiece training failed: {reason} (vocab_size is "
                               f"{vocab_size})") from None
        return cls(writer.getvalue(), names)

    def _encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for i, part in enumerate(self._sp.encode(text.split(_SP_META), out_type=int)):
            ids += (self._meta_ids if i else []) + part
        return ids

    def _decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def _state(self) -> tuple[dict[str, Any], dict[str, bytes]]:
        return {}, {self.MODEL_FILE: self._proto}

    @classmethod
    def _restore(cls, directory: Path, config: dict[str, Any], specials: list[str]) -> Tokenizer:
        return cls((directory / cls.MODEL_FILE).read_bytes(), specials)


_KINDS = {c.kind: c for c in (CharTokenizer, GPT2Tokenizer, BPETokenizer, SentencePieceTokenizer)}
KINDS = tuple(_KINDS)


def build_tokenizer(
    kind: str,
    texts: Sequence[str],
    *,
    vocab_size: int | None = None,
    special_tokens: Sequence[str] = (),
    gpt2_ranks: str | Path | None = None,
    sp_model_type: str = "bpe",
) -> Tokenizer:
    """Build a tokenizer; every kind but gpt2 learns its vocabulary from ``texts``."""
    if kind == "gpt2":
        return GPT2Tokenizer.build(gpt2_ranks, special_tokens)
    if kind not in _KINDS:
        raise UsageError(f"unknown tokenizer kind {kind!r}; choose one of {', '.join(KINDS)}")
    if isinstance(texts, str):  # a bare string would otherwise train on single characters
        texts = [texts]
    if not any(texts):
        raise UsageError(f"the {kind} tokenizer learns its vocabulary from the corpus, which is empty; check "
                         "the data")
    size = DEFAULT_VOCAB_SIZE if vocab_size is None else vocab_size
    if kind == "char":
        return CharTokenizer.train(texts, special_tokens)
    if kind == "bpe":
        return BPETokenizer.train(texts, size, special_tokens)
    return SentencePieceTokenizer.train(texts, size, special_tokens, sp_model_type)


def load_tokenizer(directory: str | Path) -> Tokenizer:
    directory = Path(directory)
    path = directory / CONFIG_FILE
    corrupt = f"{path} is corrupt; rebuild the tokenizer or restore the run directory"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TinyGPTError(f"no tokenizer at {directory} ({CONFIG_FILE} is missing); point at a saved "
                           "run") from None
    except (OSError, ValueError):
        raise TinyGPTError(corrupt) from None
    kind = config.get("kind") if isinstance(config, dict) else None
    if not isinstance(kind, str) or kind not in _KINDS:
        raise TinyGPTError(f"{path} names unknown tokenizer kind {kind!r}; expected one of "
                           f"{', '.join(KINDS)}")
    try:
        specials = config["special_tokens"]
        tokenizer = _KINDS[kind]._restore(directory, config, sorted(specials, key=specials.__getitem__))
    except TinyGPTError:
        raise
    except Exception:  # whatever a damaged model file makes a backend raise
        raise TinyGPTError(corrupt) from None
    if tokenizer.special_tokens != specials:
        raise TinyGPTError(corrupt)
    return tokenizer
