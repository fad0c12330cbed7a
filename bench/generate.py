"""Batch-1 generation speed: tinygpt against Hugging Face transformers, on the same weights.

Both models get the same random GPT-2 weights (transformers builds them from a fixed seed and
tinygpt loads its state dict), the same 16-token prompt, and decode 128 new tokens greedily with a
KV cache. Each side is warmed up once, then the two are timed in alternation (so a slow spell on
the machine hits both) and the median tokens/s is reported; the time covers the whole call,
prompt included, as a user of either API would see it. In float32 the two must pick the same
tokens, which checks that the comparison is like for like.

    python bench/generate.py                  # both shapes, float32 (+ bf16 where native)
    python bench/generate.py --shapes 10M --repeats 5
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

# common first: it puts this checkout's src/ on the import path for tinygpt
from common import (
    SHARED_DATA,
    OtherLoad,
    load_warning,
    median,
    parser,
    print_table,
    ratio,
    run_cases,
    save_results,
    timed,
)

from tinygpt.config import ModelConfig, SampleConfig
from tinygpt.device import cpu_has_native_bf16
from tinygpt.infer.generate import generate_ids
from tinygpt.infer.quantize import quantize
from tinygpt.init_from import gpt2_state_from_hf
from tinygpt.model import GPT

# GPT-2 small, and a 10M-parameter model (not counting its 19M-parameter embedding) on the same vocabulary.
SHAPES: dict[str, dict[str, int]] = {
    "124M": dict(n_layer=12, n_head=12, n_embd=768),
    "10M": dict(n_layer=6, n_head=6, n_embd=384),
}
VOCAB = 50257
CONTEXT = 1024
PROMPT_TOKENS = 16
NEW_TOKENS = 128
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# llama.cpp's AMX int8 kernel segfaulted on q8_0 matmuls on an Intel Xeon with AMX; a build without it
# (CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON ... -DGGML_AMX_INT8=OFF", pip install --target DIR) goes
# here.
LLAMA_CPP_PATH = os.environ.get("TINYGPT_BENCH_LLAMA_CPP", "")


def build_models(shape: str, dtype: torch.dtype, device: torch.device, seed: int = 0) -> tuple[GPT, Any]:
    """The transformers GPT-2 and a tinygpt GPT holding exactly its weights."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # its notes about unused config fields would drown the figures

    dims = SHAPES[shape]
    torch.manual_seed(seed)
    hf_config = GPT2Config(n_layer=dims["n_layer"], n_head=dims["n_head"], n_embd=dims["n_embd"],
                           n_positions=CONTEXT, vocab_size=VOCAB, resid_pdrop=0.0, embd_pdrop=0.0,
                           attn_pdrop=0.0)
    hf = GPT2LMHeadModel(hf_config).eval()
    ours = GPT(ModelConfig(**dims, block_size=CONTEXT, vocab_size=VOCAB))
    ours.load_state_dict(gpt2_state_from_hf(hf.state_dict()))
    return ours.to(device=device, dtype=dtype).eval(), hf.to(device=device, dtype=dtype)


def tinygpt_decode(model: GPT, prompt: torch.Tensor) -> torch.Tensor:
    return generate_ids(model, prompt, SampleConfig(max_new_tokens=NEW_TOKENS,
                                                    temperature=0))[:, prompt.size(1):]


def hf_decode(model: Any, prompt: torch.Tensor) -> torch.Tensor:
    # min_new_tokens keeps transformers from stopping at its end-of-text id, so both sides make 128 tokens;
    # the explicit mask and pad id only silence warnings (a batch of one has no padding).
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                             max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, use_cache=True,
                             pad_token_id=model.config.eos_token_id)
    return out[:, prompt.size(1):]


def bench_case(shape: str, dtype_name: str, device: torch.device, repeats: int) -> dict[str, Any]:
    dtype = DTYPES[dtype_name]
    ours, hf = build_models(shape, dtype, device)
    prompt = torch.randint(0, VOCAB, (1, PROMPT_TOKENS),
                           generator=torch.Generator().manual_seed(1)).to(device)
    # The warm-up calls pay one-off costs (allocator growth, kernel selection) and give the tokens to compare.
    ours_tokens, hf_tokens = tinygpt_decode(ours, prompt), hf_decode(hf, prompt)
    ours_times, hf_times = [], []
    with OtherLoad() as load:
        for _ in range(repeats):
            ours_times.append(timed(lambda: tinygpt_decode(ours, prompt), device)[0])
            hf_times.append(timed(lambda: hf_decode(hf, prompt), device)[0])
    ours_tok_s, hf_tok_s = NEW_TOKENS / median(ours_times), NEW_TOKENS / median(hf_times)
    # bf16 rounding can legitimately flip a near-tie, so token identity is only a check in float32.
    match = bool(torch.equal(ours_tokens, hf_tokens)) if dtype == torch.float32 else None
    return dict(shape=shape, dtype=dtype_name, device=device.type, tinygpt_tok_s=ours_tok_s,
                hf_tok_s=hf_tok_s,
                ratio=ratio(ours_tok_s, hf_tok_s), tokens_match=match, tinygpt_s=ours_times, hf_s=hf_times,
                other_load=load.share)


# ---------------------------------------------------------------- precisions, batch 8 and llama.cpp

def gguf_files(model: GPT, folder: Path) -> dict[str, Path] | str:
    """The model written as GGUF in f32 and q8_0 (tinygpt's own exporter), or why it cannot be."""
    try:
        from tinygpt.checkpoint import Checkpoint
        from tinygpt.config import Config, DataConfig
        from tinygpt.export.gguf import export_gguf
        from tinygpt.tokenizer import GPT2Tokenizer

        ranks = SHARED_DATA / "gpt2.tiktoken"
        ckpt = Checkpoint(folder / "bench" / "checkpoints" / "last", model, Config(model=model.config,
                          data=DataConfig(tokenizer="gpt2")), GPT2Tokenizer.build(str(ranks), []), {})
        return {dtype: export_gguf(ckpt, folder / f"model-{dtype}.gguf", None, dtype, log=lambda m: None)
                for dtype in ("f32", "q8_0")}
    except Exception as e:  # noqa: BLE001 - any failure is a skipped row, with its reason
        return f"{type(e).__name__}: {e}"


def llama_cpp_row(path: Path, prompt: torch.Tensor, repeats: int) -> dict[str, Any]:
    """llama.cpp's greedy tokens/s for one GGUF file, in a subprocess (see bench/llama_cpp_run.py)."""
    try:
        if not LLAMA_CPP_PATH:
            import llama_cpp  # noqa: F401 - only to say why the row is skipped
    except ImportError:
        return {"skipped": "llama-cpp-python is not installed (make bench and make test-slow build it)"}
    cmd = [sys.executable, str(Path(__file__).with_name("llama_cpp_run.py")), str(path), "--prompt",
           ",".join(map(str, prompt[0].tolist())), "--new-tokens", str(NEW_TOKENS), "--repeats", str(repeats)]
    env = dict(os.environ)
    # a llama-cpp-python installed elsewhere (pip install --target DIR), e.g. built without AMX
    if LLAMA_CPP_PATH:
        env["PYTHONPATH"] = os.pathsep.join([LLAMA_CPP_PATH, env.get("PYTHONPATH", "")])
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    if done.returncode != 0:
        return {"skipped": f"llama.cpp exited with {done.returncode} "
                f"({(done.stderr.strip().splitlines() or [''])[-1][:120]})"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def precision_case(shape: str, repeats: int) -> dict[str, Any]:
    """tinygpt in float32, bf16 and int8 at batch 1 and 8, transformers float32 at batch 1 and 8, llama.cpp
    f32 and
    q8_0 at batch 1: the same weights and prompt, 128 greedy tokens each, in one run."""
    cpu = torch.device("cpu")
    ours, hf = build_models(shape, torch.float32, cpu)
    gen = torch.Generator().manual_seed(1)
    prompts = {b: torch.randint(0, VOCAB, (b, PROMPT_TOKENS), generator=gen) for b in (1, 8)}
    prompts[8][0] = prompts[1][0]  # so that row 0 of a batch can be compared with batch 1's tokens
    sides: dict[str, Any] = {"float32": ours}
    if cpu_has_native_bf16():  # emulated bf16 would only measure the emulation
        sides["bfloat16"] = quantize(copy.deepcopy(ours), "bfloat16")
    sides["int8"] = quantize(copy.deepcopy(ours), "int8")
    rows: dict[str, Any] = {}
    with OtherLoad() as load:
        for b, prompt in prompts.items():
            for name, model in sides.items():
                tokens = tinygpt_decode(model, prompt)
                times = [timed(lambda m=model, x=prompt: tinygpt_decode(m, x), cpu)[0]
                         for _ in range(repeats)]
                rows[f"tinygpt {name} b{b}"] = dict(tok_s=b * NEW_TOKENS / median(times),
                                                    tokens=tokens[0].tolist())
            hf_decode(hf, prompt)
            times = [timed(lambda x=prompt: hf_decode(hf, x), cpu)[0] for _ in range(repeats)]
            rows[f"transformers float32 b{b}"] = dict(tok_s=b * NEW_TOKENS / median(times))
        with tempfile.TemporaryDirectory() as tmp:
            files = gguf_files(ours, Path(tmp))
            for dtype in ("f32", "q8_0"):
                rows[f"llama.cpp {dtype} b1"] = (llama_cpp_row(files[dtype], prompts[1], repeats)
                                                 if isinstance(files, dict)
                                                 else {"skipped": files})
    ref = rows["tinygpt float32 b1"]["tokens"]
    for r in rows.values():
        if "tokens" in r:
            r["same_tokens_as_float32"] = sum(a == b for a, b in zip(r.pop("tokens"), ref))
    return dict(shape=shape, rows=rows, other_load=load.share)


def print_precisions(results: list[dict[str, Any]]) -> None:
    for r in results:
        hf1 = r["rows"]["transformers float32 b1"]["tok_s"]
        table = []
        for name, row in r["rows"].items():
            if "skipped" in row:
                table.append((name, "-", "-", f"skipped: {row['skipped']}"))
                continue
            same = row.get("same_tokens_as_float32")
            table.append((name, row["tok_s"], f"{row['tok_s'] / hf1:.2f}x", "" if same is None
                          else f"{same}/{NEW_TOKENS}"))
        print(f"\n{r['shape']}: greedy, {PROMPT_TOKENS}-token prompt, {NEW_TOKENS} new tokens (per row of "
              f"the batch){load_warning(r['other_load'])}")
        print_table(["side", "tok/s (all rows)", "vs transformers fp32 b1", "same tokens as tinygpt fp32"],
                    table)


def describe(r: dict[str, Any]) -> str:
    match = "" if r["tokens_match"] is None else f", same tokens: {'yes' if r['tokens_match'] else 'NO'}"
    return (f"tinygpt {r['tinygpt_tok_s']:.1f} tok/s, transformers {r['hf_tok_s']:.1f} tok/s, "
            f"ratio {r['ratio']:.2f}x{match}")


def run(shapes: list[str], dtypes: list[str], repeats: int) -> list[dict[str, Any]]:
    return run_cases(shapes, dtypes, lambda shape, dtype, device: bench_case(shape, dtype, device, repeats),
                     describe)


def print_summary(results: list[dict[str, Any]]) -> None:
    rows = [(f"{r['device']} {r['shape']} {r['dtype']}", r["tinygpt_tok_s"], r["hf_tok_s"],
             f"{r['ratio']:.2f}x",
             {True: "yes", False: "NO", None: "-"}[r["tokens_match"]])
            for r in results if "skipped" not in r]
    print_table(["generation, batch 1 (tok/s)", "tinygpt", "transformers", "ratio", "same tokens"], rows)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = parser(__doc__, SHAPES, DTYPES)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per side (after one warm-up)")
    args = p.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    print(f"batch-1 greedy generation: {PROMPT_TOKENS}-token prompt, {NEW_TOKENS} new tokens, "
          f"median of {repeats} after a warm-up")
    results = run(args.shapes, args.dtypes, repeats)
    print_summary(results)
    precisions = [precision_case(shape, repeats) for shape in args.shapes]
    print_precisions(precisions)
    if not args.no_save:
        save_results("generate", results)
        save_results("generate_precisions", precisions)
    return results + precisions  # a precision case has "rows" (and no "device"): run_all tells them apart


if __name__ == "__main__":
    main()
