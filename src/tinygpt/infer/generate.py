"""Decoding: token sampling, the KV-cached decode loop, text streaming and generate().

Every entry point takes one SampleConfig (max_new_tokens, temperature, top_k, top_p), so a caller,
the chat session or a server request fills in one object instead of passing loose arguments.

Batch-1 decoding on a CPU is bound by memory bandwidth: every new token reads every weight once.
Two things keep the loop close to that bound (bench/generate.py measures them):

* the per-token work outside the model is a handful of small ops on preallocated buffers, and
  the stop check (which needs a device sync) only runs when there are stop ids;
* one-token steps run their linear layers through oneDNN's inner product where a one-time probe
  finds it faster than nn.Linear's MKL path (OneDNNLinears, infer/kernels.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from tinygpt.checkpoint import Checkpoint
from tinygpt.config import SampleConfig, sample_settings
from tinygpt.infer.cache import KVCache
from tinygpt.infer.kernels import OneDNNLinears
from tinygpt.model import GPT, eval_mode
from tinygpt.tokenizer import Tokenizer


def sample_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row of logits (B, V). temperature 0 is greedy."""
    if temperature < torch.finfo(torch.float32).tiny:  # 0, or so small that float32 makes it 0: greedy
        return logits.argmax(dim=-1)
    logits = logits.float()
    # shifted so that each row's largest logit is 0 before dividing: a tiny temperature (1e-300) then sends
    # the others to -inf, which is greedy, instead of overflowing every logit to inf and failing the softmax
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass; the first always stays.
        drop = probs.cumsum(dim=-1) - probs > top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


class TokenHistory:
    """The most recent tokens of each row, kept in a preallocated buffer.

    Appending writes one column in place instead of reallocating the whole sequence with
    torch.cat every step. The buffer holds twice the context, so when it fills up the newest
    `context` tokens are moved to its front once per `context` appends.
    """

    def __init__(self, prompt: torch.Tensor, context: int):
        prompt = prompt[:, -context:]
        self.context = context
        self.buf = torch.empty(prompt.size(0), 2 * context, dtype=prompt.dtype, device=prompt.device)
        self.buf[:, :prompt.size(1)] = prompt
        self.len = prompt.size(1)

    def append(self, tok: torch.Tensor) -> None:
        if self.len == self.buf.size(1):  # the two halves do not overlap, so the copy is safe
            self.buf[:, :self.context] = self.buf[:, self.context:]
            self.len = self.context
        self.buf[:, self.len] = tok
        self.len += 1

    def last(self, n: int) -> torch.Tensor:
        """A view of the newest min(n, len) tokens (B, <=n)."""
        return self.buf[:, max(0, self.len - n):self.len]

    def refill(self) -> torch.Tensor:
        """What a full cache is rebuilt from, the context policy of both decode loops: a sequence sees its
        newest `context` tokens, and when its cache fills up the cache restarts from the newest context // 2
        of them (the latest included), so re-reading the context costs one prefill per context // 2 tokens."""
        return self.last(self.context // 2)


def decoding() -> torch.inference_mode:
    """The autograd mode of every decode step: inference mode skips the version counters and view tracking
    that no_grad still keeps, which took ~0.5 ms of a 10M model's ~8 ms token on a 2-core AMD EPYC (AVX2).
    Tensors made in it (the cache, the tokens) can be read anywhere but only written to inside it."""
    return torch.inference_mode()


def stream_tokens(model: GPT, idx: torch.Tensor, sampling: SampleConfig, stop_ids: Sequence[int] = (),
                  generator: torch.Generator | None = None, use_cache: bool = True) -> Iterator[torch.Tensor]:
    """Yield one (B,) tensor of new tokens per step (at most sampling.max_new_tokens), stopping early once
    every row has emitted a stop id. Without the cache every step reads the newest block_size tokens; with
    it, a full cache is rebuilt as TokenHistory.refill says.
    """
    block, steps = model.config.block_size, sampling.max_new_tokens
    with eval_mode(model):
        with decoding():
            history = TokenHistory(idx, block)
            cache = KVCache.for_model(model, idx.size(0)) if use_cache else None
            logits = model.next_logits(history.last(block), cache)
            # Checking for stop ids reads a flag back from the device; without stop ids there is nothing to
            # check.
            stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long,
                                device=idx.device) if stop_ids else None
            done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
            tok = sample_token(logits, sampling.temperature, sampling.top_k, sampling.top_p, generator)
        one_token_step = OneDNNLinears(model)
        for step in range(steps):
            yield tok  # outside inference mode: the caller's code between two tokens runs in its own mode
            if step == steps - 1:
                return
            with decoding():  # entered once per token: the step below and the next token's sampling
                if stop is not None:
                    done |= torch.isin(tok, stop)
                    if bool(done.all()):
                        return
                history.append(tok)
                if cache is None:
                    logits = model.next_logits(history.last(block), None)
                elif cache.pos < block:
                    with one_token_step:
                        logits = model.next_logits(tok[:, None], cache)
                else:
                    cache.pos = 0
                    logits = model.next_logits(history.refill(), cache)
                tok = sample_token(logits, sampling.temperature, sampling.top_k, sampling.top_p, generator)

class TextPieces:
    """The text of a growing list of token ids, released piece by piece as it becomes final.

    Text is held back while it ends inside a UTF-8 character (a byte-level BPE token can end mid-character)
    or with what could be the start of a stop string; it ends where a stop string begins, which is then
    never shown. With strip, leading and trailing whitespace is left out (a chat reply's); with skip_special,
    special tokens (<|end|>, which a server's ignore_eos generates through) are not text.

    The work per token does not grow with the text: a push decodes the unread tokens after the ones read last
    (their context: sentencepiece drops a leading space without it) and looks for stop strings in the text not
    yet shown only, as one never begins in shown text (where one could begin, the text is held back)."""

    def __init__(self, tokenizer: Tokenizer, stop_strings: Sequence[str] = (), strip: bool = False,
                 skip_special: bool = False):
        self.tokenizer, self.stops, self.strip = tokenizer, [s for s in stop_strings if s], strip
        self.skipped = frozenset(tokenizer.special_tokens.values()) if skip_special else frozenset()
        self.ids: list[int] = []  # every token pushed
        self.stopped = False  # a stop string was found: the text is complete
        self._pieces: list[str] = []  # the text released so far
        self._text_ids: list[int] = []  # the pushed tokens that are text
        self._context, self._read = 0, 0  # of _text_ids: [:_read] are read, [_context:_read] were read last
        self._held = ""  # text read but not yet released

    @property
    def shown(self) -> str:
        """All the text released so far."""
        return "".join(self._pieces)

    def push(self, ids: Sequence[int]) -> str:
        """Add tokens; returns the newly final text (may be empty)."""
        self.ids.extend(ids)
        self._text_ids.extend(i for i in ids if i not in self.skipped)
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text once generation has ended."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        ids = self._text_ids
        context = self.tokenizer.decode(ids[self._context:self._read])
        new = self.tokenizer.decode(ids[self._context:])[len(context):]
        text = self._held + new
        if self.strip and not self._pieces:
            text = text.lstrip()
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            text, final, self.stopped = text[:cut], True, True
        elif new.endswith("\ufffd") and not final:
            return ""  # the newest token ends inside a character: read it again with the next one
        self._context, self._read = self._read, len(ids)
        if final:
            piece, self._held = text.rstrip() if self.strip else text, ""
        else:
            keep = len(text) - self._unsettled(text)
            piece, self._held = text[:keep], text[keep:]
        if piece:
            self._pieces.append(piece)
        return piece

    def _unsettled(self, text: str) -> int:
        """How many trailing characters may still change: a stop string's start, or a reply's final spaces."""
        held = max((starts_with_end(s, text) for s in self.stops), default=0)
        if self.strip:
            held = max(held, len(text) - len(text.rstrip()))
        return held


def starts_with_end(stop: str, text: str) -> int:
    """The length of the longest proper prefix of `stop` that `text` ends with (0 if none). Only prefixes that
    end in text's last character are compared, so a long stop string costs a few comparisons, not one for
    each of its prefixes at every token (which stalled a server for seconds, issue #25)."""
    end = min(len(stop) - 1, len(text))
    while text and end > 0:
        end = stop.rfind(text[-1], 0, end) + 1
        if end and text.endswith(stop[:end]):
            return end
        end -= 1
    return 0


def stream_text(model: GPT, tokenizer: Tokenizer, prompt_ids: list[int], sampling: SampleConfig,
                generator: torch.Generator | None = None,
                stop_ids: Sequence[int] | None = None) -> Iterator[str]:
    """Yield the text of a single sample piece by piece, stopping before a stop id (default: end-of-text)."""
    stops = set(stop_ids) if stop_ids is not None else {tokenizer.eot_id}
    device = next(model.parameters()).device
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    text = TextPieces(tokenizer)
    for tok in stream_tokens(model, idx, sampling, stop_ids=sorted(stops), generator=generator):
        t = int(tok[0])
        if t in stops:
            break
        if piece := text.push([t]):
            yield piece
    if piece := text.finish():
        yield piece


def generate_ids(model: GPT, idx: torch.Tensor, sampling: SampleConfig,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """idx (B, T) followed by sampling.max_new_tokens sampled tokens (nanoGPT's generate)."""
    new = list(stream_tokens(model, idx, sampling, generator=generator))
    return torch.cat([idx, *(t[:, None] for t in new)], dim=1)


def seeded_generator(model: torch.nn.Module, seed: int | None) -> torch.Generator:
    """A generator on the model's device, seeded with `seed` (or a fresh random seed)."""
    g = torch.Generator(device=next(model.parameters()).device)
    g.manual_seed(seed if seed is not None else torch.seed())
    return g


def prompt_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """A prompt's ids (special tokens written out count as such); an empty prompt starts from end-of-text."""
    return tokenizer.encode(prompt, allow_special=True) if prompt else [tokenizer.eot_id]


def generate(run: Checkpoint, prompt: str = "", sampling: SampleConfig | None = None, seed: int | None = None,
             **settings: Any) -> str:
    """The text a loaded run writes after `prompt` (without the prompt), up to end-of-text.

    Sampling settings default to the run's own (its config's sample section); `sampling` replaces them,
    and keyword settings (max_new_tokens=20, temperature=0, top_k, top_p) change single fields."""
    chosen = dataclasses.replace(sampling or run.config.sample)
    sample_settings(chosen, settings)
    pieces = stream_text(run.model, run.tokenizer, prompt_ids(run.tokenizer, prompt), chosen,
                         seeded_generator(run.model, seed))
    return "".join(pieces)
