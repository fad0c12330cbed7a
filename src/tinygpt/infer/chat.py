"""Chat: a multi-turn session with a trained model (its history fitted to the context), and the console
loop."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TextIO

import torch

from tinygpt.config import SampleConfig
from tinygpt.data.dialogs import Message
from tinygpt.data.templates import ChatTemplate
from tinygpt.errors import TinyGPTError
from tinygpt.infer.generate import stream_text
from tinygpt.tokenizer import Tokenizer

# What chat samples with unless told otherwise: greedy replies suit small models best.
CHAT_SAMPLING = {"max_new_tokens": 128, "temperature": 0.0}


def prompt_budget(block_size: int, max_new_tokens: int) -> int:
    """Tokens a chat prompt may take: the context window less the room kept for the reply (at most half)."""
    return block_size - min(max_new_tokens, block_size // 2)


def fit_history(tok: Tokenizer, template: ChatTemplate, history: Sequence[Message], budget: int) -> list[int]:
    """Prompt ids for the next reply that fit in `budget` tokens: the oldest exchanges are dropped
    first (a system message is kept); if even the last user turn is too long, its most recent tokens stay.

    Messages are encoded newest first and only until the budget is spent (a rendered conversation's length is
    the sum of its messages'), so a long history costs what its fitting part costs: re-rendering the whole
    conversation after each drop kept a server busy for 25 s on 1,001 messages (issue #25)."""
    system = [m for m in history[:1] if m.role == "system"]
    turns = list(history[len(system):])
    starts = [0]  # where a kept history may begin: each drop takes a user turn and the reply after it
    while len(turns) - starts[-1] > 1:
        rest = starts[-1]
        starts.append(rest + (2 if len(turns) - rest > 2 and turns[rest + 1].role == "assistant" else 1))
    used, start = len(template.render(tok, system, open_reply=True)[0]), len(turns)
    for k in reversed(starts):
        more = sum(len(template.message_ids(tok, m)[0]) for m in turns[k:start])
        if used + more > budget:
            break
        used, start = used + more, k
    if start == len(turns):  # not even the newest turn fits: its most recent tokens stay
        start = starts[-1]
    ids, _ = template.render(tok, system + turns[start:], open_reply=True)
    return ids[-budget:]


@dataclass
class ChatSession:
    """A multi-turn conversation with a trained model."""

    model: torch.nn.Module
    tokenizer: Tokenizer
    template: ChatTemplate
    sampling: SampleConfig = field(default_factory=lambda: SampleConfig(**CHAT_SAMPLING, top_k=None))
    system: str | None = None
    generator: torch.Generator | None = None
    history: list[Message] = field(default_factory=list)

    def reset(self) -> None:
        self.history = [Message("system", self.system)] if self.system else []

    def __post_init__(self) -> None:
        self.reset()

    def reply(self, text: str, on_piece: Callable[[str], None] = lambda s: None) -> str:
        """Add a user turn, stream the assistant's reply through on_piece, and return it."""
        self.history.append(Message("user", text))
        budget = prompt_budget(self.model.config.block_size, self.sampling.max_new_tokens)
        prompt = fit_history(self.tokenizer, self.template, self.history, budget)
        stops = self.template.stop_ids(self.tokenizer)
        pieces = []
        for piece in stream_text(self.model, self.tokenizer, prompt, self.sampling, self.generator, stops):
            pieces.append(piece)
            on_piece(piece)
        answer = "".join(pieces).strip()
        self.history.append(Message("assistant", answer))
        return answer


HELP = "commands: /reset clears the conversation, /help shows this, exit or quit (or Ctrl-D) leaves"


def console(session: ChatSession, lines: Iterable[str], out: TextIO | None = None,
            interactive: bool = True) -> None:
    """The chat loop. Interactive: 'You:' prompts and streamed replies. Piped: one reply line per input
    line."""
    out = out or sys.stdout
    if interactive:
        print(f"Chatting with tinygpt. {HELP}.", file=out)
    it = iter(lines)
    while True:
        if interactive:
            print("You: ", end="", file=out, flush=True)
        try:
            line = next(it)
        except (StopIteration, KeyboardInterrupt):
            if interactive:
                print(file=out)
            return
        text = line.strip()
        if not text:
            continue
        if text.lower() in ("exit", "quit", "/exit", "/quit"):
            return
        if text == "/reset":
            session.reset()
            print("(conversation cleared)", file=out, flush=True)
            continue
        if text == "/help":
            print(HELP, file=out, flush=True)
            continue
        if interactive:
            print("Bot: ", end="", file=out, flush=True)
        try:
            if interactive:
                session.reply(text, on_piece=lambda s: print(s, end="", file=out, flush=True))
                print(file=out, flush=True)
            else:  # one line per reply, so scripts can pair inputs and outputs
                print(" ".join(session.reply(text).split()), file=out, flush=True)
        except KeyboardInterrupt:  # stop this reply, keep the conversation
            print(file=out, flush=True)
        except TinyGPTError as e:  # e.g. a character the char tokenizer never saw: say so, keep chatting
            session.history.pop()
            print(f"(cannot reply: {e})", file=out, flush=True)
