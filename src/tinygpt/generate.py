"""Decoding: token sampling, the KV-cached decode loop, and text streaming."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from tinygpt.model import GPT
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


def stream_tokens(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None, stop_ids: Sequence[int] = (),
                  generator: torch.Generator | None = None, use_cache: bool = True) -> Iterator[torch.Tensor]:
    """Yield one (B,) tensor of new tokens per step, stopping early once every row has emitted a stop id.

    Context policy: only the most recent block_size tokens are seen. With the cache, when it
    fills up it is rebuilt from the most recent block_size/2 tokens, so the cost of re-reading
    the context is paid once per block_size/2 new tokens rather than on every token.
    """
    block = model.config.block_size
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            seq = idx[:, -block:]
            cache = model.new_cache(idx.size(0)) if use_cache else None
            logits = model.next_logits(seq, cache)
            stop = torch.tensor(list(stop_ids), dtype=torch.long, device=idx.device)
            done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
            for step in range(max_new_tokens):
                tok = sample_token(logits, temperature, top_k, top_p, generator)
                yield tok
                done |= torch.isin(tok, stop)
                if step == max_new_tokens - 1 or bool(done.all()):
                    return
                seq = torch.cat([seq, tok[:, None]], dim=1)[:, -block:]
                if cache is None:
                    new = seq
                elif cache.pos < block:
                    new = tok[:, None]
                else:
                    cache.pos = 0
                    new = seq = seq[:, -(block // 2):]
                logits = model.next_logits(new, cache)
    finally:
        model.train(was_training)


def stream_text(model: GPT, tokenizer: Tokenizer, prompt_ids: list[int], max_new_tokens: int,
                temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None, stop_ids: Sequence[int] | None = None) -> Iterator[str]:
    """Yield the text of a single sample piece by piece, stopping before a stop id (default: end-of-text)."""
    stops = set(stop_ids) if stop_ids is not None else {tokenizer.eot_id}
    device = next(model.parameters()).device
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    ids: list[int] = []
    shown = ""
    for tok in stream_tokens(model, idx, max_new_tokens, temperature, top_k, top_p,
                             stop_ids=sorted(stops), generator=generator):
        t = int(tok[0])
        if t in stops:
            return
        ids.append(t)
        text = tokenizer.decode(ids)
        # A byte-level BPE token can end inside a UTF-8 character; wait for the rest of it.
        if text.endswith("\ufffd"):
            continue
        yield text[len(shown):]
        shown = text
