from pathlib import Path

import pytest

from tinygpt.data.dialogs import Message
from tinygpt.tokenizer import build_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Keep the tokenized-data cache out of the user's home and shared across one test session."""
    monkeypatch.setenv("TINYGPT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def text_file(tmp_path) -> Path:
    lines = [f"The {a} {b} jumps over the {c} fence number {i}." for i, (a, b, c) in
             enumerate(zip(["quick", "slow", "red", "tall"] * 50, ["fox", "dog", "cat", "owl"] * 50,
                           ["low", "high", "old", "new"] * 50))]
    p = tmp_path / "corpus.txt"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def tiny_flags(**extra) -> list[str]:
    """Command-line flags for a model and schedule small enough to train in about a second."""
    flags = {"model.n_layer": 1, "model.n_head": 2, "model.n_embd": 16, "model.block_size": 16,
             "train.max_iters": 6, "train.batch_size": 4, "train.eval_interval": 3, "train.eval_iters": 2,
             "train.checkpoint_interval": 3, "train.warmup_iters": 2, **extra}
    return [a for k, v in flags.items() for a in (f"--{k}", str(v))]


# Conversations and tokenizers for the chat-template, packing and chat-session tests.
U, A, S = (lambda t: Message("user", t)), (lambda t: Message("assistant", t)), (lambda t: Message("system", t))
TEXTS = ["hello there", "hi! how are you?", "what is 2 plus 3?", "5", "be brief"]


def tok_for(template, kind="char"):
    return build_tokenizer(kind, TEXTS + ["User: Bot: System: <user>: <assistant>: <system>: "], special_tokens=template.specials)
