"""Decoding: token sampling, the KV-cached decode loop, text streaming and generate().

Every entry point takes one SampleConfig (max_new_tokens, temperature, top_k, top_p), so a caller,
the chat session or a server request fills in one object instead of passing loose arguments.

Batch-1 decoding on a CPU is bound by memory bandwidth: every new token reads every weight once.
Two things keep the loop close to that bound (bench/generate.py measures them):

* the per-token work outside the model is a handful of small ops on preallocated buffers, and
  the stop check (which needs a device sync) only runs when there are stop ids;
* one-token steps run their linear layers through oneDNN's inner product where a one-time timing
  finds it faster than nn.Linear's MKL path (twice as fast on an AMD EPYC, slower on an Intel Xeon
  with AVX-512); see OneDNNLinears.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from tinygpt.checkpoint import Checkpoint
from tinygpt.config import SampleConfig, sample_settings
from tinygpt.device import fastest_seconds, streamed_copies
from tinygpt.infer.cache import KVCache
from tinygpt.model import GPT, eval_mode
from tinygpt.tokenizer import Tokenizer


def sample_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row of logits (B, V). temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
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


@functools.cache
def onednn_linear_works() -> bool:
    """Whether this PyTorch build has oneDNN's fused linear op and it agrees with F.linear.

    The op (torch.ops.mkldnn._linear_pointwise, which Inductor's CPU backend emits for linear layers)
    is not public API, so it is probed once, and without it the decode loop keeps nn.Linear."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        g = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*shape, generator=g) for shape in ((1, 16), (8, 16), (8,)))
        y = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        return bool(torch.allclose(y, F.linear(x, w, b), atol=1e-5))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


@functools.cache
def onednn_is_faster() -> bool:
    """Whether oneDNN's inner product computes one-row products with large float32 weights streamed from memory
    faster than F.linear on this machine (timed once, ~0.2 s). It streamed them 1.5-2x as fast on AMD EPYCs with
    AVX2, and was 0.85x as fast on an Intel Xeon with AVX-512, where the whole 124M decode went 34 -> 39 tok/s
    without it. Timed over weights that together exceed the cache, as a decode step reads them: one weight
    sitting in cache favoured F.linear on an EPYC where oneDNN streamed 11.5 GB/s from memory against its 7.4."""
    g = torch.Generator().manual_seed(0)
    weights, x = streamed_copies(torch.randn(2048, 1024, generator=g)), torch.randn(1, 1024, generator=g)

    def one_pass(linear: Callable) -> float:
        return fastest_seconds(lambda: [linear(w) for w in weights], calls=2, repeats=3)

    onednn = one_pass(lambda w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""))
    return onednn < 0.95 * one_pass(lambda w: F.linear(x, w))


class OneDNNLinears:
    """While active, the model's float32 CPU nn.Linear layers compute single-row inputs with oneDNN.

    A one-token decode step multiplies one row by each weight matrix, a matrix-vector product that
    only has to stream the weight from memory. oneDNN's inner product does that at close to the
    machine's read bandwidth straight from the weight as stored (no copy, no repacking), while the
    BLAS path behind nn.Linear reached about half of it on the CPU measured. The result agrees with
    F.linear to float32 rounding (the sums run in a different order).

    Only weights of at least MIN_WEIGHT_ELEMENTS take this path: a oneDNN call costs ~30 us more to
    set up, which only pays where streaming the weight takes longer than that (about 1 MB and up,
    measured on a 2-core AMD EPYC; below that, and for weights small enough to stay in cache,
    nn.Linear is faster).

    Installed around each decode step only, as an instance attribute that shadows Linear.forward,
    so the model is untouched whenever the generator is suspended. Other inputs (several rows,
    autocast, other dtypes) take F.linear exactly as before.
    """

    MIN_WEIGHT_ELEMENTS = 1 << 18  # 1 MiB of float32

    def __init__(self, model: torch.nn.Module):
        self.forwards: dict[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]] = {}
        if not onednn_linear_works() or not onednn_is_faster():
            return
        for module in model.modules():
            w = module.weight if type(module) is torch.nn.Linear else None
            if (w is not None and w.device.type == "cpu" and w.dtype == torch.float32 and w.is_contiguous()
                    and w.numel() >= self.MIN_WEIGHT_ELEMENTS
                    and "forward" not in vars(module)):  # leave a forward someone else replaced alone
                self.forwards[module] = functools.partial(_single_row_linear, module)

    def __enter__(self) -> OneDNNLinears:
        for module, forward in self.forwards.items():
            vars(module)["forward"] = forward  # a plain dict write: nn.Module.__setattr__ is slower
        return self

    def __exit__(self, *exc: object) -> None:
        for module in self.forwards:
            vars(module).pop("forward", None)


def _single_row_linear(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if x.numel() == x.size(-1) and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu"):
        return torch.ops.mkldnn._linear_pointwise(x, module.weight, module.bias, "none", [], "")
    return F.linear(x, module.weight, module.bias)


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
            # Checking for stop ids reads a flag back from the device; without stop ids there is nothing to check.
            stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=idx.device) if stop_ids else None
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
    never shown. With strip, leading and trailing whitespace is left out (a chat reply's).

    The work per token does not grow with the text: a push decodes the unread tokens after the ones read last
    (their context: sentencepiece drops a leading space without it) and looks for stop strings in the text not
    yet shown only, as one never begins in shown text (where one could begin, the text is held back)."""

    def __init__(self, tokenizer: Tokenizer, stop_strings: Sequence[str] = (), strip: bool = False):
        self.tokenizer, self.stops, self.strip = tokenizer, [s for s in stop_strings if s], strip
        self.ids: list[int] = []
        self.stopped = False  # a stop string was found: the text is complete
        self._pieces: list[str] = []  # the text released so far
        self._context, self._read = 0, 0  # ids[:_read] are read; ids[_context:_read] were the last ones read
        self._held = ""  # text read but not yet released

    @property
    def shown(self) -> str:
        """All the text released so far."""
        return "".join(self._pieces)

    def push(self, ids: Sequence[int]) -> str:
        """Add tokens; returns the newly final text (may be empty)."""
        self.ids.extend(ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text once generation has ended."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        context = self.tokenizer.decode(self.ids[self._context:self._read])
        new = self.tokenizer.decode(self.ids[self._context:])[len(context):]
        text = self._held + new
        if self.strip and not self._pieces:
            text = text.lstrip()
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            text, final, self.stopped = text[:cut], True, True
        elif new.endswith("\ufffd") and not final:
            return ""  # the newest token ends inside a character: read it again with the next one
        self._context, self._read = self._read, len(self.ids)
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
        held = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        if self.strip:
            held = max(held, len(text) - len(text.rstrip()))
        return held


def stream_text(model: GPT, tokenizer: Tokenizer, prompt_ids: list[int], sampling: SampleConfig,
                generator: torch.Generator | None = None, stop_ids: Sequence[int] | None = None) -> Iterator[str]:
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
