import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tinygpt.data.dialogs import Message
from tinygpt.tokenizer import build_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Keep the tokenized-data cache out of the user's home and shared across one test session."""
    monkeypatch.setenv("TINYGPT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def text_file(tmp_path) -> Path:
    lines = [f"The {a} {b} jumps over the {c} fence number {i}." for i, (a, b, c) in
             enumerate(zip(["quick", "slow", "red", "tall"] * 50, ["fox", "dog", "cat", "owl"] * 50,
                           ["low", "high", "old", "new"] * 50))]
    p = tmp_path / "corpus.txt"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def perturbed_gpt(scale: float, **cfg):
    """A small GPT (seeded) with noise on every parameter, so that zero- and one-initialised pieces matter
    too."""
    import torch

    from tinygpt.config import ModelConfig
    from tinygpt.model import GPT

    torch.manual_seed(0)
    m = GPT(ModelConfig(**cfg))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(scale * torch.randn_like(p))
    return m.eval()


def greedy_without_cache(model, prompt, n: int):
    """The reference for cached decoding: prompt (B, T) and n greedy tokens, a full forward pass for each."""
    import torch

    full = prompt
    for _ in range(n):
        logits, _ = model(full)
        full = torch.cat([full, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return full


def tiny_flags(**extra) -> list[str]:
    """Command-line flags for a model and schedule small enough to train in about a second."""
    flags = {"model.n_layer": 1, "model.n_head": 2, "model.n_embd": 16, "model.block_size": 16,
             "train.max_iters": 6, "train.batch_size": 4, "train.eval_interval": 3, "train.eval_iters": 2,
             "train.checkpoint_interval": 3, "train.warmup_iters": 2, **extra}
    return [a for k, v in flags.items() for a in (f"--{k}", str(v))]


# Conversations and tokenizers for the chat-template, packing and chat-session tests.
U, A, S = ((lambda t: Message("user", t)), (lambda t: Message("assistant", t)),
           (lambda t: Message("system", t)))
TEXTS = ["hello there", "hi! how are you?", "what is 2 plus 3?", "5", "be brief"]


def tok_for(template, kind="char"):
    return build_tokenizer(kind, TEXTS + ["User: Bot: System: <user>: <assistant>: <system>: "],
                           special_tokens=template.specials)


# ---------------------------------------------------------------- trained runs and a real server, for the
# serve tests

def train_run(tmp_path_factory, out: Path, *flags: str) -> Path:
    """`tinygpt train` for a session-wide fixture, which runs before the per-test _private_cache: same
    cache."""
    from tinygpt.cli import main

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TINYGPT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        assert main(["train", "--out", str(out), *flags]) == 0
    return out


@pytest.fixture(scope="session")
def chat_run(tmp_path_factory) -> Path:
    """A small model trained for a few seconds on the built-in conversations."""
    return train_run(tmp_path_factory, tmp_path_factory.mktemp("serve") / "chat", *tiny_flags(**{
        "model.n_layer": 2, "model.n_embd": 64, "model.block_size": 64, "train.max_iters": 150,
        "train.batch_size": 8, "train.eval_interval": 150, "train.checkpoint_interval": 150}))


MAT_WORDS = (["red", "old", "big", "shy"], ["cat", "dog", "owl", "fox"])


def mat_text(root: Path) -> Path:
    """240 lines "The red cat sat on mat number 0." ...: text a small model learns in seconds."""
    text = root / "text.txt"
    text.write_text("".join(f"The {a} {b} sat on mat number {i}.\n" for i, (a, b) in
                            enumerate(zip(MAT_WORDS[0] * 60, MAT_WORDS[1] * 60))))
    return text


@pytest.fixture(scope="session")
def text_run(tmp_path_factory) -> Path:
    """A small character-level model trained on plain text."""
    root = tmp_path_factory.mktemp("serve-text")
    return train_run(tmp_path_factory, root / "text", "--data", str(mat_text(root)), "--tokenizer", "char",
                     *tiny_flags(**{
        "model.n_layer": 2, "model.n_embd": 64, "model.block_size": 64, "train.max_iters": 150,
        "train.batch_size": 8, "train.eval_interval": 150, "train.checkpoint_interval": 150}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerURL(str):
    """A served run's base URL, which can also read the server's log so far."""

    log_path = ""

    def log(self) -> str:
        # a handle of its own: seeking the server's would move where the server writes
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()


def error_of(response, status: int) -> dict:
    """The OpenAI error object of an httpx response that must have `status`."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@contextlib.contextmanager
def serve(run_dir: Path, *extra: str) -> Iterator[ServerURL]:
    """`tinygpt serve` on a free loopback port in a subprocess; yields its base URL, stops it afterwards."""
    import httpx

    port = free_port()
    log = tempfile.TemporaryFile("w+")  # not a pipe: a full pipe would block the server
    exact = [] if "--dtype" in extra else ["--dtype", "float32"]  # the tests compare tokens with float32's
    proc = subprocess.Popen([sys.executable, "-m", "tinygpt", "serve", "--run", str(run_dir), "--port",
                             str(port),
                             *exact, *extra],
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    base = ServerURL(f"http://127.0.0.1:{port}")
    base.log_path = f"/proc/{os.getpid()}/fd/{log.fileno()}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise AssertionError(f"tinygpt serve exited with {proc.returncode}: {log.read()}")
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("tinygpt serve did not answer /health within 60 s")
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
