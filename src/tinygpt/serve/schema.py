"""The OpenAI request bodies the server accepts, and OpenAI's error shape.

Only what tinygpt can honour is accepted: a field it cannot (logprobs, tools, echo, ...) is refused with
a 400 naming it rather than silently ignored, and unknown extra fields are ignored, as OpenAI's own
clients send some that change nothing here (user, metadata, store, ...).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tinygpt.config import SAMPLE_RANGES


class ApiError(Exception):
    """An error answered as OpenAI's JSON: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    @property
    def type(self) -> str:
        return {401: "authentication_error", 404: "invalid_request_error", 503: "server_error",
                500: "server_error", 504: "server_error"}.get(self.status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def sampling_field(setting: str) -> Any:
    """An optional request field that takes what config.SAMPLE_RANGES allows for `setting` (else a 400)."""
    allowed = SAMPLE_RANGES[setting]
    limits = {"gt" if allowed.open_low else "ge": allowed.low}
    if allowed.high is not None:
        limits["le"] = allowed.high
    return Field(None, **limits)


# torch.Generator.manual_seed's range: a larger seed is a 400, not an OverflowError
SEED_RANGE = (-(2**63), 2**64 - 1)
# Bounds on what costs the server CPU before a request reaches the decoder (issue #25): a chat's messages, and
# the stop strings whose starts are held back at every token.
MAX_MESSAGES = 2048
MAX_STOPS, MAX_STOP_CHARS = 4, 1000


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class Sampling(BaseModel):
    """The fields both endpoints share. None means the run's own default (see app.sampling_for).

    Strict types, as OpenAI's API has them: `"max_tokens": "5"` is a 400, not 5."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    max_tokens: int | None = sampling_field("max_new_tokens")
    temperature: float | None = sampling_field("temperature")
    top_p: float | None = sampling_field("top_p")
    # Extensions, not in OpenAI's API (the openai client sends them as extra_body): top_k; and ignore_eos, as
    # in
    # vLLM, which generates through end-of-text to exactly max_tokens (for benchmarks and load tests).
    top_k: int | None = sampling_field("top_k")
    ignore_eos: bool = False
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: Any = None
    top_logprobs: Any = None
    logit_bias: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    tools: Any = None
    functions: Any = None  # the legacy form of tools
    function_call: Any = None
    tool_choice: Any = None
    response_format: Any = None

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ApiError(400, f"stop takes at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} "
                           "characters each", "invalid_value", "stop")
        return [s for s in stops if s]

    def refuse_unsupported(self) -> None:
        """A field that would change the reply and that this server cannot honour is a 400, not ignored."""
        for name in ("logprobs", "top_logprobs", "logit_bias", "presence_penalty", "frequency_penalty",
                     "tools", "functions", "function_call", "tool_choice"):
            if getattr(self, name) not in (None, False, 0, [], {}, "none"):
                raise ApiError(400, f"{name} is not supported by this server", "unsupported_parameter", name)
        kind = self.response_format.get("type") if isinstance(self.response_format, dict) else \
            self.response_format
        if kind not in (None, "text"):  # plain text is what every reply is; JSON modes cannot be honoured
            raise ApiError(400, f"response_format {kind!r} is not supported by this server (only text)",
                           "unsupported_parameter", "response_format")


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo or self.suffix or (self.best_of or 1) > 1:
            name = "echo" if self.echo else "suffix" if self.suffix else "best_of"
            raise ApiError(400, f"{name} is not supported by this server", "unsupported_parameter", name)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            if any(p.type != "text" for p in self.content):
                raise ApiError(400, "only text content parts are supported", "unsupported_content",
                               "messages")
            return "".join(p.text or "" for p in self.content)
        return self.content or ""


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = sampling_field("max_new_tokens")


def parse(body: bytes, model: type[BaseModel]) -> Any:
    """The request body as `model`, or a 400 that says what is wrong with it and names the field the client
    sent (`prompt`, not pydantic's `prompt.str`)."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", "invalid_json") from None
    except RecursionError:  # arrays or objects nested thousands deep
        raise ApiError(400, "the request body is nested too deeply", "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", "invalid_json")
    if (where := lone_surrogate(data)) is not None:
        raise ApiError(400, f"{where}: the text holds a lone UTF-16 surrogate (such as \\ud800), which is "
                       "not a character", "invalid_value", where)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else None
        path = ".".join(str(p) for p in err["loc"] if isinstance(p, int) or p in model_fields(model))
        raise ApiError(400, f"{path or field}: {err['msg']}", "invalid_value", field) from None


def model_fields(model: type[BaseModel]) -> set[str]:
    """The field names of a request model and of the models inside it (to tell them from pydantic's names
    for the branches of a union in an error's location)."""
    return {"role", "content", "type", "text", "include_usage", *model.model_fields}


def lone_surrogate(data: dict[str, Any]) -> str | None:
    """The top-level field whose text holds a lone surrogate (JSON's \\ud800 escapes allow them; they cannot
    be encoded or tokenized), or None. Walked without recursion: json.loads already bounds the depth."""
    for field, value in data.items():
        todo = [value]
        while todo:
            item = todo.pop()
            if isinstance(item, str):
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    return str(field)
            elif isinstance(item, dict):
                todo.extend(item.values())
                todo.extend(item.keys())
            elif isinstance(item, list):
                todo.extend(item)
    return None
