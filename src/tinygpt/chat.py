"""Chat: templates that turn conversations into tokens and loss masks, and the console loop.

A template wraps each message in a role prefix and suffix. The markers are special tokens,
registered in every tokenizer kind, so text a user types can never forge a turn: message
content is always encoded with ``allow_special=False``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TextIO

import torch

from tinygpt.dialogs import Message
from tinygpt.errors import TinyGPTError
from tinygpt.tokenizer import EOT, Tokenizer


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    roles: dict[str, tuple[str, str]]  # role -> (prefix, suffix) around the message content
    specials: tuple[str, ...]  # marker strings registered as special tokens
    begin: str = ""  # before a conversation
    end: str = ""  # after a conversation
    description: str = ""

    @property
    def stop_strings(self) -> list[str]:
        """Markers that end an assistant reply: its suffix's specials, the start of a user turn, the end."""
        around = self.roles["assistant"][1] + self.roles["user"][0] + self.end
        return [s for s in self.specials if s in around] + [EOT]

    def render(self, tok: Tokenizer, conv: Sequence[Message], loss_on: str = "assistant",
               open_reply: bool = False) -> tuple[list[int], list[int]]:
        """Token ids and a 0/1 mask marking the tokens to learn: assistant content and the suffix that
        closes it (so the model learns to stop), or everything with loss_on='all'. open_reply appends
        an assistant prefix for the model to continue."""
        ids: list[int] = []
        mask: list[int] = []

        def add(text: str, learn: bool, markup: bool = True) -> None:
            new = tok.encode(text, allow_special=markup)
            ids.extend(new)
            mask.extend([int(learn)] * len(new))

        add(self.begin, loss_on == "all")
        for m in conv:
            learn = loss_on == "all" or m.role == "assistant"
            prefix, suffix = self.roles[m.role]
            add(prefix, loss_on == "all")
            add(m.content, learn, markup=False)
            add(suffix, learn)
        if open_reply:
            add(self.roles["assistant"][0], False)
        else:
            add(self.end, loss_on == "all")
        return ids, mask


TEMPLATES = {
    t.name: t for t in [
        ChatTemplate(
            "default",
            roles={"system": ("<|system|>", "<|end|>"), "user": ("<|user|>", "<|end|>"),
                   "assistant": ("<|assistant|>", "<|end|>")},
            specials=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), begin=EOT,
            description="<|endoftext|><|user|>hi<|end|><|assistant|>hello<|end|>"),
        ChatTemplate(
            "litegpt",
            roles={"system": ("<system>: ", " "), "user": ("<user>: ", " "), "assistant": ("<assistant>: ", " ")},
            specials=("<BOS>", "<EOS>", "<system>:", "<user>:", "<assistant>:"), begin="<BOS> ", end="<EOS>",
            description="LiteGPT's format: <BOS> <user>: hi <assistant>: hello <EOS>"),
        ChatTemplate(
            "tinygpt",
            roles={"system": ("System: ", " <sep> "), "user": ("User: ", " <sep> "), "assistant": ("Bot: ", " </s> ")},
            specials=("<s>", "<sep>", "</s>"), begin="<s> ",
            description="TinyGPT's format: <s> User: hi <sep> Bot: hello </s>"),
    ]
}


def fit_history(tok: Tokenizer, template: ChatTemplate, history: Sequence[Message], budget: int) -> list[int]:
    """Prompt ids for the next reply that fit in `budget` tokens: the oldest exchanges are dropped
    first (a system message is kept); if even the last user turn is too long, its most recent tokens stay."""
    system = [m for m in history[:1] if m.role == "system"]
    turns = list(history[len(system):])
    while True:
        ids, _ = template.render(tok, system + turns, open_reply=True)
        if len(ids) <= budget or len(turns) <= 1:
            return ids[-budget:]
        # drop the oldest user turn together with the reply that followed it
        drop = 2 if len(turns) > 2 and turns[1].role == "assistant" else 1
        turns = turns[drop:]


@dataclass
class ChatSession:
    """A multi-turn conversation with a trained model."""

    model: torch.nn.Module
    tokenizer: Tokenizer
    template: ChatTemplate
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    system: str | None = None
    generator: torch.Generator | None = None
    history: list[Message] = field(default_factory=list)

    def reset(self) -> None:
        self.history = [Message("system", self.system)] if self.system else []

    def __post_init__(self) -> None:
        self.reset()

    def reply(self, text: str, on_piece: Callable[[str], None] = lambda s: None) -> str:
        """Add a user turn, stream the assistant's reply through on_piece, and return it."""
        from tinygpt.generate import stream_text

        self.history.append(Message("user", text))
        block = self.model.config.block_size
        reserve = min(self.max_new_tokens, block // 2)  # leave room for the reply in the window
        prompt = fit_history(self.tokenizer, self.template, self.history, block - reserve)
        stops = [self.tokenizer.special_tokens[s] for s in self.template.stop_strings]
        pieces = []
        for piece in stream_text(self.model, self.tokenizer, prompt, self.max_new_tokens, self.temperature,
                                 self.top_k, self.top_p, generator=self.generator, stop_ids=stops):
            pieces.append(piece)
            on_piece(piece)
        answer = "".join(pieces).strip()
        self.history.append(Message("assistant", answer))
        return answer


HELP = "commands: /reset clears the conversation, /help shows this, exit or quit (or Ctrl-D) leaves"


def console(session: ChatSession, lines: Iterable[str], out: TextIO | None = None, interactive: bool = True) -> None:
    """The chat loop. Interactive: 'You:' prompts and streamed replies. Piped: one reply line per input line."""
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
