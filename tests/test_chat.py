"""The chat session and console (tinygpt.infer.chat)."""

import io

import torch

from conftest import A, S, U, tok_for
from tinygpt.config import ModelConfig, SampleConfig
from tinygpt.data.templates import TEMPLATES
from tinygpt.infer.chat import ChatSession, console, fit_history, prompt_budget
from tinygpt.model import GPT


def test_history_is_trimmed_oldest_first_and_keeps_the_system_message():
    template = TEMPLATES["default"]
    tok = tok_for(template)
    history = [S("be brief"), U("hello there"), A("hi! how are you?"), U("what is 2 plus 3?"), A("5"),
               U("hello there")]
    full = fit_history(tok, template, history, 10_000)
    assert tok.decode(full).endswith("<|user|>hello there<|end|><|assistant|>")
    budget = len(full) - 5
    trimmed = tok.decode(fit_history(tok, template, history, budget))
    assert (trimmed.startswith("<|endoftext|><|system|>be brief<|end|>") and "how are you" not in trimmed
            and "2 plus 3" in trimmed)
    # most recent tokens of a huge turn
    assert len(fit_history(tok, template, [U("hello there " * 50)], 20)) == 20


def test_fitting_a_long_history_gives_what_dropping_exchanges_one_by_one_gives():
    import random

    template = TEMPLATES["default"]
    tok = tok_for(template)

    def by_dropping(history, budget):  # the plain rule: render, drop the oldest exchange, render again
        system = history[:1] if history[0].role == "system" else []
        turns = history[len(system):]
        while True:
            ids, _ = template.render(tok, system + turns, open_reply=True)
            if len(ids) <= budget or len(turns) <= 1:
                return ids[-budget:]
            turns = turns[2 if len(turns) > 2 and turns[1].role == "assistant" else 1:]

    rng = random.Random(0)
    for _ in range(60):
        roles = [rng.choice("UA") for _ in range(rng.randrange(1, 12))] + ["U"]
        history = [{"U": U, "A": A}[r]("hello there"[:rng.randrange(1, 12)]) for r in roles]
        if rng.random() < 0.5:
            history.insert(0, S("be brief"))
        budget = rng.randrange(5, 120)
        assert fit_history(tok, template, history, budget) == by_dropping(history, budget)


def test_fitting_encodes_only_the_newest_messages_of_a_long_history():
    template = TEMPLATES["default"]
    tok = tok_for(template)
    encoded = []
    real_encode = tok.encode
    tok.encode = lambda text, allow_special=False: encoded.append(text) or real_encode(text, allow_special)
    history = [S("be brief")] + [m for _ in range(5000) for m in (U("hello there"), A("hi!"))] + [U("hello")]
    ids = fit_history(tok, template, history, 60)
    assert tok.decode(ids).endswith("<|user|>hello<|end|><|assistant|>") and len(ids) <= 60
    assert len(encoded) < 100  # 10,002 messages; re-rendering them at every drop encoded millions of pieces


def test_a_prompt_leaves_room_for_the_reply_up_to_half_the_window():
    assert prompt_budget(128, 20) == 108 and prompt_budget(128, 64) == 64 and prompt_budget(128, 10_000) == 64


def test_console_loop_through_stdin():
    template = TEMPLATES["default"]
    tok = tok_for(template)
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=64, vocab_size=tok.vocab_size))
    session = ChatSession(model, tok, template, SampleConfig(max_new_tokens=8, temperature=0.0, top_k=None),
                          system="be brief")
    out = io.StringIO()
    console(session, ["hello there\n", "\n", "/help\n", "what is 2 plus 3?\n", "/reset\n", "hi \u2603\n",
                      "quit\n",
                      "never read\n"], out=out, interactive=False)
    lines = out.getvalue().splitlines()
    assert len(lines) == 5 and lines[1].startswith("commands:") and lines[3] == "(conversation cleared)"
    assert lines[4].startswith("(cannot reply:") and "unknown to the char tokenizer" in lines[4]
    assert session.history == [S("be brief")]  # reset, and the failed turn was not kept
