"""The decode worker (tinygpt.serve.engine): a failed step ends the requests that caused it, not others."""

import threading

import torch

from conftest import perturbed_gpt
from tinygpt.config import SampleConfig
from tinygpt.infer.decoder import Generation
from tinygpt.infer.generate import stream_tokens
from tinygpt.serve.engine import Engine, Ticket, Update

GREEDY = SampleConfig(max_new_tokens=20, temperature=0, top_k=None)
WAIT_S = 120  # generous: CI may be busy; the test waits for the state, not for a time


def model():
    return perturbed_gpt(0.1, n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50)


class Client:
    """One request's updates, collected as the worker sends them."""

    def __init__(self, prompt: list[int]):
        self.tokens: list[int] = []
        self.errors: list[str] = []
        self.done = threading.Event()
        self.ticket = Ticket([Generation(prompt, GREEDY)], self.receive)

    def receive(self, u: Update) -> None:
        self.tokens += u.tokens
        if u.error:
            self.errors.append(u.error)
        if u.finish_reason:
            self.done.set()


def run_engine(m, prompts: list[list[int]], poison) -> list[Client]:
    """The prompts submitted together (one batch), with `poison(ids)` able to fail any forward pass."""
    engine = Engine(m, max_batch=4, queue_size=8)
    clients = [Client(p) for p in prompts]
    for c in clients:
        engine.submit(c.ticket)
    handle = m.transformer.wte.register_forward_pre_hook(lambda mod, args: poison(args[0]))
    engine.start()
    try:
        assert all(c.done.wait(WAIT_S) for c in clients)
    finally:
        engine.stop()
        handle.remove()
    return clients


def alone(m, prompt: list[int]) -> list[int]:
    return [int(t) for t in stream_tokens(m, torch.tensor([prompt]), GREEDY)]


def test_a_request_whose_tokens_fail_the_model_fails_alone():
    m = model()
    prompts = [[1, 2, 3], [4, 5], [6]]
    expected = [alone(m, p) for p in prompts]
    poison = next(t for t in range(50) if all(t not in e + p for e, p in zip(expected, prompts)))

    def fail_on_poison(ids: torch.Tensor) -> None:
        if bool((ids == poison).any()):
            raise RuntimeError("the poisoned token")

    clients = run_engine(m, prompts + [[7, poison]], fail_on_poison)
    # the batch's prefill failed; each request was prefilled again alone and only the poisoned one failed
    assert [c.tokens for c in clients[:3]] == expected and not any(c.errors for c in clients[:3])
    assert clients[3].tokens == [] and "the poisoned token" in clients[3].errors[0]


def test_a_step_that_fails_again_after_the_retry_ends_every_request():
    m = model()

    def fail_batches(ids: torch.Tensor) -> None:  # rows alone pass, steps over several rows fail
        if ids.size(0) > 1:
            raise RuntimeError("batches fail")

    clients = run_engine(m, [[1, 2], [3]], fail_batches)
    assert all("batches fail" in c.errors[0] for c in clients)
