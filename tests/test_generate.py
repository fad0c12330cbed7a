"""Decoding (tinygpt.infer.generate and infer.cache): the cached loop computes what full forward passes do,
sampling keeps to its candidates, and streamed text is whole UTF-8 characters, decoded in bounded work per
token; generate() keeps its settings local."""

import pytest
import torch

from conftest import greedy_without_cache, perturbed_gpt
from tinygpt.config import ModelConfig, SampleConfig
from tinygpt.infer import generate
from tinygpt.infer.cache import KVCache, SlotCache
from tinygpt.infer.generate import generate_ids, sample_token
from tinygpt.model import GPT
from tinygpt.tokenizer import build_tokenizer

TINY = {"n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": 32, "vocab_size": 50}


def small(**kw) -> GPT:
    """A tiny GPT (seeded) with noise on every parameter, so zero- and one-initialised pieces matter too."""
    return perturbed_gpt(0.05, **{**TINY, **kw})


def greedy(n: int) -> SampleConfig:
    return SampleConfig(max_new_tokens=n, temperature=0)


@pytest.mark.parametrize("variant", [
    {}, {"pos": "sinusoidal"}, {"pos": "rope"}, {"norm": "rmsnorm"}, {"norm_placement": "post"},
    {"mlp": "relu"}, {"mlp": "swiglu"}, {"tie_weights": False, "bias": False}, {"mlp_hidden": 48},
    {"mlp": "relu2"}, {"qk_norm": True}, {"qk_norm": True, "pos": "rope"}, {"zero_init_proj": True},
    {"attn": "einsum"}, {"attn": "einsum", "pos": "rope", "qk_norm": True}, {"head": "adaptive"},
])
def test_kv_cache_greedy_equals_full_forward(variant):
    model = small(**variant)
    prompt = torch.randint(0, 50, (2, 5))
    assert torch.equal(generate_ids(model, prompt, greedy(20)), greedy_without_cache(model, prompt, 20))


@pytest.mark.parametrize("attn", ["sdpa", "einsum"])
def test_prefill_in_chunks_equals_one_pass(attn):
    # a chunk of several tokens after a filled cache is the one case that needs an explicit offset mask
    model = small(attn=attn, pos="rope")
    idx = torch.randint(0, 50, (2, 12))
    cache = KVCache.for_model(model, 2)
    chunks = [model.hidden(idx[:, a:b], cache) for a, b in ((0, 5), (5, 6), (6, 12))]
    assert torch.allclose(torch.cat(chunks, dim=1), model.hidden(idx), atol=1e-5)


@pytest.mark.parametrize("variant", [
    {}, {"pos": "rope", "attn": "einsum"}, {"pos": "sinusoidal"}, {"head": "adaptive"},
])
def test_slot_cache_rows_are_separate_sequences(variant):
    """Rows of a SlotCache at different lengths, prefilled alone or together and stepped together, give each
    sequence's own logits; a row moved into another's place goes on as before."""
    model = small(**variant)
    seqs = [torch.randint(0, 50, (1, n)) for n in (5, 9, 3)]
    alone = lambda s: model(s)[0][0, -1]  # noqa: E731  (the reference: one full forward pass per sequence)
    with torch.no_grad():
        cache = SlotCache.for_model(model, 4)
        cache.rows = slice(0, 1)
        model.hidden(seqs[0][:, :-1], cache)
        cache.rows = slice(1, 3)  # two prompts of different lengths in one pass, the shorter one padded
        padded = torch.zeros(2, 8, dtype=torch.long)
        padded[0], padded[1, :2] = seqs[1][0, :-1], seqs[2][0, :-1]
        model.hidden(padded, cache)
        cache.lengths[1:3] = [8, 2]
        cache.rows = slice(0, 3)
        step = model.next_logits(torch.cat([s[:, -1:] for s in seqs]), cache)
        for i, s in enumerate(seqs):
            assert torch.allclose(step[i], alone(s), atol=1e-5), i
        assert cache.lengths == [5, 9, 3, 0]
        cache.move(2, 0)  # row 0's sequence leaves; the last one takes its row
        cache.rows = slice(0, 2)
        nxt = torch.tensor([[7], [8]])
        step = model.next_logits(nxt, cache)
        assert torch.allclose(step[0], alone(torch.cat([seqs[2], nxt[:1]], 1)), atol=1e-5)
        assert torch.allclose(step[1], alone(torch.cat([seqs[1], nxt[1:]], 1)), atol=1e-5)


def test_generation_past_the_context_window_keeps_going():
    torch.manual_seed(0)
    model = GPT(ModelConfig(**{**TINY, "block_size": 8}))
    hot = SampleConfig(max_new_tokens=30, temperature=1.0, top_k=5)
    out = generate_ids(model, torch.zeros(1, 12, dtype=torch.long), hot)
    assert out.shape == (1, 42)


def test_top_k_and_top_p_restrict_the_candidates():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    top2 = {int(sample_token(logits, 1.0, top_k=2, generator=g)) for _ in range(200)}
    assert top2 == {0, 1}
    # probabilities ~[0.71, 0.26, ...]: top_p 0.5 keeps only the first token
    assert {int(sample_token(logits, 1.0, top_p=0.5, generator=g)) for _ in range(50)} == {0}
    assert int(sample_token(logits, 0.0)) == 0


def test_stream_text_waits_for_the_rest_of_a_utf8_character(monkeypatch):
    tok = build_tokenizer("bpe", ["plain ascii text, ok"] * 20, vocab_size=300)
    snowman = tok.encode("\u2603")
    assert len(snowman) == 3  # never seen in training: its three UTF-8 bytes are three tokens
    sequence = snowman + tok.encode(" ok")
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=tok.vocab_size))

    def scripted(model, idx, sampling, stop_ids=(), generator=None, use_cache=True):
        for t in sequence:
            yield torch.tensor([t])
    monkeypatch.setattr(generate, "stream_tokens", scripted)
    pieces = list(generate.stream_text(model, tok, [tok.eot_id], SampleConfig(max_new_tokens=len(sequence))))
    assert "".join(pieces) == "\u2603 ok"
    assert all("\ufffd" not in p for p in pieces) and pieces[0].startswith("\u2603")


MULTIBYTE = " h\u00e9llo w\u00f6rld, \u2603 and \U0001F600 in caf\u00e9 \u65e5\u672c\u8a9e."


@pytest.mark.parametrize("kind, options", [
    ("char", {}), ("bpe", {"vocab_size": 300}), ("sentencepiece", {"vocab_size": 300}),
    ("sentencepiece", {"vocab_size": 300, "sp_model_type": "unigram"}),
])
def test_streamed_text_is_the_one_shot_decode_in_bounded_work_per_token(kind, options):
    """Token by token, the pieces join to exactly what decoding all the ids at once gives (no half character
    is ever shown, sentencepiece's spaces stay), and no decode call reads more tokens as the reply grows."""
    corpus = ["plain ascii text, ok. the cat sat on the mat"] * 20 + ([MULTIBYTE] if kind == "char" else [])
    tok = build_tokenizer(kind, corpus, **options)
    ids = tok.encode(MULTIBYTE * 20)
    read: list[int] = []
    decode = tok.decode
    tok.decode = lambda some: read.append(len(some)) or decode(some)
    text = generate.TextPieces(tok)
    pieces = [text.push([i]) for i in ids] + [text.finish()]
    assert "".join(pieces) == text.shown == decode(ids) and not any("\ufffd" in p for p in pieces)
    assert len(ids) > 400 and max(read) <= 8  # a character spans at most 4 byte tokens, plus their context


def test_text_pieces_end_where_a_stop_string_begins_and_never_show_part_of_one():
    tok = build_tokenizer("char", ["abc END xyz, some text"])
    text = generate.TextPieces(tok, stop_strings=["END", "zz"])
    shown = [text.push(tok.encode(c)) for c in "abc EN"]
    assert "".join(shown) == "abc " and not text.stopped  # "EN" may be the start of "END": held back
    # the stop string and all after it: never shown
    assert text.push(tok.encode("D xyz")) == "" and text.stopped
    assert text.finish() == "" and text.shown == "abc "
    other = generate.TextPieces(tok, stop_strings=["END"])
    # not a stop after all
    assert other.push(tok.encode("ab E")) == "ab " and other.push(tok.encode("x")) == "Ex"
    assert other.finish() == ""


def test_text_pieces_strip_a_replys_outer_whitespace():
    tok = build_tokenizer("char", ["  hi there \n"])
    text = generate.TextPieces(tok, strip=True)
    pieces = [text.push(tok.encode(c)) for c in "  hi there \n"] + [text.finish()]
    assert "".join(pieces) == "hi there" and pieces[:3] == ["", "", "h"]


@pytest.mark.parametrize("temperature", [1e-300, 1e-38, 1e-30, 1e-6])
def test_a_tiny_temperature_is_greedy_not_a_failure(temperature):
    """Dividing logits by 1e-300 overflowed to inf and failed the softmax, and with it a server's whole
    decode step; the rows are shifted to a maximum of 0 first, and a temperature float32 cannot hold is 0."""
    logits = torch.randn(4, 60, generator=torch.Generator().manual_seed(0))
    for top_k, top_p in ((None, None), (5, 0.5)):
        assert torch.equal(sample_token(logits, temperature, top_k, top_p), logits.argmax(-1))


def test_the_held_back_start_of_a_stop_string_is_the_longest_one():
    import random

    from tinygpt.infer.generate import starts_with_end

    rng = random.Random(0)
    for _ in range(2000):
        stop = "".join(rng.choice("ab") for _ in range(rng.randrange(1, 9)))
        text = "".join(rng.choice("ab") for _ in range(rng.randrange(0, 9)))
        assert starts_with_end(stop, text) == max((k for k in range(1, len(stop)) if text.endswith(stop[:k])),
                                                  default=0)


def test_special_tokens_are_left_out_of_a_text_that_skips_them():
    tok = build_tokenizer("char", ["hello"])
    pieces = generate.TextPieces(tok, skip_special=True)
    text = pieces.push(tok.encode("he") + [tok.eot_id] + tok.encode("llo")) + pieces.finish()
    assert text == "hello" and len(pieces.ids) == 6  # the special token still counts as a generated token
    shown = generate.TextPieces(tok)
    assert shown.push([tok.eot_id]) + shown.finish() == "<|endoftext|>"
