"""Greedy decoding of one GGUF file through llama.cpp (llama-cpp-python), in a process of its own.

Run by bench/generate.py, so that a llama.cpp crash (seen: a segfault in its AMX kernel on some shapes) costs
a row of the table, not the benchmark. Prints one JSON line: tokens/s (prompt included, as the other rows) and
the new token ids.

    python bench/llama_cpp_run.py MODEL.gguf --prompt 1,2,3 --new-tokens 128 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def greedy(llm, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out: list[int] = []
    for _ in range(n):
        out.append(int(llm.scores[llm.n_tokens - 1].argmax()))
        llm.eval([out[-1]])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("gguf")
    p.add_argument("--prompt", required=True, help="comma-separated token ids")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    import llama_cpp

    prompt = [int(t) for t in args.prompt.split(",")]
    llm = llama_cpp.Llama(args.gguf, n_ctx=len(prompt) + args.new_tokens + 1, n_threads=os.cpu_count(),
                          logits_all=True, verbose=False)
    tokens = greedy(llm, prompt, args.new_tokens)  # warm-up, and the tokens to compare
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        greedy(llm, prompt, args.new_tokens)
        times.append(time.perf_counter() - start)
    print(json.dumps({"tok_s": args.new_tokens / statistics.median(times), "tokens": tokens,
                      "version": llama_cpp.__version__}))


if __name__ == "__main__":
    main()
