import io
import json

import pytest

from conftest import tiny_flags
from tinygpt import evaluate
from tinygpt.cli import main
from tinygpt.data.dialogs import Message


class Canned:
    """A stand-in chat session that answers from a table."""

    def __init__(self, answers):
        self.answers, self.history = answers, []

    def reply(self, text):
        return self.answers.get(text, "?")


def test_exact_match_accepts_any_of_several_references():
    session = Canned({"hi": "Hello", "2+2?": "4", "name?": "tiny"})
    assert evaluate.exact_match(session, [("hi", {"Hi", "Hello"}), ("2+2?", "4"),
                                          ("name?", "big")]) == pytest.approx(2 / 3)


def test_exchanges_and_seen_prompts():
    conv = [Message("user", "hi"), Message("assistant", "Hello"), Message("user", "bye"),
            Message("assistant", "Bye")]
    pairs = evaluate.exchanges([conv])
    assert [(len(h), r) for h, r in pairs] == [(1, "Hello"), (3, "Bye")]
    other = [Message("user", "hi"), Message("assistant", "Hey")]
    assert evaluate.seen_prompts([conv, other], 10) == [("hi", {"Hello", "Hey"})]


def test_eval_json_and_piped_chat_on_a_chat_run(tmp_path, capsys, monkeypatch):
    out = tmp_path / "chat-run"
    assert main(["train", "--out", str(out), *tiny_flags(**{"model.block_size": 64})]) == 0
    capsys.readouterr()
    assert main(["eval", "--run", str(out), "--json", "--limit", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("perplexity", "bits_per_byte", "bleu", "train_prompt_match_chatterbot",
                "train_prompt_match_synthetic",
                "skill_addition_seen", "skill_addition_heldout", "skill_capital_seen"):
        assert key in result, key
    assert 0 <= result["skill_addition_heldout"] <= 1 and result["perplexity"] > 1
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nwhat is 2 plus 3?\nexit\nignored\n"))
    assert main(["chat", "--run", str(out), "--max-new-tokens", "5"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2  # one reply per line, nothing after exit
