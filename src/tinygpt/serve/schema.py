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


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    """The fields both endpoints share. None means the run's own default (see app.sampling_for)."""

    model_config = ConfigDict(extra="ignore")

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
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: Any = None
    tools: Any = None

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise ApiError(400, "stop takes at most 4 strings", "invalid_value", "stop")
        return [s for s in stops if s]

    def refuse_unsupported(self) -> None:
        for name in ("logprobs", "tools"):
            if getattr(self, name):
                raise ApiError(400, f"{name} is not supported by this server", "unsupported_parameter", name)


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo or self.suffix or (self.best_of or 1) > 1:
            name = "echo" if self.echo else "suffix" if self.suffix else "best_of"
            raise ApiError(400, f"{name} is not supported by this server", "unsupported_parameter", name)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
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
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = sampling_field("max_new_tokens")


def parse(body: bytes, model: type[BaseModel]) -> Any:
    """The request body as `model`, or a 400 that says what is wrong with it."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", "invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ApiError(400, f"{where}: {err['msg']}", "invalid_value", where or None) from None
