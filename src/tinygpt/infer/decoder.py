"""Continuous batching: many generations stepped through one model together, each in its own cache row.

A decode step on a CPU is bound by reading the weights, and a step over n sequences reads them once, not n
times, so n concurrent requests cost little more than one. Sequences join (their prompt is prefilled into a
free row) and leave (at a stop id, at their token limit, or when cancelled) between steps, so nobody waits
for the longest request of a batch. Each generation keeps its own sampling settings and random generator.

One BatchDecoder is meant to be driven by one thread: it swaps the model's layer implementations around each
step (OneDNNLinears), so two threads decoding with the same model at once would corrupt each other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from tinygpt.config import SampleConfig
from tinygpt.errors import TinyGPTError
from tinygpt.infer.cache import SlotCache
from tinygpt.infer.generate import TextPieces, TokenHistory, decoding, sample_token
from tinygpt.infer.kernels import OneDNNLinears
from tinygpt.model import GPT
from tinygpt.tokenizer import Tokenizer


@dataclass(eq=False)
class Generation:
    """One sequence being generated: its prompt and settings, the tokens made so far and why it ended.

    Generations that share a `group` (e.g. the n choices of one request) are sampled in one call with the
    first one's settings and generator, so together they are reproducible from one seed."""

    prompt: list[int]
    sampling: SampleConfig
    stop_ids: frozenset[int] = frozenset()
    generator: torch.Generator | None = None
    group: object | None = None
    tokens: list[int] = field(default_factory=list)  # without the stop id that ended it
    # "stop": a stop id or a caller's stop; "length": sampling.max_new_tokens; "error": see `error`
    finish_reason: str | None = None
    error: str | None = None  # why this generation alone failed (its scores were not finite, ...)
    cancelled: bool = False  # set from any thread; the decoder drops the generation before its next step
    row: int = -1  # the cache row while active
    logits: torch.Tensor | None = None  # (1, vocab) scores for the next token
    history: TokenHistory | None = None


class BatchDecoder:
    """Steps the active generations (at most `slots`) through `model` together; see the module docstring.

    Context policy, as in stream_tokens: a generation sees its most recent block_size tokens, and a full row
    is rebuilt as TokenHistory.refill says."""

    def __init__(self, model: GPT, slots: int):
        self.model = model.eval()  # the decoder owns the model while it lives: no dropout
        self.cache = SlotCache.for_model(model, slots)
        self.active: list[Generation] = []
        self.one_token_step = OneDNNLinears(model)

    @property
    def free(self) -> int:
        return len(self.cache.lengths) - len(self.active)

    @decoding()
    def add(self, gens: list[Generation]) -> None:
        """Prefill the prompts (at least one token each; after the tokens made so far, for a generation added
        again) into free rows, in one forward pass; their next tokens are sampled at the next step. Prompts of
        different lengths are padded at the end: a padded position lies past its row's length, so it is never
        attended to and the row's next tokens overwrite it. If the pass fails, none of gens is active."""
        if len(gens) > self.free:
            raise RuntimeError(f"{len(gens)} generations for {self.free} free cache rows")  # callers check
        block, device, first = self.model.config.block_size, self.cache.k.device, len(self.active)
        for row, g in enumerate(gens, start=first):
            so_far = torch.tensor([g.prompt + g.tokens], dtype=torch.long, device=device)
            g.history = TokenHistory(so_far, block)
            g.row = row
        try:
            self._prefill_rows(gens, first)
        except Exception:
            for g in gens:
                g.row, g.history, g.logits = -1, None, None
            raise
        self.active.extend(gens)

    def _prefill_rows(self, gens: list[Generation], first: int) -> None:
        block, device = self.model.config.block_size, self.cache.k.device
        if len(gens) == 1:  # alone: exactly the single-sequence computation
            gens[0].logits = self._prefill(gens[0], gens[0].history.last(block))
            return
        prompts = [g.history.last(block)[0] for g in gens]
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        ids = torch.nn.utils.rnn.pad_sequence(prompts, batch_first=True)
        self.cache.rows = slice(first, first + len(gens))
        for g in gens:
            self.cache.lengths[g.row] = 0
        hidden = self.model.hidden(ids, self.cache)
        logits = self.model.logits(hidden[torch.arange(len(gens), device=device), lengths - 1])
        for i, g in enumerate(gens):
            self.cache.lengths[g.row] = len(prompts[i])
            g.logits = logits[i:i + 1]

    def _prefill(self, gen: Generation, ids: torch.Tensor) -> torch.Tensor:
        self.cache.lengths[gen.row] = 0
        self.cache.rows = slice(gen.row, gen.row + 1)
        return self.model.next_logits(ids, self.cache)

    def remove(self, gen: Generation) -> None:
        """Free gen's row; the last active generation moves into it, so the active rows stay 0..n-1."""
        last = self.active.pop()
        if last is not gen:
            self.cache.move(last.row, gen.row)
            last.row = gen.row
            self.active[gen.row] = last
        gen.row, gen.logits, gen.history = -1, None, None

    @decoding()
    def step(self) -> list[Generation]:
        """Drop cancelled generations, sample one token for each active one, and run the model once over those
        that go on. Returns the generations that ended at this step (no longer active)."""
        ended = [g for g in self.active if g.cancelled]
        for g in ended:
            self.remove(g)
        self._sample()
        finished = [g for g in self.active if g.finish_reason is not None]
        for g in finished:
            self.remove(g)
        if self.active:
            self._forward()
        return ended + finished

    def _sample(self) -> None:
        """One token for each active generation, group by group. A group's own settings or scores can only
        fail that group: its generations end with an error, and the others go on."""
        groups: dict[int, list[Generation]] = {}
        for g in self.active:
            groups.setdefault(id(g.group if g.group is not None else g), []).append(g)
        for gens in groups.values():
            s = gens[0].sampling
            logits = torch.cat([g.logits for g in gens]) if len(gens) > 1 else gens[0].logits
            try:
                if not bool(torch.isfinite(logits).all()):
                    raise ValueError("the model's scores for the next token were not finite numbers")
                tokens = sample_token(logits, s.temperature, s.top_k, s.top_p, gens[0].generator).tolist()
            except (RuntimeError, ValueError) as e:
                for g in gens:
                    g.finish_reason, g.error = "error", f"sampling failed: {e}"
                continue
            for g, tok in zip(gens, tokens):
                if tok in g.stop_ids:
                    g.finish_reason = "stop"
                    continue
                g.tokens.append(tok)
                if len(g.tokens) >= g.sampling.max_new_tokens:
                    g.finish_reason = "length"

    def _forward(self) -> None:
        block = self.model.config.block_size
        device = self.cache.k.device
        newest = torch.tensor([[g.tokens[-1]] for g in self.active], dtype=torch.long, device=device)
        for g, tok in zip(self.active, newest):
            g.history.append(tok)
            if self.cache.lengths[g.row] == block:  # full: refill all but the newest token, fed below
                keep = g.history.refill()[:, :-1]
                self.cache.lengths[g.row] = 0
                if keep.numel():
                    self._prefill(g, keep)
        self.cache.rows = slice(0, len(self.active))
        with self.one_token_step:
            logits = self.model.next_logits(newest, self.cache)
        for i, g in enumerate(self.active):
            g.logits = logits[i:i + 1]


def sample_texts(model: GPT, tokenizer: Tokenizer, prompt: list[int], sampling: SampleConfig, n: int,
                 generator: torch.Generator | None = None, on_piece: Callable[[int, str], None] = lambda i,
                 s: None,
                 max_batch: int = 16) -> list[str]:
    """n samples of the text after `prompt`; see complete_texts. All share `generator`, so a seed gives the
    same n texts again."""
    return complete_texts(model, tokenizer, [prompt] * n, sampling, (), generator, on_piece, max_batch)


def complete_texts(model: GPT, tokenizer: Tokenizer, prompts: list[list[int]], sampling: SampleConfig,
                   stop_strings: Sequence[str] = (), generator: torch.Generator | None = None,
                   on_piece: Callable[[int, str], None] = lambda i, s: None,
                   max_batch: int = 16) -> list[str]:
    """The text after each prompt, decoded together (at most max_batch at a time, the next one joining as one
    ends), each up to end-of-text, a stop string (left out) or sampling.max_new_tokens. All are sampled as one
    group from `generator`. on_piece(i, text) sees text i as it becomes final."""
    decoder = BatchDecoder(model, min(len(prompts), max_batch))
    group = object()
    gens = [Generation(p, sampling, frozenset({tokenizer.eot_id}), generator, group) for p in prompts]
    texts = [TextPieces(tokenizer, stop_strings) for _ in gens]
    waiting = list(range(len(prompts)))
    while waiting or decoder.active:
        joining, waiting = waiting[:decoder.free], waiting[decoder.free:]
        if joining:
            decoder.add([gens[i] for i in joining])
        seen = [len(g.tokens) for g in gens]
        ended = decoder.step()
        for i, g in enumerate(gens):
            if g in ended and g.error:
                raise TinyGPTError(f"text {i + 1} of {len(gens)} failed: {g.error}")
            if piece := texts[i].push(g.tokens[seen[i]:]):
                on_piece(i, piece)
            if texts[i].stopped:  # a stop string: this text is complete, its row can go
                g.cancelled = True
            if (g in ended or texts[i].stopped) and (piece := texts[i].finish()):
                on_piece(i, piece)
    return [t.shown for t in texts]
