"""`tinygpt eval`: a run's loss figures on its val split or other data (see split_loss), and for chat models
BLEU on held-out replies and exact-match accuracy on skills."""

from __future__ import annotations

import dataclasses
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tinygpt import rundir
from tinygpt.checkpoint import Checkpoint
from tinygpt.config import SampleConfig
from tinygpt.data import corpus
from tinygpt.data.dialogs import Conversation, Message
from tinygpt.data.prepare import load_prepared, prepare
from tinygpt.data.templates import TEMPLATES
from tinygpt.errors import TinyGPTError, UsageError
from tinygpt.infer.chat import ChatSession
from tinygpt.model import GPT
from tinygpt.split_loss import LossSum, loss_metrics, loss_over
from tinygpt.tokenizer import Tokenizer


def exchanges(convs: Sequence[Conversation]) -> list[tuple[list[Message], str]]:
    """(history up to a user turn, the assistant's reference reply) for every reply in the conversations."""
    out = []
    for conv in convs:
        for i, m in enumerate(conv):
            if m.role == "assistant" and i and conv[i - 1].role == "user":
                out.append((list(conv[:i]), m.content))
    return out


def greedy_replies(session: ChatSession, prompts: Sequence[list[Message]],
                   progress: Callable[[int], None] = lambda i: None) -> list[str]:
    replies = []
    for i, history in enumerate(prompts):
        session.history = list(history[:-1])
        replies.append(session.reply(history[-1].content))
        progress(i)
    return replies


def bleu(session: ChatSession, convs: Sequence[Conversation], limit: int) -> dict[str, float]:
    import sacrebleu

    pairs = exchanges(convs)[:limit]
    if not pairs:
        return {}
    hyps = greedy_replies(session, [h for h, _ in pairs])
    return {"bleu": sacrebleu.corpus_bleu(hyps, [[r for _, r in pairs]]).score, "bleu_replies": len(pairs)}


def exact_match(session: ChatSession, items: Sequence[tuple[str, str | set[str]]]) -> float:
    """Share of single-turn prompts whose greedy reply equals the reference (or one of several)."""
    def norm(text: str) -> str:  # whitespace is not content: YAML answers often end in a newline
        return " ".join(text.split())

    replies = greedy_replies(session, [[Message("user", q)] for q, _ in items])
    hits = sum(norm(r) in {norm(x) for x in ([a] if isinstance(a, str) else a)} for r,
               (_, a) in zip(replies, items))
    return hits / max(len(items), 1)


def seen_prompts(convs: Sequence[Conversation], limit: int) -> list[tuple[str, set[str]]]:
    """First-turn prompts of training conversations with every reply they were given (chatterbot
    answers one prompt several ways, and any of them counts)."""
    answers: dict[str, set[str]] = defaultdict(set)
    for conv in convs:
        if len(conv) >= 2 and conv[0].role == "user" and conv[1].role == "assistant":
            answers[conv[0].content].add(conv[1].content)
    items = sorted(answers.items())
    return random.Random(0).sample(items, min(limit, len(items)))  # a fixed sample, not the alphabet's start


def chat_metrics(model: GPT, tokenizer: Tokenizer, template_name: str, train_convs: Sequence[Conversation],
                 val_convs: Sequence[Conversation], builtin: bool, limit: int = 200) -> dict[str, float]:
    """BLEU on held-out conversations; for the built-in corpus also exact-match accuracy on training
    prompts and on each skill, seen and held out."""
    greedy = SampleConfig(max_new_tokens=model.config.block_size // 2, temperature=0.0, top_k=None)
    session = ChatSession(model, tokenizer, TEMPLATES[template_name], greedy)
    out = bleu(session, val_convs, limit)
    if builtin:
        chatterbot = set(corpus.chatterbot_prompts())
        seen = seen_prompts(train_convs, 10**9)
        out["train_prompt_match_chatterbot"] = exact_match(session, [p for p in seen
                                                                     if p[0] in chatterbot][:limit])
        out["train_prompt_match_synthetic"] = exact_match(session, [p for p in seen
                                                                    if p[0] not in chatterbot][:limit])
        for skill in corpus.SKILLS:
            for held_out in (False, True):
                items = corpus.skill_items(skill, held_out)
                if items:
                    out[f"skill_{skill}_{'heldout' if held_out else 'seen'}"] = exact_match(session,
                                                                                            items[:limit])
    return out


def evaluate_run(ckpt: Checkpoint, data_path: str | None = None, batch_size: int = 16, limit: int = 200,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """What `tinygpt eval` reports: loss, perplexity and bits per byte on the run's val split (or on all of
    data_path, encoded with the run's tokenizer; a `tinygpt prepare` folder's val split); for chat runs also
    BLEU and, on the built-in corpus, skills."""
    tok = ckpt.tokenizer
    device = next(ckpt.model.parameters()).device
    if data_path:
        cfg = dataclasses.replace(ckpt.config, data=dataclasses.replace(ckpt.config.data, path=data_path,
                                                                        format="auto"))
        ds = prepare(cfg, log=log, tokenizer=tok)
        if ds.tokenizer.vocab_size > tok.vocab_size:
            raise TinyGPTError(f"{ckpt.home} was trained on plain text: its tokenizer lacks the chat markers "
                               f"that the conversations in {data_path} need; evaluate it on text")
        if (Path(data_path).expanduser() / "meta.json").is_file():  # a prepared dataset: its held-out split
            splits, convs = [ds.val], ds.conversations("val")
        else:
            splits, convs = [ds.train, ds.val], ds.conversations("train") + ds.conversations("val")
    elif ckpt.run_dir is None:
        raise UsageError(f"{ckpt.path} is a checkpoint outside a run directory, so it has no val split: "
                         "pass --data FILE to evaluate it on")
    else:
        ds = load_prepared(ckpt.run_dir / rundir.DATA)
        splits, convs = [ds.val], ds.conversations("val")
    total = LossSum()
    for split in splits:
        total += loss_over(ckpt.model, split, batch_size, device, packed=ds.packed, tokenizer=tok)
    result: dict[str, Any] = {"run": str(ckpt.home), "checkpoint": str(ckpt.path), "step": ckpt.step,
                              **loss_metrics(total)}
    if ds.packed:
        result.update(chat_metrics(ckpt.model, tok, ckpt.config.data.chat_template, ds.conversations("train"),
                                   convs, builtin=ds.meta.get("builtin", False) and not data_path,
                                   limit=limit))
    return result
