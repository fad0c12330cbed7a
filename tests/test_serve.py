"""tinygpt serve: the real server in a subprocess, driven by the official openai client (and httpx for what
the client hides: raw SSE, status codes, dropped connections)."""

import concurrent.futures
import io
import json
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from conftest import error_of, serve  # noqa: E402
from tinygpt.cli import main  # noqa: E402


def client(base: str, key: str = "unused") -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def chat_server(chat_run):
    with serve(chat_run, "--model-name", "demo") as base:
        yield base


@pytest.fixture(scope="module")
def text_server(text_run):
    with serve(text_run) as base:
        yield base


def sample_cli(capsys, run, prompt: str, n: int) -> str:
    capsys.readouterr()
    assert main(["sample", "--run", str(run), "--prompt", prompt, "--temperature", "0", "--max-new-tokens",
                 str(n),
                 "--dtype", "float32"]) == 0
    return capsys.readouterr().out.rstrip("\n")[len(prompt):]


def chat_cli(capsys, monkeypatch, run, lines: list[str], n: int) -> list[str]:
    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    assert main(["chat", "--run", str(run), "--max-new-tokens", str(n), "--dtype", "float32"]) == 0
    return capsys.readouterr().out.splitlines()


def test_models_and_health(chat_server, text_server):
    models = client(chat_server).models.list().data
    assert [m.id for m in models] == ["demo"] and models[0].model_extra["chat"] is True
    assert client(text_server).models.list().data[0].model_extra["chat"] is False
    health = httpx.get(f"{chat_server}/health").json()
    assert health["status"] == "ok" and health["max_batch"] == 16


def test_greedy_completion_is_what_sample_writes(text_server, text_run, capsys):
    expected = sample_cli(capsys, text_run, "The red", 40)
    model = client(text_server).models.list().data[0].id
    whole = client(text_server).completions.create(model=model, prompt="The red", max_tokens=40,
                                                   temperature=0)
    assert whole.choices[0].text == expected and whole.choices[0].finish_reason == "length"
    # the char tokenizer: one per character
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (7, 40)
    stream = client(text_server).completions.create(model=model, prompt="The red", max_tokens=40,
                                                    temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == expected


def test_greedy_chat_is_what_tinygpt_chat_replies(chat_server, chat_run, capsys, monkeypatch):
    first, second = chat_cli(capsys, monkeypatch, chat_run, ["hello", "what is 2 plus 3?"], 30)
    c = client(chat_server)
    reply = c.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hello"}],
                                      max_tokens=30)
    assert " ".join(reply.choices[0].message.content.split()) == first  # greedy is chat's default too
    history = [{"role": "user", "content": "hello"}, {"role": "assistant",
                                                      "content": reply.choices[0].message.content},
               {"role": "user", "content": "what is 2 plus 3?"}]
    stream = c.chat.completions.create(model="demo", messages=history, max_tokens=30, stream=True,
                                       temperature=0,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert " ".join(text.split()) == second
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_temperature_zero_is_greedy_and_a_seed_repeats(text_server):
    c, model = client(text_server), client(text_server).models.list().data[0].id
    greedy = {c.completions.create(model=model, prompt="The", max_tokens=20, temperature=0).choices[0].text
              for _ in range(3)}
    assert len(greedy) == 1
    seeded = [c.completions.create(model=model, prompt="The", max_tokens=30, temperature=1.5, seed=s, n=3)
              for s in (1, 1, 2)]
    texts = [[ch.text for ch in r.choices] for r in seeded]
    assert texts[0] == texts[1] and texts[0] != texts[2]
    # n independent samples
    assert len(set(texts[0])) == 3 and [ch.index for ch in seeded[0].choices] == [0, 1, 2]
    assert seeded[0].usage.completion_tokens == 90


def test_stop_strings_end_the_text_where_they_begin(text_server):
    c, model = client(text_server), client(text_server).models.list().data[0].id
    full = c.completions.create(model=model, prompt="The", max_tokens=40, temperature=0).choices[0].text
    stop = full[12:14]
    cut = full[:full.find(stop)]
    stopped = c.completions.create(model=model, prompt="The", max_tokens=40, temperature=0,
                                   stop=[stop, "never"])
    assert stopped.choices[0].text == cut and stopped.choices[0].finish_reason == "stop"
    stream = c.completions.create(model=model, prompt="The", max_tokens=40, temperature=0, stop=stop,
                                  stream=True)
    chunks = [ch for ch in stream if ch.choices]
    assert "".join(ch.choices[0].text
                   for ch in chunks) == cut and chunks[-1].choices[0].finish_reason == "stop"


def test_sixteen_concurrent_streams_get_their_own_outputs(text_server):
    c, model = client(text_server), client(text_server).models.list().data[0].id

    def run(seed: int) -> str:
        stream = c.completions.create(model=model, prompt=f"The {seed}", max_tokens=48, temperature=1.0,
                                      seed=seed, stream=True)
        return "".join(ch.choices[0].text for ch in stream if ch.choices)

    alone = [run(seed) for seed in range(16)]  # one at a time: nothing to batch with
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(run, range(16)))
    assert together == alone
    assert len(set(together)) == 16


def test_a_client_that_drops_mid_stream_frees_its_row(text_run):
    with serve(text_run, "--max-batch", "1", "--max-tokens", "100000") as base:
        body = {"model": "text", "prompt": "The", "max_tokens": 2000, "temperature": 1.0, "stream": True,
                "ignore_eos": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
        # the dropped stream's row goes back: the next request (which needs that one row) finishes
        reply = client(base).completions.create(model="text", prompt="The", max_tokens=10, temperature=0)
        assert reply.choices[0].finish_reason in ("length", "stop")
        health = httpx.get(f"{base}/health").json()
        assert health["running"] == 0 and health["generated_tokens"] < 2000
        # the same for a client that gives up waiting for a whole (non-streamed) reply
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/v1/completions", json={**body, "stream": False, "max_tokens": 100000},
                       timeout=1)
        assert client(base).completions.create(model="text", prompt="The", max_tokens=10,
                                               temperature=0).choices
        assert httpx.get(f"{base}/health").json()["generated_tokens"] < 50000


def test_a_client_that_drops_mid_stream_does_not_stall_the_others(text_server):
    c = client(text_server)

    def run(seed: int, drop: bool = False) -> str:
        body = {"model": "text", "prompt": f"The {seed}", "max_tokens": 300 if drop else 40,
                "temperature": 1.0,
                "seed": seed, "stream": True, "ignore_eos": drop}
        with httpx.stream("POST", f"{text_server}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            if drop:  # read one chunk, then hang up
                return next(line for line in lines if line.startswith("data:"))
            return "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines
                           if line.startswith("data: {") and json.loads(line[6:])["choices"])

    alone = [run(seed) for seed in range(3)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        dropped = pool.submit(run, 99, True)
        together = list(pool.map(run, range(3)))
    assert dropped.result() and together == alone
    assert c.completions.create(model="text", prompt="The", max_tokens=5, temperature=0).choices[0].text


def test_bad_requests_get_their_status_and_openai_errors(chat_server, text_server):
    url = f"{chat_server}/v1/chat/completions"
    ok = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
    assert error_of(httpx.post(url, content=b"{not json"), 400)["code"] == "invalid_json"
    assert error_of(httpx.post(url, json={"model": "demo"}), 400)["param"] == "messages"
    assert error_of(httpx.post(url, json={**ok, "temperature": -1}), 400)["param"] == "temperature"
    assert error_of(httpx.post(url, json={**ok, "top_p": 1.5}), 400)["param"] == "top_p"
    assert error_of(httpx.post(url, json={**ok, "max_tokens": 10 ** 6}), 400)["param"] == "max_tokens"
    assert error_of(httpx.post(url, json={**ok, "logprobs": True}), 400)["param"] == "logprobs"
    assert error_of(httpx.post(url, json={**ok, "model": "gpt-4"}), 404)["code"] == "model_not_found"
    too_long = {**ok, "messages": [{"role": "user", "content": "hi " * 200}]}
    assert error_of(httpx.post(url, json=too_long), 400)["code"] == "context_length_exceeded"
    assert error_of(httpx.post(url, json={**ok, "messages": [{"role": "assistant", "content": "x"}]}), 400)
    assert error_of(httpx.post(f"{chat_server}/v1/nothing", json=ok), 404)
    text = {"model": "text", "messages": ok["messages"]}
    assert error_of(httpx.post(f"{text_server}/v1/chat/completions", json=text),
                    400)["code"] == "model_not_chat"
    long_prompt = {"model": "text", "prompt": "The cat " * 20}
    assert error_of(httpx.post(f"{text_server}/v1/completions", json=long_prompt),
                    400)["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):  # the official client turns them into its exceptions
        client(chat_server).chat.completions.create(model="nope", messages=ok["messages"])


def test_body_limit_queue_limit_and_timeouts(text_run):
    with serve(text_run, "--max-batch", "1", "--queue-size", "0", "--max-body", "2000", "--timeout", "1.5",
               "--max-tokens", "100000") as base:
        url = f"{base}/v1/completions"
        assert error_of(httpx.post(url, json={"model": "text", "prompt": "x" * 5000}),
                        413)["code"] == "body_too_large"
        long = {"model": "text", "prompt": "The", "max_tokens": 100000, "temperature": 1.0, "stream": True,
                "ignore_eos": True}
        with httpx.stream("POST", url, json=long, timeout=30) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data:"))
            # the only row is taken and nothing may wait: refused at once
            assert error_of(httpx.post(url, json={"model": "text", "prompt": "The"}),
                            503)["code"] == "server_busy"
            events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        # 100,000 tokens take far longer than the 1.5 s timeout: the stream ends with one error event, no
        # [DONE]
        assert "error" in events[-1] and "timed out" in events[-1]["error"]["message"]


def test_idle_streams_get_keep_alive_comments(text_run):
    with serve(text_run, "--max-batch", "1", "--keepalive", "0.2", "--max-tokens", "100000") as base:
        url = f"{base}/v1/completions"
        first = {"model": "text", "prompt": "The", "max_tokens": 100000, "temperature": 1.0, "stream": True,
                "ignore_eos": True}
        with httpx.stream("POST", url, json=first, timeout=30) as r1:
            first_lines = r1.iter_lines()  # kept: closing this iterator would close the connection
            next(line for line in first_lines if line.startswith("data:"))
            second = {"model": "text", "prompt": "The", "max_tokens": 5, "stream": True}
            # waits in the queue for the one row
            with httpx.stream("POST", url, json=second, timeout=30) as r2:
                started = time.monotonic()
                lines = []
                for line in r2.iter_lines():
                    lines.append(line)
                    if line.startswith(":") or time.monotonic() - started > 20:
                        break
        assert lines[-1] == ": keep-alive"


def test_api_key(text_run):
    with serve(text_run, "--api-key", "s3cret") as base:
        for key in ("wrong", None):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            assert error_of(httpx.get(f"{base}/v1/models", headers=headers), 401)["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(base, "wrong").models.list()
        assert client(base, "s3cret").models.list().data[0].id == "text"
        # the scheme is case-insensitive (RFC 7235)
        assert httpx.get(f"{base}/v1/models", headers={"Authorization": "bearer s3cret"}).status_code == 200
        assert httpx.get(f"{base}/health").status_code == 200  # health checks need no key


def test_listening_beyond_loopback_warns_without_a_key(text_run, capsys, monkeypatch):
    uvicorn = pytest.importorskip("uvicorn")
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    assert main(["serve", "--run", str(text_run), "--host", "0.0.0.0", "--port", "9"]) == 0
    assert "warning: listening on 0.0.0.0 without --api-key" in capsys.readouterr().err
    assert main(["serve", "--run", str(text_run), "--host", "0.0.0.0", "--api-key", "k"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert [(c["host"], c["port"]) for c in calls] == [("0.0.0.0", 9), ("0.0.0.0", 8000)]
    assert main(["serve", "--run", str(text_run), "--max-batch", "0"]) == 2
    assert "--max-batch must be positive" in capsys.readouterr().err


def test_requests_take_the_sampling_ranges_the_command_line_takes():
    """Each sampling field of a request allows exactly what config.SAMPLE_RANGES (the CLI's rule) allows."""
    from tinygpt.config import SampleConfig, sample_settings
    from tinygpt.errors import UsageError
    from tinygpt.serve.schema import ApiError, ChatRequest, CompletionRequest, parse

    cases = [("temperature", "temperature", 2, 2.01), ("temperature", "temperature", 0, -0.01),
             ("top_p", "top_p", 1, 0), ("top_k", "top_k", 1, 0),
             ("max_new_tokens", "max_tokens", 10**6, 10**6 + 1)]
    chat = {"model": "m", "messages": [{"role": "user"}]}
    bodies = ((CompletionRequest, {"model": "m", "prompt": "x"}), (ChatRequest, chat))
    for setting, field, inside, outside in cases:
        sample_settings(SampleConfig(), {setting: inside})
        with pytest.raises(UsageError, match=f"sample.{setting} must be in"):
            sample_settings(SampleConfig(), {setting: outside})
        for kind, body in bodies:
            assert getattr(parse(json.dumps({**body, field: inside}).encode(), kind), field) == inside
            with pytest.raises(ApiError) as e:
                parse(json.dumps({**body, field: outside}).encode(), kind)
            assert (e.value.status, e.value.param) == (400, field)


def send_half_a_body_and_leave(base: str) -> None:
    """A POST whose body stops short of its Content-Length, then a closed connection."""
    import socket

    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"model\": \"demo\", ")


def test_careless_and_hostile_bodies_get_400s_naming_the_field_and_no_traceback(chat_run):
    with serve(chat_run, "--model-name", "demo") as base:
        send_half_a_body_and_leave(base)
        url = f"{base}/v1/chat/completions"
        ok = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}

        def raw(body: bytes) -> httpx.Response:
            return httpx.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=60)
        assert error_of(raw(b"[" * 100_000 + b"]" * 100_000), 400)["code"] == "invalid_json"
        surrogate = b'{"model": "demo", "messages": [{"role": "user", "content": "a\\ud800b"}]}'
        assert error_of(raw(surrogate), 400)["param"] == "messages"
        assert error_of(httpx.post(url, json={**ok, "seed": 2**70}), 400)["param"] == "seed"
        assert error_of(httpx.post(url, json={**ok, "max_tokens": "5"}), 400)["param"] == "max_tokens"
        assert error_of(httpx.post(url, json={**ok, "stream": "yes"}), 400)["param"] == "stream"
        for field, value in [("functions", [{"name": "f", "parameters": {}}]), ("function_call", "auto"),
                             ("tools", [{"type": "function", "function": {"name": "f"}}]),
                             ("response_format", {"type": "json_object"})]:
            error = error_of(httpx.post(url, json={**ok, field: value}), 400)
            assert (error["param"], error["code"]) == (field, "unsupported_parameter")
        for fine in ({"response_format": {"type": "text"}}, {"seed": 2**63}, {"tools": []},
                     {"temperature": 1e-300}):
            assert httpx.post(url, json={**ok, **fine}, timeout=60).status_code == 200, fine
        assert httpx.get(f"{base}/health").status_code == 200
        assert "Traceback" not in base.log() and "Exception" not in base.log()


def test_a_list_of_prompts_gets_a_choice_each(text_server, text_run):
    from tinygpt import load

    url = f"{text_server}/v1/completions"
    greedy = {"model": "text", "max_tokens": 6, "temperature": 0}
    alone = [httpx.post(url, json={**greedy, "prompt": p}, timeout=60).json()["choices"][0]["text"]
             for p in ("The red", "The shy owl")]
    both = httpx.post(url, json={**greedy, "prompt": ["The red", "The shy owl"]}, timeout=60).json()
    assert [c["index"] for c in both["choices"]] == [0, 1]
    assert [c["text"] for c in both["choices"]] == alone
    tok = load(text_run).tokenizer  # OpenAI's fourth form: a list of token-id lists
    as_ids = [tok.encode("The red"), tok.encode("The shy owl")]
    by_ids = httpx.post(url, json={**greedy, "prompt": as_ids}, timeout=60).json()
    assert [c["text"] for c in by_ids["choices"]] == alone
    assert error_of(httpx.post(url, json={**greedy, "prompt": {"a": 1}}), 400)["param"] == "prompt"
