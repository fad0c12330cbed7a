"""What int8 weights cost in quality: val perplexity and greedy tokens against float32, on trained models.

Two models, each trained here by the real command line (or given with --demo-run / --big-run):

* the demo model (`tinygpt train` with its defaults: the built-in conversations), whose val perplexity int8
  may move by under 1% (the bound `--dtype auto` holds), and whose greedy chat replies are compared;
* a GPT-2 124M-shape model trained on Tiny Shakespeare (GPT-2 tokenizer) for --big-budget seconds, whose
greedy
  continuations of a few prompts in int8 are compared token by token with float32's.

    python bench/int8_quality.py                        # trains both (about 4 + 6 minutes on 2 cores)
    python bench/int8_quality.py --demo-run runs/demo --big-run runs/shakespeare-124m
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from common import REPO, SHAKESPEARE, SHARED_DATA, print_table, save_results

from tinygpt import run as tinygpt_run
from tinygpt.config import SampleConfig
from tinygpt.evaluate import evaluate_run
from tinygpt.infer.chat import ChatSession
from tinygpt.infer.generate import generate_ids

QUESTIONS = ["Hello", "what is 2 plus 3?", "what is the capital of France?", "reverse the word tiger",
             "say stone twice", "What is AI?", "Tell me a joke"]
PROMPTS = ["ROMEO:", "First Citizen:\nBefore we proceed", "KING HENRY:\nO God", "JULIET:\nWherefore"]
NEW_TOKENS = 128
# Batches of 4 windows: a 124M step costs ~1 TFLOP per 1,000 tokens, so on 2 cores small batches are what give
# a
# few minutes of training more than a handful of steps (batch 16 managed 8 steps in 180 s, val loss 8.2).
BIG_SHAPE = ["--model.n_layer", "12", "--model.n_head", "12", "--model.n_embd", "768", "--model.block_size",
             "256",
             "--model.auto_size", "false", "--train.batch_size", "4", "--train.eval_interval", "50"]


def train(out: Path, *flags: str) -> Path:
    cmd = [sys.executable, "-m", "tinygpt", "train", "--out", str(out), "--overwrite", *flags]
    print("$ " + " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)
    return out


def perplexities(run_dir: Path) -> dict[str, float]:
    """Val perplexity of the run's last checkpoint in float32 and in int8."""
    out = {}
    for dtype in ("float32", "int8"):
        out[dtype] = evaluate_run(tinygpt_run.load(run_dir, device="cpu", dtype=dtype), limit=0,
                                  log=lambda m: None)["perplexity"]
    return out


def chat_replies(run_dir: Path, dtype: str) -> list[str]:
    ckpt = tinygpt_run.load(run_dir, device="cpu", dtype=dtype)
    template = tinygpt_run.chat_template(ckpt)
    return [ChatSession(ckpt.model, ckpt.tokenizer, template).reply(question) for question in QUESTIONS]


def continuations(run_dir: Path, dtype: str) -> list[list[int]]:
    ckpt = tinygpt_run.load(run_dir, device="cpu", dtype=dtype)
    greedy = SampleConfig(max_new_tokens=NEW_TOKENS, temperature=0, top_k=None)
    return [generate_ids(ckpt.model, torch.tensor([ckpt.tokenizer.encode(p)]),
                         greedy)[0, -NEW_TOKENS:].tolist()
            for p in PROMPTS]


def compare(fp32: list[list[int]], int8: list[list[int]]) -> list[dict[str, int]]:
    """Per prompt: how many of the new tokens are equal position by position, and where the first difference
    is."""
    rows = []
    for a, b in zip(fp32, int8):
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        rows.append(dict(same=sum(x == y for x, y in zip(a, b)), first_difference=first, tokens=len(a)))
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo-run", type=Path, help="an existing demo run (default: train one)")
    p.add_argument("--big-run", type=Path, help="an existing 124M-shape run (default: train one)")
    p.add_argument("--big-budget", type=float, default=300,
                   help="seconds of training for the 124M-shape model")
    p.add_argument("--quick", action="store_true", help="a shorter 124M-shape training (120 s)")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        # what it trains is what counts
        demo = args.demo_run or train(Path(tmp) / "demo", "--train.dtype", "float32")
        big = args.big_run or train(Path(tmp) / "big", "--data", str(SHAKESPEARE),
                                    "--tokenizer",
                                    "gpt2", "--data.gpt2_ranks", str(SHARED_DATA / "gpt2.tiktoken"),
                                    *BIG_SHAPE,
                                    "--train.time_budget", str(120 if args.quick else args.big_budget))
        result = dict(demo=dict(perplexity=perplexities(demo), same_replies=None),
                      big=dict(perplexity=perplexities(big),
                               continuations=compare(continuations(big, "float32"),
                                                     continuations(big, "int8"))))
        fp32, int8 = chat_replies(demo, "float32"), chat_replies(demo, "int8")
        result["demo"]["same_replies"] = sum(a == b for a, b in zip(fp32, int8))
        result["demo"]["replies"] = len(QUESTIONS)
    report(result)
    if not args.no_save:
        save_results("int8_quality", result)
    return result


def report(result: dict[str, Any]) -> None:
    rows = []
    for name, label in (("demo", "demo model (built-in conversations)"),
                        ("big", "124M shape, Tiny Shakespeare")):
        ppl = result[name]["perplexity"]
        rows.append((label, f"{ppl['float32']:.4f}", f"{ppl['int8']:.4f}",
                     f"{(ppl['int8'] / ppl['float32'] - 1):+.3%}"))
    print_table(["model", "val ppl float32", "val ppl int8", "change (bound: < 1%)"], rows)
    d = result["demo"]
    print(f"demo model: {d['same_replies']} of {d['replies']} greedy chat replies the same in int8")
    for prompt, c in zip(PROMPTS, result["big"]["continuations"]):
        print(f"124M shape, prompt {prompt!r}: {c['same']}/{c['tokens']} greedy tokens the same position by "
              f"position, first difference at new token {c['first_difference']}")


if __name__ == "__main__":
    main()
