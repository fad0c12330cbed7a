"""tinygpt serve under careless and hostile clients (issue #25): no 500s and no tracebacks for a client's
mistakes, no request that stalls the event loop or changes another client's reply, one log line per request.
The server runs as `tinygpt serve --max-batch 4 --queue-size 8` in a subprocess; everything is loopback."""

import concurrent.futures
import json
import random
import re
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")

from conftest import error_of, serve, tiny_flags, train_run  # noqa: E402
from tinygpt.serve.schema import MAX_MESSAGES, MAX_STOP_CHARS  # noqa: E402

HEALTH_S = 1.0  # the bound on /health while a pathological request is handled
ACCESS = re.compile(r'"(GET|POST|PUT|DELETE|PATCH) \S+ HTTP/1\.1" \d{3}')


@pytest.fixture(scope="module")
def server(chat_run):
    with serve(chat_run, "--model-name", "demo", "--max-batch", "4", "--queue-size", "8") as base:
        yield base


def chat(base: str, body: dict, **extra) -> httpx.Response:
    return httpx.post(f"{base}/v1/chat/completions", json={"model": "demo", **body, **extra}, timeout=120)


def streamed_text(base: str, body: dict) -> str:
    """A chat reply read as server-sent events."""
    text = []
    with httpx.stream("POST", f"{base}/v1/chat/completions", json={"model": "demo", **body, "stream": True},
                      timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                assert "error" not in event, event
                text += [c["delta"].get("content") or "" for c in event["choices"]]
    return "".join(text)


REFERENCE = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 48, "temperature": 0,
             "ignore_eos": True}


def long_history(n: int) -> list[dict]:
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i} " * 4}
             for i in range(n)]
    return turns + [{"role": "user", "content": "hello"}] if turns[-1]["role"] == "assistant" else turns


def pathological(base: str) -> list[tuple[str, int]]:
    """The requests that stalled or broke the server before issue #25, each with the status it must get."""
    half_mb_of_stops = ["x" * 150_000] * 4
    sent = [
        ("1,001 messages", chat(base, {"messages": long_history(1001), "max_tokens": 8})),
        (f"{MAX_MESSAGES + 1} messages", chat(base, {"messages": long_history(MAX_MESSAGES + 1)})),
        ("4 stop strings of 150,000 characters", chat(base, {**REFERENCE, "stop": half_mb_of_stops})),
        (f"4 stop strings of {MAX_STOP_CHARS} characters",
         chat(base, {**REFERENCE, "stop": ["ab" * (MAX_STOP_CHARS // 2)] * 4})),
        ("temperature 1e-300", chat(base, {**REFERENCE, "temperature": 1e-300})),
        ("100,000 nested arrays", httpx.post(f"{base}/v1/chat/completions", content=b"[" * 100_000,
                                             headers={"Content-Type": "application/json"}, timeout=120)),
    ]
    want = [200, (400, "messages"), (400, "stop"), 200, 200, (400, None)]
    for (what, response), status in zip(sent, want):
        if status == 200:
            assert response.status_code == 200, (what, response.text)
        else:
            assert error_of(response, 400)["param"] == status[1], what
    return [(what, r.status_code) for what, r in sent]


def test_pathological_requests_neither_stall_health_nor_change_another_clients_stream(server):
    expected = streamed_text(server, REFERENCE)
    assert expected  # the reference reply is not empty: there is something to change
    done = threading.Event()
    health_s: list[float] = []

    def probe_health() -> None:
        while not done.is_set():
            start = time.monotonic()
            assert httpx.get(f"{server}/health", timeout=30).status_code == 200
            health_s.append(time.monotonic() - start)

    def reference_streams() -> list[str]:
        texts = []
        while not done.is_set() or not texts:
            texts.append(streamed_text(server, REFERENCE))
        return texts

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        health, others = pool.submit(probe_health), pool.submit(reference_streams)
        try:
            for _ in range(2):
                pathological(server)
        finally:
            done.set()
        health.result()
        assert set(others.result()) == {expected}  # every stream beside them: the very same reply
    print(f"/health: {len(health_s)} probes, slowest {max(health_s) * 1000:.0f} ms")
    assert health_s and max(health_s) < HEALTH_S, f"/health took up to {max(health_s):.2f} s"
    assert "Traceback" not in server.log()


def test_special_tokens_are_not_text_with_ignore_eos(server):
    reply = chat(server, {**REFERENCE, "max_tokens": 120}).json()
    assert reply["usage"]["completion_tokens"] == 120  # went on through end-of-turn
    assert "<|" not in reply["choices"][0]["message"]["content"]


def test_fields_that_would_change_the_reply_are_refused_by_name(server):
    for field, value in [("logit_bias", {"5": 10}), ("presence_penalty", 0.5), ("frequency_penalty", -1),
                         ("top_logprobs", 2)]:
        error = error_of(chat(server, REFERENCE, **{field: value}), 400)
        assert (error["param"], error["code"]) == (field, "unsupported_parameter")
    for harmless in ({"presence_penalty": 0}, {"logit_bias": {}}, {"user": "x"}, {"metadata": {"a": "b"}}):
        assert chat(server, {**REFERENCE, "max_tokens": 2}, **harmless).status_code == 200, harmless


@pytest.fixture(scope="module")
def char_chat_run(tmp_path_factory):
    """A chat run with a character-level tokenizer, which refuses characters it never saw (emoji)."""
    return train_run(tmp_path_factory, tmp_path_factory.mktemp("char-chat") / "chat", "--tokenizer", "char",
                     *tiny_flags(**{"model.block_size": 64}))


def test_a_character_the_tokenizer_never_saw_is_a_400_in_any_message(char_chat_run):
    # older messages are encoded while the history is fitted: their characters too are the client's mistake
    with serve(char_chat_run, "--model-name", "demo") as base:
        older = [{"role": "user", "content": "\U0001f600 old"}, {"role": "assistant", "content": "x"}]
        last = [{"role": "user", "content": "hi"}]
        for messages in ([{"role": "user", "content": "\U0001f600"}], older + last):
            assert error_of(chat(base, {"messages": messages, "max_tokens": 2}), 400)["param"] == "messages"
        assert "Traceback" not in base.log()


# ---------------------------------------------------------------- fuzzing

TEXTS = ["", "5", "hello", "\u0000", "<|end|>", "<|user|>hi", "\U0001f600" * 3, "a" * 3000]
VALUES = [None, True, False, 0, -1, 1, 2, 7, 2**31, 2**70, -(2**70), 0.5, -0.5, 1e-300, 1e300, float("nan"),
          float("inf"), *TEXTS, [], [1, 2], ["a"], [[1]], {}, {"type": "text"}, {"a": {"b": [None]}}]
FIELDS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p",
          "top_k", "n", "stop", "seed", "stream", "stream_options", "ignore_eos", "logprobs", "echo",
          "suffix", "best_of", "tools", "response_format", "logit_bias", "user"]


def mutated(rng: random.Random) -> tuple[str, bytes]:
    """A path and a body: a valid request with fields dropped, added or set to values of other types, or
    its JSON cut short, flipped or nested."""
    chat_body = rng.random() < 0.6
    body: dict = {"model": "demo", "max_tokens": rng.choice([1, 3, 8])}
    if chat_body:
        body["messages"] = [{"role": rng.choice(["user", "assistant", "system", "tool", "developer"]),
                             "content": rng.choice(TEXTS + [None, 5, [{"type": "text", "text": "hi"}],
                                                            [{"type": "image_url"}]])}
                            for _ in range(rng.randrange(0, 4))]
    else:
        body["prompt"] = rng.choice(["The", ["The", "A"], [1, 2, 3], [], [-1], [10**9], "", ["a"] * 9])
    for _ in range(rng.randrange(0, 4)):
        field = rng.choice(FIELDS)
        if rng.random() < 0.2:
            body.pop(field, None)
        else:
            body[field] = rng.choice(VALUES)
    if body.get("max_tokens") not in (1, 3, 8) and rng.random() < 0.7:
        body["max_tokens"] = 8  # keep most decodes short: the fuzz is about parsing, not decoding time
    raw = json.dumps(body).encode()
    cut = rng.random()
    if cut < 0.1:
        raw = raw[:rng.randrange(len(raw))]
    elif cut < 0.2:
        i = rng.randrange(len(raw))
        raw = raw[:i] + bytes([rng.randrange(256)]) + raw[i + 1:]
    elif cut < 0.25:
        raw = b"[" * rng.randrange(1, 5000) + raw
    return ("/v1/chat/completions" if chat_body else "/v1/completions"), raw


@pytest.mark.parametrize("run", ["chat_run", "char_chat_run"])  # byte-level BPE, and characters
def test_fuzzed_bodies_get_no_500_no_traceback_and_a_log_line_each(run, request):
    rng = random.Random(25)
    with serve(request.getfixturevalue(run), "--model-name", "demo", "--max-batch", "4", "--queue-size",
               "8") as base:
        logged_before = len(base.log().splitlines())
        statuses = []
        deadline = time.monotonic() + 45  # bounded in count and in time
        with httpx.Client(timeout=120) as http:
            for _ in range(300):
                if time.monotonic() > deadline:
                    break
                path, raw = mutated(rng)
                r = http.post(base + path, content=raw, headers={"Content-Type": "application/json"})
                statuses.append(r.status_code)
                assert r.status_code < 500, (raw[:300], r.text)
                if r.status_code != 200:
                    error_of(r, r.status_code)
            assert http.get(f"{base}/health").status_code == 200
        lines = [line for line in base.log().splitlines()[logged_before:] if line.strip()]
    print("fuzz statuses:", {s: statuses.count(s) for s in sorted(set(statuses))})
    assert len(statuses) >= 100 and 200 in statuses and 400 in statuses
    assert "Traceback" not in "\n".join(lines)
    assert sum(bool(ACCESS.search(line)) for line in lines) == len(statuses) + 1  # + the last /health
    assert all(ACCESS.search(line) for line in lines), [line for line in lines if not ACCESS.search(line)]
