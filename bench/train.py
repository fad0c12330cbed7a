"""Training speed: tinygpt's optimizer step against a plain transformers + torch.optim.AdamW loop.

Both sides train the same GPT-2-shaped model (tinygpt loads the transformers model's initial
weights) on the same random batches. tinygpt's step is the trainer's: forward with targets,
backward, clip_grad_norm_(1.0), the finiteness check, AdamW from tinygpt.train.optim.make_optimizer
(foreach, weight decay on matrices only), zero_grad(set_to_none=True). The peer is what a
transformers user writes: GPT2LMHeadModel(labels=...), torch.optim.AdamW with its defaults,
the same clipping and learning rate. After warm-up steps the two are timed in alternating
rounds and the median tokens/s is reported. tinygpt is also timed under torch.compile, with
the compile time (the first compiled step) reported on its own.

    python bench/train.py
    python bench/train.py --shapes cpu-tiny --no-compile
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

# common first: it puts this checkout's src/ on the import path for tinygpt
from common import (
    OtherLoad,
    median,
    parser,
    print_table,
    ratio,
    run_cases,
    save_results,
    synchronize,
    timed,
)

from tinygpt.config import ModelConfig, TrainConfig
from tinygpt.device import autocast
from tinygpt.init_from import gpt2_state_from_hf
from tinygpt.model import GPT
from tinygpt.train.optim import make_optimizer
from tinygpt.train.step import train_step

SHAPES: dict[str, dict[str, Any]] = {
    "10M": dict(dims=dict(n_layer=6, n_head=6, n_embd=384), vocab=50257, block=256, batch=8),
    "cpu-tiny": dict(dims=dict(n_layer=4, n_head=4, n_embd=128), vocab=65, block=64, batch=12),
}
DTYPES = {"float32": None, "bfloat16": torch.bfloat16}
# Steps per timed round (about 4 s for 10M and 1 s for cpu-tiny on 2 CPU cores; 10x more on a GPU), and
# untimed steps before them (the first step allocates gradients and optimizer state).
STEPS_PER_ROUND = {"10M": 1, "cpu-tiny": 20}
WARMUP_STEPS = {"10M": 2, "cpu-tiny": 3}

Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def build_models(shape: str, device: torch.device, seed: int = 0) -> tuple[GPT, Any]:
    """A transformers GPT-2 and a tinygpt GPT starting from the same weights, both in training mode."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # its notes about unused config fields would drown the figures

    s = SHAPES[shape]
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config(**s["dims"], n_positions=s["block"], vocab_size=s["vocab"],
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    ours = GPT(ModelConfig(**s["dims"], block_size=s["block"], vocab_size=s["vocab"], dropout=0.0))
    ours.load_state_dict(gpt2_state_from_hf(hf.state_dict()))
    return ours.to(device).train(), hf.to(device).train()


def amp(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    # Mixed precision as the trainer runs it (tinygpt.device.autocast): float32 weights and optimizer, bf16
    # compute.
    return autocast(device, dtype)


def tinygpt_step_fn(model: torch.nn.Module, device: torch.device, dtype: torch.dtype | None) -> Step:
    """The trainer's own step (tinygpt.train.step.train_step), on one micro-batch without segments."""
    cfg = TrainConfig()
    # the optimizer wants the real parameters
    base = model._orig_mod if hasattr(model, "_orig_mod") else model
    optimizer = make_optimizer(base, cfg, device)

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return train_step(model, base, optimizer, [(x, y, None)], cfg.grad_clip, dtype).loss

    return step


def hf_step_fn(model: Any, device: torch.device, dtype: torch.dtype | None) -> Step:
    cfg = TrainConfig()  # same learning rate, betas and decay; everything else is torch's default
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  weight_decay=cfg.weight_decay)

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # transformers shifts the labels itself, so they are the inputs; it then scores T-1 of the T
        # positions.
        with amp(device, dtype):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


class Batches:
    """A fixed cycle of random batches, identical for every side measured."""

    def __init__(self, shape: str, device: torch.device, count: int = 8, seed: int = 0):
        s = SHAPES[shape]
        g = torch.Generator().manual_seed(seed)
        chunks = [torch.randint(0, s["vocab"], (s["batch"], s["block"] + 1), generator=g)
                  for _ in range(count)]
        self.pairs = [(c[:, :-1].to(device), c[:, 1:].to(device)) for c in chunks]
        self.tokens_per_step = s["batch"] * s["block"]

    def run(self, step: Step, steps: int) -> None:
        for i in range(steps):
            step(*self.pairs[i % len(self.pairs)])


def bench_case(shape: str, dtype_name: str, device: torch.device, rounds: int,
               compile_model: bool) -> dict[str, Any]:
    dtype = DTYPES[dtype_name]
    ours, hf = build_models(shape, device)
    batches = Batches(shape, device)
    sides: dict[str, Step] = {"tinygpt": tinygpt_step_fn(ours, device, dtype),
                              "transformers": hf_step_fn(hf, device, dtype)}
    result: dict[str, Any] = dict(shape=shape, dtype=dtype_name, device=device.type)
    if compile_model:
        compiled, _ = build_models(shape, device)
        step = tinygpt_step_fn(torch.compile(compiled), device, dtype)
        try:
            # The first step traces and compiles forward and backward; later ones reuse the kernels.
            result["compile_s"], _ = timed(lambda: batches.run(step, 1), device)
            sides["tinygpt compiled"] = step
        except Exception as e:  # noqa: BLE001  (any compiler failure means: report eager only)
            print(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                  "reporting eager only")
            result["compile_error"] = f"{type(e).__name__}: {e}"[:500]
    for step in sides.values():
        batches.run(step, WARMUP_STEPS[shape])
    synchronize(device)
    steps = STEPS_PER_ROUND[shape] if device.type == "cpu" else 10 * STEPS_PER_ROUND[shape]
    times: dict[str, list[float]] = {name: [] for name in sides}
    with OtherLoad() as load:
        for _ in range(rounds):
            for name, step in sides.items():
                times[name].append(timed(lambda step=step: batches.run(step, steps), device)[0])
    tok_s = {name: steps * batches.tokens_per_step / median(t) for name, t in times.items()}
    result.update(tinygpt_tok_s=tok_s["tinygpt"], hf_tok_s=tok_s["transformers"],
                  ratio=ratio(tok_s["tinygpt"], tok_s["transformers"]),
                  compiled_tok_s=tok_s.get("tinygpt compiled"),
                  compiled_ratio=ratio(tok_s.get("tinygpt compiled"), tok_s["transformers"]),
                  steps_per_round=steps, rounds=rounds, tokens_per_step=batches.tokens_per_step,
                  round_s={name: t for name, t in times.items()}, other_load=load.share)
    return result


def describe(r: dict[str, Any]) -> str:
    compiled = ""
    if r["compiled_tok_s"] is not None:
        compiled = (f"; compiled {r['compiled_tok_s']:,.0f} tok/s ({r['compiled_ratio']:.2f}x, "
                    f"compile {r['compile_s']:.0f} s)")
    return (f"tinygpt {r['tinygpt_tok_s']:,.0f} tok/s, transformers {r['hf_tok_s']:,.0f} tok/s, "
            f"ratio {r['ratio']:.2f}x{compiled}")


def run(shapes: list[str], dtypes: list[str], rounds: int, compile_model: bool) -> list[dict[str, Any]]:
    return run_cases(shapes, dtypes,
                     lambda shape, dtype, device: bench_case(shape, dtype, device, rounds, compile_model),
                     describe)


def print_summary(results: list[dict[str, Any]]) -> None:
    rows = []
    for r in results:
        if "skipped" in r:
            continue
        compiled = "-" if r["compiled_tok_s"] is None else (f"{r['compiled_tok_s']:,.0f} "
                                                            f"({r['compiled_ratio']:.2f}x)")
        rows.append((f"{r['device']} {r['shape']} {r['dtype']}", f"{r['tinygpt_tok_s']:,.0f}",
                     f"{r['hf_tok_s']:,.0f}",
                     f"{r['ratio']:.2f}x", compiled))
    print_table(["training (tok/s)", "tinygpt", "transformers", "ratio", "tinygpt compiled"], rows)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = parser(__doc__, SHAPES, DTYPES)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per side")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurement")
    args = p.parse_args(argv)
    rounds = 1 if args.quick else args.rounds
    print(f"training throughput: median of {rounds} timed round(s) per side, after warm-up steps")
    results = run(args.shapes, args.dtypes, rounds, not args.no_compile)
    print_summary(results)
    if not args.no_save:
        save_results("train", results)
    return results


if __name__ == "__main__":
    main()
