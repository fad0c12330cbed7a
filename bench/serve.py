"""Serving throughput: `tinygpt serve` under 1, 4 and 16 concurrent streaming clients, then a mixed load.

The server runs in its own process (as a user would run it) with its default --max-batch 16; the clients
are asyncio tasks streaming /v1/completions with the official openai client. Each phase reports the
aggregate tokens/s (all completion tokens over the phase's wall time) and the time to first token (p50 and
p99); the ratio to the single-client phase is the point: batched decoding shares each weight read among
the active requests, so 16 clients should get several times the throughput of one. Every request asks
for a fixed number of tokens (ignore_eos), so the phases do the same work per request. The mixed phase
sends 200 requests of random prompt and reply lengths and counts errors (the goal: none).

Two models: the demo model's shape (`tinygpt train`'s defaults) and GPT-2 124M's, each trained for one
step so that they are real run directories (speed does not depend on what the weights learned).

    python bench/serve.py                 # both shapes
    python bench/serve.py --shapes demo --quick
    python bench/serve.py --run runs/demo # an existing run instead
"""

from __future__ import annotations

import asyncio
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (  # common first: it puts src/ on the path
    SHARED_DATA,
    OtherLoad,
    load_warning,
    parser,
    print_table,
    ratio,
    save_results,
)

SHAPES: dict[str, list[str]] = {
    "demo": [],  # the modern preset on the built-in conversations: what `make demo` trains
    # GPT-2 small: the microgpt preset is GPT-2's architecture and tokenizer (step-limited, not by epochs)
    "124M": ["--preset", "microgpt", "--model.n_layer", "12", "--model.n_head", "12", "--model.n_embd", "768",
             "--model.block_size", "1024", "--train.epochs", "", "--data.gpt2_ranks",
             str(SHARED_DATA / "gpt2.tiktoken")],
}
CLIENTS = (1, 4, 16)
NEW_TOKENS = 64


def make_run(shape: str, root: Path) -> Path:
    out = root / shape
    cmd = [sys.executable, "-m", "tinygpt", "train", "--out", str(out), *SHAPES[shape], "--train.max_iters",
           "1",
           "--train.batch_size", "1", "--train.eval_iters", "1", "--model.auto_size", "false"]
    subprocess.run(cmd, check=True, capture_output=True)
    return out


def start_server(run_dir: Path, port: int, dtype: str) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen([sys.executable, "-m", "tinygpt", "serve", "--run", str(run_dir), "--port",
                             str(port),
                             "--model-name", "bench", "--dtype", dtype], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the server did not start")


async def one_request(client: Any, prompt: str, max_tokens: int) -> tuple[float, int]:
    """(seconds to the first token, completion tokens) of one streamed completion."""
    started = time.perf_counter()
    first, tokens = None, 0
    stream = await client.completions.create(model="bench", prompt=prompt, max_tokens=max_tokens,
                                             temperature=0.8,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text and first is None:
            first = time.perf_counter() - started
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return first if first is not None else time.perf_counter() - started, tokens


async def phase(base: str, jobs: list[list[tuple[str, int]]]) -> dict[str, Any]:
    """Each inner list is one client's requests, sent one after another; the clients run concurrently."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="bench", max_retries=0, timeout=600)
    ttfts: list[float] = []
    errors: list[str] = []
    tokens = 0

    async def run_client(requests: list[tuple[str, int]]) -> None:
        nonlocal tokens
        for prompt, n in requests:
            try:
                ttft, got = await one_request(client, prompt, n)
                ttfts.append(ttft)
                tokens += got
            except Exception as e:  # counted, not raised: the mixed phase's goal is zero of them
                errors.append(f"{type(e).__name__}: {e}")

    started = time.perf_counter()
    await asyncio.gather(*(run_client(r) for r in jobs))
    wall = time.perf_counter() - started
    await client.close()
    q = sorted(ttfts)
    return dict(requests=sum(len(r) for r in jobs), tokens=tokens, wall_s=wall, tok_s=tokens / wall,
                ttft_p50_s=statistics.median(q) if q else None,
                ttft_p99_s=q[min(len(q) - 1, int(0.99 * len(q)))] if q else None, errors=len(errors),
                first_errors=errors[:3])


def bench_shape(name: str, run_dir: Path, port: int, requests_per_client: int, mixed: int,
                dtype: str) -> dict[str, Any]:
    proc = start_server(run_dir, port, dtype)
    base = f"http://127.0.0.1:{port}"
    rng = random.Random(0)
    words = "the of and to in is was that for on with as by at from his her you".split()
    try:
        asyncio.run(phase(base, [[("The", 8)]]))  # warm-up: first-call costs out of the figures
        rows = {}
        with OtherLoad(pids=[proc.pid]) as load:
            for c in CLIENTS:
                jobs = [[(" ".join(rng.choices(words, k=8)), NEW_TOKENS)] * requests_per_client
                        for _ in range(c)]
                rows[c] = asyncio.run(phase(base, jobs))
                print(f"  {name}: {c:2d} clients: {rows[c]['tok_s']:,.1f} tok/s aggregate, TTFT p50 "
                      f"{rows[c]['ttft_p50_s'] * 1000:.0f} ms, p99 {rows[c]['ttft_p99_s'] * 1000:.0f} ms, "
                      f"{rows[c]['errors']} errors", flush=True)
            mix = [(" ".join(rng.choices(words, k=rng.randint(1, 60))), rng.randint(1, 2 * NEW_TOKENS))
                   for _ in range(mixed)]
            mixed_row = asyncio.run(phase(base, [mix[i::16] for i in range(16)]))
        print(f"  {name}: mixed load, {mixed} requests from 16 clients: {mixed_row['tok_s']:,.1f} tok/s, "
              f"{mixed_row['errors']} errors {mixed_row['first_errors']}{load_warning(load.share)}",
              flush=True)
    finally:
        proc.terminate()
        proc.wait()
    return dict(shape=name, dtype=dtype, clients={str(c): r for c, r in rows.items()}, mixed=mixed_row,
                speedup_16=ratio(rows[16]["tok_s"], rows[1]["tok_s"]), other_load=load.share)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = parser(__doc__, SHAPES)
    p.add_argument("--run", type=Path, default=None,
                   help="benchmark this run directory instead of the shapes")
    p.add_argument("--requests", type=int, default=4,
                   help="requests each client sends per phase (default: 4)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--dtype", default="float32",
                   help="the server's --dtype (default: float32, the exact weights)")
    args = p.parse_args(argv)
    per_client, mixed = (2, 100) if args.quick else (args.requests, 200)
    print(f"serving: streamed completions of {NEW_TOKENS} tokens from 1, 4 and 16 concurrent clients "
          f"({per_client} each), then {mixed} of mixed lengths")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        targets = {args.run.name: args.run} if args.run else {s: None for s in args.shapes}
        for name, run_dir in targets.items():
            results.append(bench_shape(name, run_dir or make_run(name, Path(tmp)), args.port, per_client,
                                       mixed,
                                       args.dtype))
    rows = [(r["shape"], *(r["clients"][str(c)]["tok_s"] for c in CLIENTS), f"{r['speedup_16']:.2f}x",
             f"{r['clients']['16']['ttft_p50_s'] * 1000:.0f} / {r['clients']['16']['ttft_p99_s'] * 1000:.0f} "
             "ms",
             f"{r['mixed']['errors']} of {r['mixed']['requests']}") for r in results]
    print_table(["serving (aggregate tok/s)", "1 client", "4 clients", "16 clients", "16 vs 1 (goal >= 4x)",
                 "TTFT p50/p99 at 16", "mixed-load errors"], rows)
    if not args.no_save:
        save_results("serve", results)
    return results


if __name__ == "__main__":
    main()
