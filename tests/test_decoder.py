"""Continuous batching (tinygpt.infer.decoder): generations that join, leave and share steps decode exactly
as they would alone."""

import pytest
import torch

from conftest import perturbed_gpt
from tinygpt.config import SampleConfig
from tinygpt.infer.decoder import BatchDecoder, Generation
from tinygpt.infer.generate import seeded_generator, stream_tokens
from tinygpt.infer.kernels import KERNELS, Int8Linear, int8_kernel_works
from tinygpt.infer.quantize import quantize
from tinygpt.model import GPT


def model(**kw) -> GPT:
    return perturbed_gpt(0.1, **{"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16, "vocab_size": 50,
                                 **kw})


def alone(m: GPT, prompt: list[int], sampling: SampleConfig, seed: int | None = None) -> list[int]:
    gen = seeded_generator(m, seed) if seed is not None else None
    return [int(t) for t in stream_tokens(m, torch.tensor([prompt]), sampling, generator=gen)]


def drain(d: BatchDecoder) -> None:
    while d.active:
        d.step()


def test_joining_at_different_steps_and_lengths_gives_each_its_greedy_tokens():
    for kw in ({}, {"pos": "rope", "qk_norm": True}):
        m = model(**kw)
        # 40 > block_size: the context rebuilds
        greedy = SampleConfig(max_new_tokens=40, temperature=0, top_k=None)
        prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [3] * 20]  # the last is longer than the context
        gens = [Generation(p, greedy) for p in prompts]
        d = BatchDecoder(m, 4)
        d.add(gens[:1])
        d.step()
        d.step()
        d.add(gens[1:])  # three prompts of different lengths prefilled in one pass
        drain(d)
        assert [g.tokens for g in gens] == [alone(m, p, greedy) for p in prompts]
        assert [g.finish_reason for g in gens] == ["length"] * 4 and d.free == 4


def test_each_generation_keeps_its_own_settings_and_seed():
    m = model()
    hot = SampleConfig(max_new_tokens=12, temperature=1.5, top_k=None)
    cold = SampleConfig(max_new_tokens=12, temperature=0, top_k=None)
    gens = [Generation([1, 2], hot, generator=seeded_generator(m, 7)), Generation([1, 2], cold),
            Generation([5], hot, generator=seeded_generator(m, 8))]
    d = BatchDecoder(m, 3)
    d.add(gens)
    drain(d)
    assert gens[0].tokens == alone(m, [1, 2], hot, 7) and gens[2].tokens == alone(m, [5], hot, 8)
    assert gens[1].tokens == alone(m, [1, 2], cold)


def test_stop_ids_cancel_and_rows_come_back():
    m = model()
    greedy = SampleConfig(max_new_tokens=30, temperature=0, top_k=None)
    expected = alone(m, [1, 2, 3], greedy)
    stopper = Generation([1, 2, 3], greedy, stop_ids=frozenset({expected[4]}))
    cancelled, other = Generation([4, 5], greedy), Generation([6], greedy)
    d = BatchDecoder(m, 3)
    d.add([stopper, cancelled, other])
    ended = []
    for step in range(30):
        if step == 3:
            cancelled.cancelled = True  # as a server does when its client goes
        ended += d.step()
        if not d.active:
            break
    first_stop = expected.index(expected[4])
    assert stopper.tokens == expected[:first_stop] and stopper.finish_reason == "stop"
    assert len(cancelled.tokens) == 3 and cancelled.finish_reason is None and cancelled in ended
    assert other.tokens == alone(m, [6], greedy)  # moved between rows as the others left, unaffected
    assert d.free == 3 and all(g.row == -1 for g in (stopper, cancelled, other))


def test_sample_texts_decodes_n_samples_in_batches_reproducibly():
    from tinygpt.infer.decoder import sample_texts
    from tinygpt.infer.generate import stream_text
    from tinygpt.tokenizer import build_tokenizer

    tok = build_tokenizer("char", ["abcdefgh ijklmnop qrstuvwxyz"])
    m = model(vocab_size=tok.vocab_size)
    hot = SampleConfig(max_new_tokens=20, temperature=1.0, top_k=None)
    prompt = tok.encode("abc")
    one = sample_texts(m, tok, prompt, hot, 1, seeded_generator(m, 3))
    # one sample: what sample did
    assert one == ["".join(stream_text(m, tok, prompt, hot, seeded_generator(m, 3)))]
    streamed: dict[int, str] = {}
    # rows freed and refilled
    many = sample_texts(m, tok, prompt, hot, 7, seeded_generator(m, 4), max_batch=3,
                        on_piece=lambda i, piece: streamed.__setitem__(i, streamed.get(i, "") + piece))
    assert many == sample_texts(m, tok, prompt, hot, 7, seeded_generator(m, 4), max_batch=3)
    texts = [t for t in many if t]  # an untrained model may end a sample at once, with end-of-text
    assert len(texts) >= 4 and len(set(texts)) == len(texts) and [streamed.get(i, "")
                                                                  for i in range(7)] == many


@pytest.mark.parametrize("kernel", KERNELS)
def test_with_int8_weights_a_generations_greedy_tokens_do_not_depend_on_its_batch(kernel, monkeypatch):
    # Issue #25: a served request's greedy tokens must be the same alone and beside other clients', with each
    # int8 kernel (fbgemm used to round the activations of a whole batch with one scale).
    if not int8_kernel_works(kernel):
        pytest.skip(f"the {kernel} kernel does not run here")
    monkeypatch.setattr(Int8Linear, "kernel", kernel)
    m = quantize(model(n_embd=64, block_size=64), "int8")
    greedy = SampleConfig(max_new_tokens=40, temperature=0, top_k=None)
    prompts = [[1, 2, 3], [40] * 9, [7, 30], [11, 12, 13, 14], [5], [9, 8, 7, 6, 5], [2, 2], [49]]
    gens = [Generation(p, greedy) for p in prompts]
    d = BatchDecoder(m, len(prompts))
    d.add(gens)
    drain(d)
    for p, g in zip(prompts, gens):
        one = Generation(p, greedy)
        d.add([one])
        drain(d)
        assert one.tokens == g.tokens


def test_a_generation_whose_scores_are_not_finite_ends_alone_with_an_error():
    m = model()
    greedy = SampleConfig(max_new_tokens=12, temperature=0, top_k=None)
    hot = SampleConfig(max_new_tokens=12, temperature=0.8, top_k=None)
    gens = [Generation([1, 2], greedy), Generation([3], hot, generator=seeded_generator(m, 1)),
            Generation([4, 5], hot, generator=seeded_generator(m, 2))]
    d = BatchDecoder(m, 3)
    d.add(gens)
    gens[1].logits = torch.full_like(gens[1].logits, float("nan"))  # as a broken row's would be
    ended = d.step()
    assert gens[1] in ended and gens[1].finish_reason == "error" and "not finite" in gens[1].error
    drain(d)
    assert gens[0].tokens == alone(m, [1, 2], greedy) and gens[2].tokens == alone(m, [4, 5], hot, 2)
    assert gens[0].error is None and gens[2].error is None


def test_a_failed_prefill_leaves_the_decoder_as_it_was():
    m = model()
    greedy = SampleConfig(max_new_tokens=6, temperature=0, top_k=None)
    d = BatchDecoder(m, 3)
    first = Generation([1, 2], greedy)
    d.add([first])
    handle = m.transformer.wte.register_forward_pre_hook(lambda mod, args: 1 / 0)
    try:
        with pytest.raises(ZeroDivisionError):
            d.add([Generation([3], greedy), Generation([4], greedy)])
    finally:
        handle.remove()
    assert d.active == [first] and d.free == 2
    drain(d)
    assert first.tokens == alone(m, [1, 2], greedy)
