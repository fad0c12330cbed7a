"""Peak memory of training the 124M shape, with and without activation checkpointing.

Each configuration runs in a fresh Python process, because the peak resident set size is a
high-water mark per process: a second measurement in the same process could never read lower
than the first (peak_rss_mb says why it is read from VmHWM rather than ru_maxrss). The child
builds GPT-2 small (12 layers, 768 wide, vocab 50257) and the trainer's AdamW, and runs two
training steps on batch 4 x 512 tokens; the second step is the steady state (gradients, optimizer
moments and activations all alive at once). It reports the process peak and the part of it above
the model + optimizer set-up.

    python bench/memory.py
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import parser, print_table, save_results

DIMS = dict(n_layer=12, n_head=12, n_embd=768)
VOCAB = 50257
BLOCK = 512
BATCH = 4
STEPS = 2


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB.

    Linux's VmHWM is the high-water mark of this process's own address space. getrusage's ru_maxrss
    is the same figure except that it survives exec: a child started from a large parent (run_all,
    holding the models of the earlier benchmarks) would report at least the parent's size. So
    ru_maxrss is only the fallback, where /proc does not exist."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # reported in kB
    except OSError:
        pass
    # ru_maxrss is in kilobytes on Linux (bytes on macOS, where this reads 1024x too high).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(checkpointing: bool) -> dict[str, Any]:
    """Runs inside the fresh process: train a few steps and report memory as JSON."""
    import torch

    from tinygpt.config import ModelConfig, TrainConfig
    from tinygpt.model import GPT
    from tinygpt.train.optim import make_optimizer

    torch.manual_seed(0)
    device = torch.device("cpu")
    model = GPT(ModelConfig(**DIMS, block_size=BLOCK, vocab_size=VOCAB)).train()
    model.activation_checkpointing = checkpointing
    cfg = TrainConfig()
    optimizer = make_optimizer(model, cfg, device)
    batch = torch.randint(0, VOCAB, (BATCH, BLOCK + 1), generator=torch.Generator().manual_seed(0))
    x, y = batch[:, :-1], batch[:, 1:]
    setup_mb = peak_rss_mb()
    start = time.perf_counter()
    for _ in range(STEPS):
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = (time.perf_counter() - start) / STEPS
    peak = peak_rss_mb()
    return dict(checkpointing=checkpointing, peak_rss_mb=peak, setup_rss_mb=setup_mb,
                training_mb=peak - setup_mb,
                s_per_step=seconds, params_m=model.num_params(non_embedding=False) / 1e6, loss=loss.item())


def measure(checkpointing: bool) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--checkpointing",
           str(int(checkpointing))]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])  # the child's last line is its JSON report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__)  # --quick is accepted for run_all; the measurement is already minimal
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        report = child(bool(args.checkpointing))
        print(json.dumps(report))
        return report
    print(f"peak RSS, 124M GPT training on CPU: batch {BATCH} x {BLOCK} tokens, {STEPS} steps, one process "
          "each")
    runs = {name: measure(flag) for name, flag in (("off", False), ("on", True))}
    result = dict(shape="124M", batch=BATCH, block=BLOCK, steps=STEPS, checkpointing_off=runs["off"],
                  checkpointing_on=runs["on"],
                  peak_ratio=runs["on"]["peak_rss_mb"] / runs["off"]["peak_rss_mb"],
                  training_ratio=runs["on"]["training_mb"] / runs["off"]["training_mb"],
                  step_time_ratio=runs["on"]["s_per_step"] / runs["off"]["s_per_step"])
    rows = [(f"checkpointing {name}", r["peak_rss_mb"], r["setup_rss_mb"], r["training_mb"],
             f"{r['s_per_step']:.1f}")
            for name, r in runs.items()]
    print_table(["124M training memory", "peak RSS MB", "after set-up MB", "training MB", "s/step"], rows)
    print(f"with / without checkpointing: peak {result['peak_ratio']:.2f}x, above set-up "
          f"{result['training_ratio']:.2f}x, time per step {result['step_time_ratio']:.2f}x")
    if not args.no_save:
        save_results("memory", result)
    return result


if __name__ == "__main__":
    main()
