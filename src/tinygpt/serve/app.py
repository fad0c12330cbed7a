"""`tinygpt serve`: a trained run behind the OpenAI API (FastAPI on uvicorn), and the chat page at /.

Endpoints: GET /v1/models, POST /v1/completions (any run), POST /v1/chat/completions (runs trained on
conversations), GET /health, GET / (the page). Each request becomes a Ticket for the decode worker
(serve.engine), which batches it with the others; this module only translates between HTTP and tickets.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from tinygpt.checkpoint import Checkpoint
from tinygpt.config import SampleConfig, sample_settings
from tinygpt.data.dialogs import Message
from tinygpt.errors import TinyGPTError
from tinygpt.infer.chat import CHAT_SAMPLING, fit_history, prompt_budget
from tinygpt.infer.decoder import Generation
from tinygpt.infer.generate import TextPieces, prompt_ids, seeded_generator
from tinygpt.run import trained_template
from tinygpt.serve.engine import Engine, QueueFull, Ticket, Update
from tinygpt.serve.schema import ApiError, ChatRequest, CompletionRequest, Sampling, parse
from tinygpt.serve.settings import ServeConfig

LOG = logging.getLogger("uvicorn.error")  # uvicorn's own log, beside its access lines
POLL_S = 0.25  # how often a waiting handler checks whether its client has gone


class Server:
    """One loaded run, its decode worker and the request translation."""

    def __init__(self, ckpt: Checkpoint, cfg: ServeConfig):
        self.ckpt, self.cfg = ckpt, cfg
        self.name = cfg.model_name or ckpt.home.name
        self.template = trained_template(ckpt)
        self.engine = Engine(ckpt.model, cfg.max_batch, cfg.queue_size)
        self.created = int(time.time())

    # ---------------------------------------------------------------- requests to generations

    def check(self, req: Sampling) -> None:
        req.refuse_unsupported()
        if req.model != self.name:
            raise ApiError(404, f"the model {req.model!r} does not exist; this server has {self.name!r}",
                           "model_not_found", "model")
        if req.n > self.cfg.max_batch:
            raise ApiError(400, f"n is {req.n}; this server decodes at most {self.cfg.max_batch} at once",
                           "invalid_value", "n")

    def sampling_for(self, req: Sampling, defaults: dict[str, Any], max_tokens: int | None) -> SampleConfig:
        """The run's sampling settings, then the endpoint's defaults, then the request's fields."""
        if max_tokens is not None and max_tokens > self.cfg.max_tokens:
            raise ApiError(400,
                           f"max_tokens is {max_tokens}; this server allows at most {self.cfg.max_tokens}",
                           "invalid_value", "max_tokens")
        fields = {"max_new_tokens": max_tokens, "temperature": req.temperature, "top_p": req.top_p,
                  "top_k": req.top_k}
        sampling = dataclasses.replace(self.ckpt.config.sample)
        settings = {**defaults, **{k: v for k, v in fields.items() if v is not None}}
        settings["max_new_tokens"] = min(settings.get("max_new_tokens", sampling.max_new_tokens),
                                         self.cfg.max_tokens)
        sample_settings(sampling, settings, "the request")
        return sampling

    def prepare(self, body: bytes, chat: bool) -> tuple[Sampling, list[Generation], list[str]]:
        """A request body as its generations and stop strings: parsing, checks, tokenizing, fitting. The CPU
        work of a request: run in a worker thread, so that the event loop keeps answering the others (a large
        history fitted inside the handler kept /health waiting 25 s, issue #25)."""
        req = parse(body, ChatRequest if chat else CompletionRequest)
        self.check(req)
        stops = req.stop_strings()
        if chat:
            sampling = self.sampling_for(req, CHAT_SAMPLING, req.max_completion_tokens or req.max_tokens)
            prompts = self.chat_prompt(req, sampling)
        else:
            sampling = self.sampling_for(req, {}, req.max_tokens)
            prompts = self.completion_prompts(req)
        return req, self.generations(req, prompts, sampling, self.stop_ids(req, chat)), stops

    def generations(self, req: Sampling, prompts: list[list[int]], sampling: SampleConfig,
                    stop_ids: set[int]) -> list[Generation]:
        """req.n generations of each prompt, in OpenAI's order of choices (prompt by prompt)."""
        generator = seeded_generator(self.ckpt.model, req.seed)
        group = object()
        return [Generation(ids, sampling, frozenset(stop_ids), generator, group)
                for ids in prompts for _ in range(req.n)]

    def completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        """The prompts' ids, n choices each, from OpenAI's four forms of prompt: a text, token ids, or a list
        of either."""
        prompt = req.prompt
        many = isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], (str, list))
        prompts: list = prompt if many else [prompt]
        if len(prompts) * req.n > self.cfg.max_batch:  # before encoding them all
            raise ApiError(400, f"{len(prompts)} prompt(s) x n {req.n} is more than the {self.cfg.max_batch} "
                           "this server decodes at once", "invalid_value", "prompt")
        tok = self.ckpt.tokenizer
        all_ids = [self.encode(lambda p=p: prompt_ids(tok, p), "prompt") if isinstance(p, str)
                   else self.token_ids(p) for p in prompts]
        return [self.fits(ids, self.ckpt.config.model.block_size, "the prompt", "prompt") for ids in all_ids]

    def token_ids(self, ids: list[int]) -> list[int]:
        """A prompt given as token ids, checked against the vocabulary; none starts from end-of-text."""
        vocab = self.ckpt.tokenizer.vocab_size
        if any(not 0 <= i < vocab for i in ids):
            raise ApiError(400, f"prompt token ids must be in 0..{vocab - 1}", "invalid_value", "prompt")
        return list(ids) or [self.ckpt.tokenizer.eot_id]

    def chat_prompt(self, req: ChatRequest, sampling: SampleConfig) -> list[list[int]]:
        """The conversation rendered with the run's template and fitted to the context as `tinygpt chat` does:
        the oldest exchanges go first; a last user turn that alone does not fit is refused."""
        if self.template is None:
            raise ApiError(400,
                           f"{self.name} was trained on plain text, not conversations: use /v1/completions",
                           "model_not_chat", "messages")
        roles = {"developer": "system"}
        history = [Message(roles.get(m.role, m.role), m.text()) for m in req.messages]
        if any(m.role == "system" for m in history[1:]):
            raise ApiError(400, "a system message may only come first", "invalid_value", "messages")
        if history[-1].role != "user":
            raise ApiError(400, "the last message must be the user's", "invalid_value", "messages")
        budget = prompt_budget(self.ckpt.config.model.block_size, sampling.max_new_tokens)
        last = [m for m in history[:1] if m.role == "system"] + history[-1:]
        tok = self.ckpt.tokenizer
        self.fits(self.encode(lambda: self.template.render(tok, last, open_reply=True)[0], "messages"),
                  budget,
                  "the last message (with the system message)", "messages")
        # older messages are encoded here (a character the tokenizer never saw is the client's mistake)
        return [self.encode(lambda: fit_history(tok, self.template, history, budget), "messages")]

    def encode(self, fn: Any, param: str) -> list[int]:
        try:
            return fn()
        except TinyGPTError as e:  # e.g. a character the char tokenizer never saw
            raise ApiError(400, str(e), "invalid_value", param) from None

    def fits(self, ids: list[int], limit: int, what: str, param: str) -> list[int]:
        if len(ids) > limit:
            raise ApiError(400, f"{what} has {len(ids)} tokens; this model's context allows {limit} here "
                           f"(context length {self.ckpt.config.model.block_size})", "context_length_exceeded",
                           param)
        return ids

    def stop_ids(self, req: Sampling, chat: bool) -> set[int]:
        """What ends a generation, as in the CLI: end-of-text for a completion (`tinygpt sample`), the
        template's
        end-of-turn tokens for a chat reply (`tinygpt chat`); nothing with ignore_eos."""
        tok = self.ckpt.tokenizer
        if req.ignore_eos:
            return set()
        return set(self.template.stop_ids(tok)) if chat and self.template else {tok.eot_id}


class Reply:
    """A request's ticket in flight: turns the worker's token updates into text pieces, one per choice."""

    def __init__(self, server: Server, request: Request, gens: list[Generation], stops: list[str],
                 strip: bool):
        loop = asyncio.get_running_loop()
        self.updates: asyncio.Queue[Update] = asyncio.Queue()
        self.request, self.server = request, server
        self.ticket = Ticket(gens, lambda u: loop.call_soon_threadsafe(self.updates.put_nowait, u),
                             time.monotonic() + server.cfg.timeout)
        # special tokens are not text: with ignore_eos a reply goes on through <|end|>, which is left out
        self.texts = [TextPieces(server.ckpt.tokenizer, stops, strip, skip_special=True) for _ in gens]
        self.prompt_tokens = sum(len(g.prompt) for g in gens)
        try:
            server.engine.submit(self.ticket)
        except QueueFull as e:
            raise ApiError(503, str(e), "server_busy") from None

    def usage(self) -> dict[str, int]:
        completion = sum(len(t.ids) for t in self.texts)
        prompt = self.prompt_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def pieces(self) -> AsyncIterator[tuple[int, str, str | None] | None]:
        """(choice, new text, finish_reason or None) as they come; None on idle ticks (for keep-alives).
        Ends when every choice has finished or the client has gone; a failure raises ApiError."""
        done = [False] * len(self.texts)
        checked = time.monotonic()
        try:
            while not all(done):
                try:
                    u: Update | None = await asyncio.wait_for(self.updates.get(), POLL_S)
                except asyncio.TimeoutError:
                    u = None
                # also while tokens flow: a non-streaming client may leave
                if time.monotonic() - checked >= POLL_S:
                    checked = time.monotonic()
                    if await self.request.is_disconnected():
                        return
                if u is None:
                    yield None
                    continue
                if u.error:
                    timeout = "timed out" in u.error
                    raise ApiError(504 if timeout else 500, u.error, "timeout" if timeout else "server_error")
                if done[u.index]:
                    continue
                text = self.texts[u.index]
                piece, reason = text.push(u.tokens), u.finish_reason
                if text.stopped:  # a stop string: this choice is complete, its generation can go
                    self.ticket.generations[u.index].cancelled, reason = True, "stop"
                if reason:
                    piece, done[u.index] = piece + text.finish(), True
                yield u.index, piece, reason
        finally:
            self.ticket.cancel()  # a client that left (or a finished request) frees its rows at the next step


def completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


# ---------------------------------------------------------------- responses

def chat_chunk(rid: str, server: Server, choices: list[dict[str, Any]],
               usage: dict[str, int] | None = None) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": server.name,
            "system_fingerprint": None, "choices": choices, "usage": usage}


def text_chunk(rid: str, server: Server, choices: list[dict[str, Any]],
               usage: dict[str, int] | None = None) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": server.name,
            "system_fingerprint": None, "choices": choices, "usage": usage}


async def sse(reply: Reply, chat: bool, include_usage: bool) -> AsyncIterator[bytes]:
    """The reply as server-sent events: one chunk per piece, `data: [DONE]` at the end; a failure after the
    stream began is one event carrying OpenAI's error object, then the stream ends."""
    rid, server = completion_id("chatcmpl" if chat else "cmpl"), reply.server
    chunk = chat_chunk if chat else text_chunk
    last_write = time.monotonic()
    if chat:  # OpenAI opens each choice with the assistant role
        yield event(chunk(rid, server, [{"index": i, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None,
                                         "finish_reason": None} for i in range(len(reply.texts))]))
    try:
        async for item in reply.pieces():
            if item is None:
                if time.monotonic() - last_write >= server.cfg.keepalive:
                    last_write = time.monotonic()
                    yield b": keep-alive\n\n"
                continue
            i, piece, reason = item
            if piece or reason:
                content = ({"delta": {"content": piece} if piece else {}} if chat else {"text": piece})
                yield event(chunk(rid, server, [{"index": i, **content, "logprobs": None,
                                                 "finish_reason": reason}]))
                last_write = time.monotonic()
    except ApiError as e:  # the access log said 200 when the stream began: this line says how it ended
        log_failure(e)
        yield event(e.body())
        return
    if include_usage:
        yield event(chunk(rid, server, [], reply.usage()))
    yield b"data: [DONE]\n\n"


def event(data: dict[str, Any]) -> bytes:
    return b"data: " + json_bytes(data) + b"\n\n"


def json_bytes(data: dict[str, Any]) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


async def collect(reply: Reply, chat: bool) -> dict[str, Any]:
    """The whole reply as one response body."""
    texts, reasons = [""] * len(reply.texts), [None] * len(reply.texts)
    async for item in reply.pieces():
        if item is not None:
            i, piece, reason = item
            texts[i] += piece
            reasons[i] = reason or reasons[i]
    rid, server = completion_id("chatcmpl" if chat else "cmpl"), reply.server
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": t, "refusal": None},
                    "logprobs": None,
                    "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons))]
        return {**chat_chunk(rid, server, choices, reply.usage()), "object": "chat.completion"}
    choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r} for i,
               (t, r) in enumerate(zip(texts, reasons))]
    return text_chunk(rid, server, choices, reply.usage())


async def respond(reply: Reply, req: Sampling, chat: bool) -> Any:
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(sse(reply, chat, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await collect(reply, chat)


# ---------------------------------------------------------------- the app

async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing more than `limit` bytes without reading them all (413)."""
    too_large = ApiError(413, f"the request body is larger than this server's limit of {limit} bytes",
                         "body_too_large")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    try:
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise too_large
    except ClientDisconnect:  # the client left mid-body: nobody reads the answer; a log line, no traceback
        raise ApiError(400, "the client disconnected before sending the whole body", "client_disconnected") \
            from None
    return bytes(body)


def authenticator(server: Server) -> Callable[[Request], None]:
    """With --api-key, every /v1 request must carry it. (A dependency, not an HTTP middleware: Starlette's
    BaseHTTPMiddleware wraps `receive`, which hides a client's disconnect from the handler.)"""

    def authenticate(request: Request) -> None:
        key = server.cfg.api_key
        given = request.headers.get("authorization", "")
        scheme, _, token = given.strip().partition(" ")
        # the scheme is case-insensitive (RFC 7235): "bearer KEY" is as good as "Bearer KEY"
        if key and not (scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(),
                                                                             key.encode())):
            what = "no API key was given" if not given else "the API key is wrong"
            raise ApiError(401, f"{what}: send the header 'Authorization: Bearer KEY'", "invalid_api_key")

    return authenticate


def build_app(server: Server) -> FastAPI:
    """The ASGI app; the decode worker runs while the app does (its lifespan)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.engine.start()
        yield
        server.engine.stop()

    app = FastAPI(title="tinygpt", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    add_error_handlers(app)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authenticator(server))])

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": server.name, **server.engine.load()}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return resources.files("tinygpt.serve").joinpath("static/chat.html").read_text(encoding="utf-8")

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(server)]}

    @v1.get("/models/{name}")
    async def model(name: str) -> dict[str, Any]:
        if name != server.name:
            raise ApiError(404, f"the model {name!r} does not exist; this server has {server.name!r}",
                           "model_not_found")
        return model_card(server)

    async def answer(request: Request, chat: bool) -> Any:
        body = await read_body(request, server.cfg.max_body)
        req, gens, stops = await run_in_threadpool(server.prepare, body, chat)
        return await respond(Reply(server, request, gens, stops, strip=chat), req, chat)

    @v1.post("/completions")
    async def completions(request: Request) -> Any:
        return await answer(request, chat=False)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await answer(request, chat=True)

    app.include_router(v1)
    return app


def model_card(server: Server) -> dict[str, Any]:
    """OpenAI's model object, with what the chat page needs to know (an extension: chat, context_length)."""
    return {"id": server.name, "object": "model", "created": server.created, "owned_by": "tinygpt",
            "chat": server.template is not None, "context_length": server.ckpt.config.model.block_size}


def log_failure(e: ApiError) -> None:
    """One line for a request that failed on the server's side (a client's mistake has its access line)."""
    LOG.warning("request failed: %s (%s)", e.message, e.code)


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def add_error_handlers(app: FastAPI) -> None:
    """Every error, the framework's own included, in OpenAI's shape."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        if e.status >= 500:  # the server's failure, not the client's mistake: the access line needs a reason
            log_failure(e)
        return error_response(e)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return error_response(ApiError(e.status_code, str(e.detail), "not_found" if e.status_code == 404
                                       else None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return error_response(ApiError(400, str(e.errors()[0].get("msg", e)), "invalid_value"))


def serve(ckpt: Checkpoint, cfg: ServeConfig, log: Any = print) -> None:
    """Serve the run until interrupted (Ctrl-C)."""
    import uvicorn

    server = Server(ckpt, cfg)
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not cfg.api_key:
        log(f"warning: listening on {cfg.host} without --api-key: anyone who can reach this machine can use "
            "the model")
    base = f"http://{cfg.host}:{cfg.port}"
    log(f"serving {ckpt.home} as model {server.name!r} ({'chat' if server.template else 'text completion'}): "
        f"chat page {base}/ , OpenAI API {base}/v1 (max batch {cfg.max_batch})")
    uvicorn.run(build_app(server), host=cfg.host, port=cfg.port, log_level="info")  # info: a line per request
