"""Benchmark scoring (`tinygpt eval --tasks`): tinygpt's harness model against lm-evaluation-harness's own
`hf` model (transformers) on the same weights.

A GPT-2-shaped model with random weights (the same in both, as in bench/generate.py) and the GPT-2 tokenizer
is saved as a tinygpt checkpoint and exported with `tinygpt export --format hf`; both sides then score the
same HellaSwag-shaped items: a context of about 60 tokens and four endings of about 25 (slices of Tiny
Shakespeare at word boundaries). Each side scores every ending's log-likelihood with a batch of 16, timed in
alternation after a warm-up (median of the repeats); the figure is items (four endings each) per second. The
two must agree: the largest difference of a log-likelihood is reported, and the accuracy of both picks.

    python bench/tasks.py                    # both shapes, 32 items, 2 repeats (about 4 minutes)
    python bench/tasks.py --shapes 10M --quick
"""

from __future__ import annotations

import random
import resource
import tempfile
from pathlib import Path
from typing import Any

import torch
from common import SHAKESPEARE, SHARED_DATA, median, parser, print_table, ratio, save_results, timed
from generate import CONTEXT, SHAPES, build_models

from tinygpt import checkpoint
from tinygpt.config import Config, ModelConfig
from tinygpt.export.hf import export_hf
from tinygpt.tokenizer import build_tokenizer

CONTEXT_CHARS, ENDING_CHARS = 260, 110  # about 60 and 25 GPT-2 tokens of Shakespeare


def hellaswag_items(n: int, seed: int = 0) -> list[tuple[str, list[str], int]]:
    """n (context, four endings, gold) items cut from Tiny Shakespeare, HellaSwag's shape and lengths."""
    text = " ".join(SHAKESPEARE.read_text(encoding="utf-8").split())
    rng = random.Random(seed)

    def words(chars: int) -> str:
        start = text.index(" ", rng.randrange(len(text) - 2 * chars)) + 1
        return text[start:text.rindex(" ", start, start + chars)]

    return [(words(CONTEXT_CHARS), [words(ENDING_CHARS) for _ in range(4)], rng.randrange(4))
            for _ in range(n)]


def saved_models(shape: str, folder: Path) -> tuple[Any, Any]:
    """tinygpt's harness model and the harness's `hf` model over the same random GPT-2 weights."""
    from lm_eval.models.huggingface import HFLM

    from tinygpt import harness

    ours, _ = build_models(shape, torch.float32, torch.device("cpu"))
    tok = build_tokenizer("gpt2", [], gpt2_ranks=SHARED_DATA / "gpt2.tiktoken")
    cfg = Config(model=ModelConfig(**SHAPES[shape], block_size=CONTEXT, vocab_size=ours.config.vocab_size))
    checkpoint.save(folder / "ckpt", ours, cfg, tok)
    ckpt = checkpoint.load(folder / "ckpt")
    export_hf(ckpt, folder / "hf", None)
    hf = HFLM(pretrained=str(folder / "hf"), device="cpu", dtype="float32", max_length=CONTEXT, batch_size=16)
    return harness.TinyGPTLM(ckpt, batch_size=16, progress=False), hf


def bench_shape(shape: str, n_items: int, repeats: int) -> dict[str, Any]:
    from lm_eval.api.instance import Instance

    items = hellaswag_items(n_items)
    reqs = [Instance("loglikelihood", {}, (ctx, " " + e), i)
            for ctx, ends, _ in items for i, e in enumerate(ends)]
    with tempfile.TemporaryDirectory() as tmp:
        ours, hf = saved_models(shape, Path(tmp))
        device = torch.device("cpu")
        ours.loglikelihood(reqs[:8]), hf.loglikelihood(reqs[:8])  # warm-up
        times: dict[str, list[float]] = {"tinygpt": [], "hf": []}
        scores: dict[str, Any] = {}
        for _ in range(repeats):
            for name, lm in (("tinygpt", ours), ("hf", hf)):
                seconds, scores[name] = timed(lambda lm=lm: lm.loglikelihood(reqs), device)
                times[name].append(seconds)
    picks = {name: [max(range(4), key=lambda i, k=k: s[4 * k + i][0]) for k in range(n_items)]
             for name, s in scores.items()}
    gaps = [abs(a[0] - b[0]) for a, b in zip(scores["tinygpt"], scores["hf"])]
    rate = {name: n_items / median(t) for name, t in times.items()}
    return {"shape": shape, "items": n_items, "tinygpt_items_s": rate["tinygpt"], "hf_items_s": rate["hf"],
            "ratio": ratio(rate["tinygpt"], rate["hf"]), "max_loglik_diff": max(gaps),
            "same_picks": picks["tinygpt"] == picks["hf"],
            "acc": sum(p == gold for p, (_, _, gold) in zip(picks["tinygpt"], items)) / n_items,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = parser(__doc__, SHAPES)
    p.add_argument("--items", type=int, default=32, help="HellaSwag-shaped items (four endings each)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per side (after one warm-up)")
    args = p.parse_args(argv)
    if not (SHARED_DATA / "gpt2.tiktoken").is_file():
        print(f"skipped: the GPT-2 ranks file is not in {SHARED_DATA}")
        return []
    repeats = 1 if args.quick else args.repeats
    results = [bench_shape(shape, args.items, repeats) for shape in args.shapes]
    print_table(["log-likelihood scoring (items/s)", "tinygpt", "lm-eval hf", "ratio", "max |diff|",
                 "same picks", "peak RSS MB"],
                [(r["shape"], r["tinygpt_items_s"], r["hf_items_s"], f"{r['ratio']:.2f}x",
                  f"{r['max_loglik_diff']:.1e}", "yes" if r["same_picks"] else "NO", r["peak_rss_mb"])
                 for r in results])
    if not args.no_save:
        save_results("tasks", results)
    return results


if __name__ == "__main__":
    main()
