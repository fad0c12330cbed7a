"""Chat templates: how a conversation becomes tokens and a loss mask.

A template wraps each message in a role prefix and suffix. The markers are special tokens,
registered in every tokenizer kind, so text a user types can never forge a turn: message
content is always encoded with ``allow_special=False``. Templates are a data format: data
preparation, the chat session and the server all read them from here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from tinygpt.data.dialogs import Message
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

    def stop_ids(self, tok: Tokenizer) -> list[int]:
        """The ids of stop_strings in `tok`: what ends a reply in chat, in the server and in an export."""
        return [tok.special_tokens[s] for s in self.stop_strings]

    def render(self, tok: Tokenizer, conv: Sequence[Message], loss_on: str = "assistant",
               open_reply: bool = False) -> tuple[list[int], list[int]]:
        """Token ids and a 0/1 mask marking the tokens to learn: assistant content and the suffix that
        closes it (so the model learns to stop), or everything with loss_on='all'. open_reply appends
        an assistant prefix for the model to continue."""
        everything = loss_on == "all"
        ids = tok.encode(self.begin, allow_special=True)
        mask = [int(everything)] * len(ids)
        for m in conv:
            more, learn = self.message_ids(tok, m, loss_on)
            ids, mask = ids + more, mask + learn
        tail = tok.encode(self.roles["assistant"][0] if open_reply else self.end, allow_special=True)
        return ids + tail, mask + [int(everything and not open_reply)] * len(tail)

    def message_ids(self, tok: Tokenizer, m: Message,
                    loss_on: str = "assistant") -> tuple[list[int], list[int]]:
        """One message's ids and mask as render() lays them out. A conversation's ids are the begin marker's,
        then each message's, then the end's (or the open reply's prefix), so their lengths add up: chat fits a
        long history to the context by encoding only the newest messages that fit."""
        learn = loss_on == "all" or m.role == "assistant"
        prefix, suffix = self.roles[m.role]
        ids: list[int] = []
        mask: list[int] = []
        for text, learns, markup in ((prefix, loss_on == "all", True), (m.content, learn, False),
                                     (suffix, learn, True)):
            new = tok.encode(text, allow_special=markup)
            ids += new
            mask += [int(learns)] * len(new)
        return ids, mask

    def text(self, messages: Sequence[dict[str, str]], open_reply: bool = False) -> str:
        """The conversation as text, markers written out: what jinja() renders and render() encodes, for tools
        that take a prompt as a string (lm-evaluation-harness's chat tasks)."""
        body = "".join(self.roles[m["role"]][0] + m["content"] + self.roles[m["role"]][1] for m in messages)
        return self.begin + body + (self.roles["assistant"][0] if open_reply else self.end)

    def jinja(self) -> str:
        """This template in Jinja, for Hugging Face's `apply_chat_template` and GGUF's
        tokenizer.chat_template:
        it renders the text that render() encodes (add_generation_prompt = open_reply). JSON literals are
        valid Jinja literals, escapes included."""
        def lit(value: object) -> str:
            return json.dumps(value)
        return ("{%- set roles = " + lit({r: list(p) for r, p in self.roles.items()}) + " -%}"
                "{{- " + lit(self.begin) + " -}}"
                "{%- for message in messages -%}"
                "{%- if message['role'] not in roles -%}"
                "{{- raise_exception('unknown role ' + message['role'] + ': use system, user or assistant') "
                "-}}{%- endif -%}"
                "{{- roles[message['role']][0] + message['content'] + roles[message['role']][1] -}}"
                "{%- endfor -%}"
                "{%- if add_generation_prompt -%}{{- roles['assistant'][0] -}}"
                "{%- else -%}{{- " + lit(self.end) + " -}}{%- endif -%}")


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
            roles={"system": ("<system>: ", " "), "user": ("<user>: ", " "),
                   "assistant": ("<assistant>: ", " ")},
            specials=("<BOS>", "<EOS>", "<system>:", "<user>:", "<assistant>:"), begin="<BOS> ", end="<EOS>",
            description="LiteGPT's format: <BOS> <user>: hi <assistant>: hello <EOS>"),
        ChatTemplate(
            "tinygpt",
            roles={"system": ("System: ", " <sep> "), "user": ("User: ", " <sep> "),
                   "assistant": ("Bot: ", " </s> ")},
            specials=("<s>", "<sep>", "</s>"), begin="<s> ",
            description="TinyGPT's format: <s> User: hi <sep> Bot: hello </s>"),
    ]
}
