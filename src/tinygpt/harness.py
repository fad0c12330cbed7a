"""Standard benchmarks (HellaSwag, ARC, LAMBADA, ...) through EleutherAI's lm-evaluation-harness, on a
run's own model and tokenizer: `tinygpt eval --tasks ...`.

TinyGPTLM is the harness's model interface over a loaded run, so nothing is converted to transformers and
every tokenizer kind works. It computes what the harness's own `hf` model computes (tests/test_harness.py
checks the two against each other on an exported run):

* loglikelihood(context, continuation): the continuation's tokens are the whole text's after the context's
  (tokenized in context), with the context's trailing whitespace moved onto the continuation, and an empty
  context read as end-of-text; inputs longer than the context window keep their newest tokens.
* loglikelihood_rolling(text): the text in disjoint windows of block_size tokens, each seen with as much of
  what precedes it as fits (the harness's own windowing).
* generate_until: greedy (or sampled) continuations that end at a stop string, end-of-text or max_gen_toks,
  decoded together in one batch as `tinygpt sample` decodes (infer.decoder.complete_texts).

A character-level run cannot read characters it never saw: they are left out of a context, and a continuation
holding one gets log-likelihood -inf (the model can never write it).

Multiple-choice accuracy: `acc` picks the choice of highest log-likelihood; `acc_norm` divides each by the
choice's length in characters (not tokens), so it does not depend on the tokenizer. llm.c and nanoGPT score
HellaSwag by the mean log-likelihood per token of the ending (choice_scores gives all three).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from tinygpt import rundir
from tinygpt.checkpoint import Checkpoint
from tinygpt.config import SampleConfig
from tinygpt.errors import TinyGPTError, UsageError
from tinygpt.infer.cache import SlotCache
from tinygpt.infer.decoder import complete_texts
from tinygpt.infer.generate import decoding, seeded_generator
from tinygpt.run import trained_template

try:
    from lm_eval.api.model import LM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # an extra: the one line a user needs
    raise TinyGPTError(f"tinygpt eval --tasks needs lm-evaluation-harness ({e.name} is missing): "
                       "pip install 'tinygpt[eval]'") from None

Pair = tuple[list[int], list[int]]


class TinyGPTLM(LM):
    """The harness's model interface over a loaded run; see the module docstring."""

    def __init__(self, ckpt: Checkpoint, batch_size: int = 16, progress: bool = True):
        super().__init__()  # the harness's rank and world size (one process)
        self.ckpt, self.model, self.tok = ckpt, ckpt.model.eval(), ckpt.tokenizer
        self.block = ckpt.config.model.block_size
        self._device = next(self.model.parameters()).device  # the base class's `device`
        self.template = trained_template(ckpt)
        self.batch_size, self.progress = batch_size, progress
        self.chat = False  # prompts come in the chat template: a reply then also ends at its markers
        self._known: dict[str, bool] = {}
        self._cache: SlotCache | None = None  # batch_size rows, made at the first shared context

    # ---------------------------------------------------------------- text to tokens

    def readable(self, text: str) -> str:
        """text without the characters this run's tokenizer cannot encode (only a char tokenizer has any)."""
        try:
            self.tok.encode(text)
            return text
        except TinyGPTError:
            return "".join(c for c in text if self._knows(c))

    def _knows(self, c: str) -> bool:
        if c not in self._known:
            try:
                self._known[c] = bool(self.tok.encode(c))
            except TinyGPTError:
                self._known[c] = False
        return self._known[c]

    def encode(self, text: str) -> list[int]:
        """Ids as `tinygpt sample` reads a prompt: special tokens written out (a chat template's) count."""
        return self.tok.encode(self.readable(text), allow_special=True)

    def pair(self, context: str, continuation: str) -> Pair | None:
        """(context ids, continuation ids) on the harness's boundary, or None where the continuation holds a
        character the tokenizer cannot encode."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if self.readable(continuation) != continuation:
            return None
        if not context:
            return [self.tok.eot_id], self.encode(continuation)
        ctx = self.encode(context)
        return ctx, self.encode(self.readable(context) + continuation)[len(ctx):]

    # ---------------------------------------------------------------- scores

    @decoding()
    def score(self, pairs: Sequence[Pair], what: str = "scoring") -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, whether each of its tokens was the most likely) for
        each pair. Continuations of one context (a question's choices) share one pass over it, through the
        KV cache; the rest go batch_size at a time (see _score_whole). An empty continuation scores 0."""
        out: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        shared, alone = self._share(pairs)
        bar = tqdm(total=len(pairs), desc=what, unit="seq", disable=not self.progress or not pairs)
        batch: list[list[int]] = []
        for group in [*shared, []]:  # the empty group scores the last batch
            if batch and (not group or sum(map(len, batch)) + len(group) > self.batch_size):
                for i, scored in zip((i for g in batch for i in g), self._score_shared(pairs, batch)):
                    out[i] = scored
                bar.update(sum(map(len, batch)))
                batch = []
            batch.append(group)
        alone.sort(key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))  # like lengths share a batch
        for start in range(0, len(alone), self.batch_size):
            rows = alone[start:start + self.batch_size]
            for i, scored in zip(rows, self._score_whole([pairs[i] for i in rows])):
                out[i] = scored
            bar.update(len(rows))
        bar.close()
        return out

    def _share(self, pairs: Sequence[Pair]) -> tuple[list[list[int]], list[int]]:
        """Pairs grouped by context where two or more continuations share one (in groups of at most
        batch_size) and all fit the context window behind it; the other pairs' indices (empty continuations
        in neither)."""
        by_context: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, cont) in enumerate(pairs):
            if cont:  # nothing to score otherwise
                by_context.setdefault(tuple(ctx), []).append(i)
        shared, alone = [], []
        for ctx, members in by_context.items():
            fits = len(ctx) + max(len(pairs[i][1]) for i in members) - 1 <= self.block
            if len(members) < 2 or not fits or self.batch_size < 2:
                alone += members
                continue
            shared += [members[a:a + self.batch_size] for a in range(0, len(members), self.batch_size)]
        return shared, alone

    def _score_shared(self, pairs: Sequence[Pair], groups: list[list[int]]) -> list[tuple[float, bool]]:
        """Each group's context once (padded into rows 0..G-1 of the cache), copied into a row per
        continuation, then all continuations in one pass. Results in the order of the groups' members."""
        if self._cache is None:
            self._cache = SlotCache.for_model(self.model, self.batch_size)
        cache, device = self._cache, self.device
        contexts = [torch.tensor(pairs[g[0]][0], device=device) for g in groups]
        cache.rows = slice(0, len(groups))
        cache.lengths[:len(groups)] = [0] * len(groups)
        hidden = self.model.hidden(torch.nn.utils.rnn.pad_sequence(contexts, batch_first=True), cache)
        ends = torch.tensor([len(c) - 1 for c in contexts], device=device)
        last = hidden[torch.arange(len(groups), device=device), ends]  # (G, C): predicts each first token
        firsts = [sum(map(len, groups[:g])) for g in range(len(groups))]
        for g in reversed(range(len(groups))):  # backwards: a context is copied before its row is overwritten
            rows, n = slice(firsts[g], firsts[g] + len(groups[g])), len(contexts[g])
            cache.k[:, rows, :, :n] = cache.k[:, g:g + 1, :, :n]
            cache.v[:, rows, :, :n] = cache.v[:, g:g + 1, :, :n]
            cache.lengths[rows] = [n] * len(groups[g])
        conts = [pairs[i][1] for g in groups for i in g]
        cache.rows = slice(0, len(conts))
        rest = max(map(len, conts)) - 1
        if rest:
            ids = torch.zeros(len(conts), rest, dtype=torch.long, device=device)
            for r, c in enumerate(conts):
                ids[r, :len(c) - 1] = torch.tensor(c[:-1])
            more = self.model.hidden(ids, cache)  # the rest of each continuation
        group_of = [g for g, members in enumerate(groups) for _ in members]
        states = [last[group_of[r]][None] for r in range(len(conts))]  # each predicts its first token
        if rest:
            states = [torch.cat([state, more[r, :len(c) - 1]])
                      for r, (state, c) in enumerate(zip(states, conts))]
        return self._continuation_scores(states, conts)

    def _score_whole(self, pairs: Sequence[Pair]) -> list[tuple[float, bool]]:
        """Each pair as one padded row (padding at the end, which no earlier position attends to); an input
        longer than the context window keeps its newest block_size + 1 tokens."""
        seqs = [(ctx + cont)[-(self.block + 1):] for ctx, cont in pairs]
        ids = torch.zeros(len(seqs), max(map(len, seqs)) - 1, dtype=torch.long, device=self.device)
        for r, s in enumerate(seqs):
            ids[r, :len(s) - 1] = torch.tensor(s[:-1])
        hidden = self.model.hidden(ids)
        conts = [s[-min(len(cont), len(s) - 1):] for (_, cont), s in zip(pairs, seqs)]
        return self._continuation_scores([hidden[r, len(s) - 1 - len(c):len(s) - 1]
                                          for r, (s, c) in enumerate(zip(seqs, conts))], conts)

    def _continuation_scores(self, states: list[torch.Tensor],
                             conts: list[list[int]]) -> list[tuple[float, bool]]:
        """Scores from the hidden states that predict each continuation's tokens. Only these go through the
        head: with GPT-2's 50,257 rows the head is most of a small model's work."""
        logprobs = F.log_softmax(self.model.logits(torch.cat(states)).double(), dim=-1)
        out, at = [], 0
        for c in conts:
            got, want = logprobs[at:at + len(c)], torch.tensor(c, device=self.device)
            out.append((got.gather(1, want[:, None]).sum().item(), bool((got.argmax(1) == want).all())))
            at += len(c)
        return out

    def score_pairs(self, pairs: Sequence[Pair | None], what: str = "scoring") -> list[tuple[float, bool]]:
        """score, where a pair that is None (a continuation the tokenizer cannot write) gets -inf."""
        scored = iter(self.score([p for p in pairs if p is not None], what))
        return [next(scored) if p is not None else (float("-inf"), False) for p in pairs]

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self.score_pairs([self.pair(*r.args) for r in requests], "loglikelihood")

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        windows = [[make_disjoint_window(w) for w in get_rolling_token_windows(
            token_list=self.encode(r.args[0]), prefix_token=self.tok.eot_id, max_seq_len=self.block,
            context_len=1)] for r in requests]
        scored = iter(self.score([w for ws in windows for w in ws], "rolling loglikelihood"))
        return [sum(next(scored)[0] for _ in ws) for ws in windows]

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Requests with the same settings are decoded together, batch_size at a time."""
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
        out = [""] * len(requests)
        for key, members in tqdm(groups.items(), desc="generate_until", disable=not self.progress):
            settings = json.loads(key)
            until = settings.get("until") or []
            sampling = SampleConfig(max_new_tokens=int(settings.get("max_gen_toks", 256)), top_k=None,
                                    temperature=float(settings.get("temperature", 0.0))
                                    if settings.get("do_sample") else 0.0)
            prompts = [self.encode(requests[i].args[0]) or [self.tok.eot_id] for i in members]
            stops = ([until] if isinstance(until, str) else list(until)) + (
                self.template.stop_strings if self.chat and self.template else [])
            texts = complete_texts(self.model, self.tok, prompts, sampling, stops,
                                   seeded_generator(self.model, settings.get("seed", 1234)),
                                   max_batch=self.batch_size)
            for i, text in zip(members, texts):
                out[i] = text
        return out

    # ---------------------------------------------------------------- chat runs

    @property
    def tokenizer_name(self) -> str:
        return self.ckpt.home.name

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        if self.template is None:
            raise UsageError(f"{self.ckpt.home} was trained on plain text: it has no chat template to apply")
        return self.template.text(chat_history, open_reply=add_generation_prompt)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.template.jinja() if self.template else None


def choice_scores(lm: TinyGPTLM, context: str, choices: Sequence[str],
                  delimiter: str = " ") -> dict[str, list]:
    """A multiple-choice item scored three ways: the log-likelihood of each choice after the context (the
    harness's acc takes its argmax), divided by the choice's characters (its acc_norm) and by the choice's
    tokens (llm.c's and nanoGPT's HellaSwag score, whose argmax they call acc_norm)."""
    pairs = [lm.pair(context, delimiter + c) for c in choices]
    sums = [total for total, _ in lm.score_pairs(pairs)]
    return {"sum": sums, "per_char": [s / len(c) for s, c in zip(sums, choices)],
            "per_token": [s / len(p[1]) if p is not None else s for s, p in zip(sums, pairs)]}


# ---------------------------------------------------------------- the tasks and the results

@functools.lru_cache(maxsize=4)
def task_manager(tasks: tuple[str, ...], include_path: str | None) -> Any:
    """The harness's task index: only the user's own tasks when they name them all (indexing the ~14,000
    built-in names takes seconds); a name found in neither is a one-line refusal. Kept, so that checking the
    names before loading a model costs nothing later."""
    from lm_eval.tasks import TaskManager

    for defaults in (False, True):
        if include_path is None and not defaults:
            continue
        manager = TaskManager(include_path=include_path, include_defaults=defaults)
        unknown = [t for t in tasks if t not in manager.all_tasks and not Path(t).is_file()]
        if not unknown:
            return manager
    where = f" or in {include_path}" if include_path else ""
    raise UsageError(f"unknown task {', '.join(map(repr, unknown))}: not one of lm-evaluation-harness's "
                     f"tasks{where}; `lm-eval ls tasks` lists their names, --include-path DIR adds your own")


def run_tasks(ckpt: Checkpoint, tasks: Sequence[str], limit: int | None = None,
              num_fewshot: int | None = None, batch_size: int = 16, include_path: str | None = None,
              chat: bool | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Evaluate a loaded run on the harness's tasks; returns {task: {metric: value}} with the settings, and
    saves it in the run directory's eval/ (when the checkpoint is in one)."""
    import lm_eval

    manager = task_manager(tuple(tasks), include_path)
    lm = TinyGPTLM(ckpt, batch_size)
    lm.chat = chat = lm.template is not None if chat is None else chat
    how = "with" if chat else "without"
    log(f"evaluating {ckpt.home.name} on {', '.join(tasks)} ({how} its chat template)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                          num_fewshot=num_fewshot, apply_chat_template=chat,
                                          log_samples=False)
    except OSError as e:  # the Hub out of reach, most often (ConnectionError is an OSError)
        raise TinyGPTError(f"the tasks' data could not be loaded: {str(e).splitlines()[0]}; offline, "
                           "write the task with a local data file and pass --include-path "
                           "(docs/evaluation.md)") from None
    summary = {"run": str(ckpt.home), "checkpoint": str(ckpt.path), "step": ckpt.step,
               "settings": {"limit": limit, "num_fewshot": num_fewshot, "chat_template": chat},
               "results": {task: {k.replace(",none", ""): v for k, v in metrics.items() if "," in k}
                           for task, metrics in results["results"].items()},
               "samples": {task: n["effective"] for task, n in results.get("n-samples", {}).items()}}
    if ckpt.run_dir is not None:
        summary["saved"] = str(save(ckpt.run_dir, summary))
    return summary


def save(run_dir: Path, summary: dict[str, Any]) -> Path:
    out = run_dir / rundir.EVAL / f"tasks-{datetime.now().strftime('%Y%m%d-%H%M%S-%f')}.json"
    out.parent.mkdir(exist_ok=True)
    with rundir.atomic_file(out) as tmp:
        tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return out


def quiet_logging() -> None:
    """The harness logs each step at INFO; a user wants the progress bars, the warnings and the table."""
    import logging

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
