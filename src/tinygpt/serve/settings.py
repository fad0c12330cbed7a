"""The settings of `tinygpt serve`, kept apart from the server so the command's --help needs no web stack."""

from __future__ import annotations

from dataclasses import dataclass

from tinygpt.errors import UsageError


@dataclass
class ServeConfig:
    """Settings of `tinygpt serve` (the server's own, not saved with the run)."""

    host: str = "127.0.0.1"
    """Address to listen on; anything but loopback is reachable from other machines."""
    port: int = 8000
    """TCP port."""
    api_key: str | None = None
    """When set, /v1 requests need the header `Authorization: Bearer KEY`."""
    max_batch: int = 16
    """Generations decoded together (each holds a row of the KV cache)."""
    queue_size: int = 64
    """Requests that may wait for a free row; more are refused with 503."""
    max_tokens: int = 2048
    """The most new tokens one choice may ask for."""
    timeout: float = 600.0
    """Seconds a request may take from arrival to its last token."""
    max_body: int = 1 << 20
    """Largest request body in bytes; larger ones get 413."""
    keepalive: float = 15.0
    """Seconds of silence after which a stream gets an SSE comment, so proxies keep it open."""
    model_name: str | None = None
    """The model id clients ask for (default: the run directory's name)."""

    def validate(self) -> None:
        positive = {"max_batch": self.max_batch, "max_tokens": self.max_tokens, "timeout": self.timeout,
                    "max_body": self.max_body, "keepalive": self.keepalive}
        for name, value in positive.items():
            if value <= 0:
                raise UsageError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if self.queue_size < 0 or not 0 <= self.port <= 65535:
            raise UsageError(f"--queue-size must be 0 or more and --port in 0..65535 (got {self.queue_size}, "
                             f"{self.port})")
