"""The GPU check (issue #24): tinygpt training on one NVIDIA GPU, against transformers and nanoGPT.

Four sections, each printed as it finishes and saved to bench/results-gpu.json (rewritten after every
section, so a run cut short keeps what it measured); a section that fails records its error in its row
and the others still run:

* 124m: one training step (forward, backward, gradient norm clipped to 1.0, AdamW from
  tinygpt.train.optim.make_optimizer, zero_grad) of the GPT-2 124M shape (12 layers, 12 heads, 768 wide,
  context 1024, vocab 50304) on random tokens, in bf16 autocast under torch.compile: tokens/s, MFU and peak
  memory, beside the same step of transformers' GPT2LMHeadModel (the same initial weights, batches,
  dtype and optimizer, compiled too). Warm-up steps, the compiling one among them, are not timed.
* fp16: the same tinygpt step in float16 autocast with torch.amp.GradScaler, for 50 steps from the same
  initial weights and on the same batches as 50 bf16 steps: every loss finite and within 0.05 of bf16's;
  the updates the scaler skipped are counted.
* shakespeare: `tinygpt train --preset shakespeare-gpu` (nanoGPT's train_shakespeare_char recipe) on
  data/tinyshakespeare.txt, compiled, as a subprocess: final val loss and wall time (metrics.jsonl).
* nanogpt: nanoGPT's own train.py with config/train_shakespeare_char.py on the same GPU, run from a
  temporary copy of its source in bench/.cache/nanoGPT, which is never committed; where it is absent the
  row is skipped, saying how to get it:

      git clone https://github.com/karpathy/nanoGPT bench/.cache/nanoGPT

Goals: MFU >= 45% for the 124M shape in bf16; a Shakespeare val loss <= 1.47 in less wall time than
nanoGPT (whose README reports 1.4697 in about 3 minutes on an A100). Meant to take under 8 minutes on an
H100.

    python bench/gpu.py                         # the check (make bench-gpu)
    python bench/gpu.py --quick                 # fewer steps everywhere, for a first try
    python bench/gpu.py --skip nanogpt --batch 8
    python bench/gpu.py --smoke                 # every section on the CPU, tiny shapes, a few steps
"""

from __future__ import annotations

import argparse
import array
import contextlib
import gc
import json
import math
import os
import pickle
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# common first: it puts this checkout's src/ on the import path for tinygpt
from common import REPO, SHAKESPEARE, machine_info, print_table, timed

from tinygpt.config import ModelConfig, TrainConfig
from tinygpt.device import cpu_has_native_bf16, peak_flops
from tinygpt.init_from import gpt2_state_from_hf
from tinygpt.model import GPT
from tinygpt.presets import GPT2_ARCH
from tinygpt.train.optim import make_optimizer

RESULTS = REPO / "bench" / "results-gpu.json"
NANOGPT = REPO / "bench" / ".cache" / "nanoGPT"
NANOGPT_HOWTO = "git clone https://github.com/karpathy/nanoGPT bench/.cache/nanoGPT"
SECTIONS = ("124m", "fp16", "shakespeare", "nanogpt")

GOAL_MFU = 0.45
GOAL_VAL_LOSS = 1.47
FP16_TOLERANCE = 0.05

GPT2_124M = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304)
TINY = dict(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=512)
# GPT-2 124M's own optimizer settings (nanoGPT's train_gpt2 config), for the 124m and fp16 sections.
TRAIN = TrainConfig(lr=6e-4, beta1=0.9, beta2=0.95, weight_decay=0.1, grad_clip=1.0, optimizer="adamw")
# The batches the 124m and fp16 sections cycle through: a few distinct ones keep the data identical for
# every side while letting the fp16 run's loss move (it memorises them) instead of sitting at ln(vocab).
N_BATCHES = 4
# The Shakespeare settings nanoGPT and tinygpt both take, by nanoGPT's names; these go in the model section.
MODEL_KEYS = {"n_layer", "n_head", "n_embd", "block_size"}

# nanoGPT's evaluation and per-iteration log lines
EVAL_LINE = re.compile(r"^step (\d+): train loss (\S+), val loss (\S+)", re.M)
ITER_LINE = re.compile(r"^iter (\d+): loss \S+, time ([\d.]+)ms", re.M)
TOKENS_LINE = re.compile(r"tokens per iteration will be: ([\d,]+)")

Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------- what to run

@dataclass(frozen=True)
class Plan:
    """How each section runs: the GPU check itself, --quick, or the CPU --smoke."""

    mode: str  # full, quick or smoke
    device: torch.device
    dtype: torch.dtype | None  # the autocast type of the bf16 runs; None: float32 (a CPU without bf16)
    compile: bool
    shape: dict[str, int]  # the 124m and fp16 sections' model
    batch: int
    warmup: int  # untimed steps before the timed ones; the first one compiles
    timed: int
    fp16_steps: int
    train_flags: list[str]  # added to `tinygpt train`
    nanogpt_flags: list[str]  # added to nanoGPT's train.py
    timeout_s: float  # for each training subprocess


def both_flags(settings: dict[str, int]) -> tuple[list[str], list[str]]:
    """The same settings as `tinygpt train` flags and as nanoGPT's --key=value ones: the names are
    nanoGPT's, and tinygpt's are the same with their section in front."""
    ours = [arg for key, value in settings.items()
            for arg in (f"--{'model' if key in MODEL_KEYS else 'train'}.{key}", str(value))]
    return ours, [f"--{key}={value}" for key, value in settings.items()]


def make_plan(args: argparse.Namespace) -> Plan:
    if args.smoke:
        # Tiny shapes that both trainers accept, so every path runs on 2 CPU cores in seconds; the CPU has
        # no compiler worth waiting for, and bf16 only where it computes it natively (else float32).
        ours, theirs = both_flags(dict(n_layer=2, n_head=2, n_embd=64, block_size=64, batch_size=8,
                                       max_iters=20, eval_interval=10, eval_iters=2))
        return Plan("smoke", torch.device("cpu"), torch.bfloat16 if cpu_has_native_bf16() else None,
                    compile=False, shape=TINY, batch=args.batch or 4, warmup=1, timed=3, fp16_steps=6,
                    train_flags=[*ours, "--train.device", "cpu"],
                    nanogpt_flags=[*theirs, "--device=cpu", "--dtype=float32"], timeout_s=300)
    # --quick: 500 of the recipe's 5000 steps (decay included), so its val loss is not the goal's
    ours, theirs = both_flags(dict(max_iters=500, lr_decay_iters=500) if args.quick else {})
    return Plan("quick" if args.quick else "full", torch.device("cuda"), torch.bfloat16, compile=True,
                shape=GPT2_124M, batch=args.batch or 16, warmup=3 if args.quick else 5,
                timed=10 if args.quick else 50, fp16_steps=20 if args.quick else 50,
                train_flags=ours, nanogpt_flags=theirs, timeout_s=900)


def dtype_name(dtype: torch.dtype | None) -> str:
    return "float32" if dtype is None else str(dtype).removeprefix("torch.")


def amp(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def free_device_memory() -> None:
    """Drop compiled graphs and cached blocks, so the next side's peak memory is its own."""
    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- one training step, either model

def model_config(plan: Plan) -> ModelConfig:
    return ModelConfig(**{**GPT2_ARCH, **plan.shape}, dropout=0.0)


def build_pair(plan: Plan) -> tuple[GPT, torch.nn.Module]:
    """A tinygpt GPT and a transformers GPT2LMHeadModel with the same initial weights, on the CPU; each
    moves to the device only while it is measured."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # its notes about config fields would drown the figures
    s = plan.shape
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=s["n_layer"], n_head=s["n_head"], n_embd=s["n_embd"],
                                    n_positions=s["block_size"], vocab_size=s["vocab_size"],
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    ours = GPT(model_config(plan))
    ours.load_state_dict(gpt2_state_from_hf(hf.state_dict()))
    return ours, hf


def random_batches(plan: Plan, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """N_BATCHES batches of random token windows on the device: the inputs and, as targets, the next
    tokens."""
    generator = torch.Generator().manual_seed(seed)
    T = plan.shape["block_size"]
    batches = []
    for _ in range(N_BATCHES):
        seq = torch.randint(0, plan.shape["vocab_size"], (plan.batch, T + 1), generator=generator)
        batches.append((seq[:, :-1].to(plan.device), seq[:, 1:].to(plan.device)))
    return batches


def make_step(loss_of: Step, model: torch.nn.Module, optimizer: Any, device: torch.device,
              dtype: torch.dtype | None, scaler: torch.amp.GradScaler | None = None) -> Step:
    """One training step as the trainer takes it: the loss under autocast, backward, the gradient norm
    clipped, the update, zero_grad. With a GradScaler (float16) the loss is scaled before backward and the
    gradients unscaled before clipping, and the scaler skips an update whose gradients overflowed."""
    params = [p for p in model.parameters() if p.requires_grad]

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with amp(device, dtype):
            loss = loss_of(x, y)
        if scaler is None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, TRAIN.grad_clip)
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(params, TRAIN.grad_clip)
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def measure_side(model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module], Step], plan: Plan,
                 batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    """tokens/s, step time and peak memory of one model's training step, after plan.warmup untimed steps
    (the first, compiling one timed on its own)."""
    device = plan.device
    model.to(device).train()
    optimizer = make_optimizer(model, TRAIN, device)  # duck-typed: it only walks modules and parameters
    result: dict[str, Any] = dict(compiled=plan.compile)
    step = make_step(loss_fn(torch.compile(model) if plan.compile else model), model, optimizer, device,
                     plan.dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        result["first_step_s"], _ = timed(lambda: step(*batches[0]), device)
    except Exception as e:  # noqa: BLE001 - a compiler failure: time the eager step rather than nothing
        if not plan.compile:
            raise
        print(f"  torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); timing eager")
        result.update(compiled=False, compile_error=f"{type(e).__name__}: {e}"[:500])
        optimizer.zero_grad(set_to_none=True)
        step = make_step(loss_fn(model), model, optimizer, device, plan.dtype)
        result["first_step_s"], _ = timed(lambda: step(*batches[0]), device)
    for i in range(1, plan.warmup):
        step(*batches[i % len(batches)])
    seconds, losses = timed(lambda: [step(*batches[i % len(batches)]) for i in range(plan.timed)], device)
    tokens = plan.timed * plan.batch * plan.shape["block_size"]
    result.update(tok_s=tokens / seconds, step_ms=1000 * seconds / plan.timed, last_loss=float(losses[-1]),
                  peak_memory_gib=(torch.cuda.max_memory_allocated(device) / 2**30
                                   if device.type == "cuda" else None))
    model.to("cpu")  # the optimizer's state goes with this frame: the caller then frees the device memory
    return result


# ---------------------------------------------------------------- section 124m

def section_124m(plan: Plan) -> dict[str, Any]:
    ours, hf = build_pair(plan)
    batches = random_batches(plan, seed=0)
    flops, peak = ours.flops_per_token(), peak_flops(plan.device)
    result: dict[str, Any] = dict(shape=plan.shape, batch=plan.batch, dtype=dtype_name(plan.dtype),
                                  parameters=ours.num_params(), flops_per_token=flops, peak_flops=peak,
                                  warmup_steps=plan.warmup, timed_steps=plan.timed)
    result["tinygpt"] = measure_side(ours, lambda m: lambda x, y: m(x, y)[1], plan, batches)
    free_device_memory()
    # transformers shifts the labels itself, so they are the inputs; it then scores T-1 of the T positions
    result["transformers"] = measure_side(hf, lambda m: lambda x, y: m(input_ids=x, labels=x).loss, plan,
                                          batches)
    free_device_memory()
    result["transformers"]["attn_implementation"] = hf.config._attn_implementation
    for side in ("tinygpt", "transformers"):  # the same network, so the same FLOPs per token
        r = result[side]
        r["mfu"] = r["tok_s"] * flops / peak if peak else None
    ours_r, theirs_r = result["tinygpt"], result["transformers"]
    result["ratio"] = ours_r["tok_s"] / theirs_r["tok_s"]
    if ours_r["peak_memory_gib"] and theirs_r["peak_memory_gib"]:
        result["memory_ratio"] = ours_r["peak_memory_gib"] / theirs_r["peak_memory_gib"]
    result["goal_mfu"] = GOAL_MFU
    result["goal_met"] = None if ours_r["mfu"] is None else ours_r["mfu"] >= GOAL_MFU
    if peak is None:
        result["goal_note"] = "no peak FLOPs known for this device"
    return result


def describe_124m(r: dict[str, Any]) -> str:
    def side(s: dict[str, Any]) -> str:
        mfu = "" if s["mfu"] is None else f", MFU {s['mfu']:.1%}"
        mem = "" if s["peak_memory_gib"] is None else f", peak {s['peak_memory_gib']:.1f} GiB"
        eager = "" if s["compiled"] else " (eager)"
        return f"{s['tok_s']:,.0f} tok/s{eager}{mfu}{mem}, first step {s['first_step_s']:.1f} s"

    return (f"tinygpt {side(r['tinygpt'])}; transformers {side(r['transformers'])}; "
            f"ratio {r['ratio']:.2f}x")


# ---------------------------------------------------------------- section fp16

def loss_curve(plan: Plan, init: dict[str, torch.Tensor],
               batches: Sequence[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype | None,
               scaler: torch.amp.GradScaler | None) -> tuple[list[float], int]:
    """The loss of each of plan.fp16_steps steps from the weights init, cycling over batches, and how many
    updates the scaler skipped. Eager: compiling both precisions would cost more than the steps, and
    autocast picks each op's precision the same way compiled or not."""
    model = GPT(model_config(plan))
    model.load_state_dict(init)
    model.to(plan.device).train()
    optimizer = make_optimizer(model, TRAIN, plan.device)
    step = make_step(lambda x, y: model(x, y)[1], model, optimizer, plan.device, dtype, scaler)
    losses, skipped = [], 0
    for i in range(plan.fp16_steps):
        scale = scaler.get_scale() if scaler is not None else 0.0
        losses.append(float(step(*batches[i % len(batches)])))
        # the scaler lowers its scale exactly when it found inf/NaN gradients and skipped the update
        if scaler is not None and scaler.get_scale() < scale:
            skipped += 1
    model.to("cpu")
    return losses, skipped


def section_fp16(plan: Plan) -> dict[str, Any]:
    torch.manual_seed(1)
    init = {k: v.clone() for k, v in GPT(model_config(plan)).state_dict().items()}
    batches = random_batches(plan, seed=1)
    reference, _ = loss_curve(plan, init, batches, plan.dtype, None)
    free_device_memory()
    scaler = torch.amp.GradScaler(plan.device.type)
    fp16, skipped = loss_curve(plan, init, batches, torch.float16, scaler)
    diffs = [abs(a - b) for a, b in zip(fp16, reference)]
    finite = all(math.isfinite(v) for v in fp16 + reference)
    worst = max(range(len(diffs)), key=lambda i: diffs[i] if math.isfinite(diffs[i]) else math.inf)
    return dict(shape=plan.shape, batch=plan.batch, steps=plan.fp16_steps,
                reference_dtype=dtype_name(plan.dtype), reference_losses=reference, fp16_losses=fp16,
                all_finite=finite, max_abs_diff=diffs[worst], worst_step=worst + 1,
                tolerance=FP16_TOLERANCE, skipped_steps=skipped, final_scale=scaler.get_scale(),
                goal_met=finite and diffs[worst] <= FP16_TOLERANCE)


def describe_fp16(r: dict[str, Any]) -> str:
    return (f"{r['steps']} steps, float16 + GradScaler against {r['reference_dtype']}: max |loss diff| "
            f"{r['max_abs_diff']:.4f} at step {r['worst_step']} (tolerance {r['tolerance']}), losses "
            f"{'all finite' if r['all_finite'] else 'NOT all finite'}, {r['skipped_steps']} step(s) skipped "
            f"by the scaler; loss {r['fp16_losses'][0]:.3f} -> {r['fp16_losses'][-1]:.3f}")


# ---------------------------------------------------------------- sections shakespeare and nanogpt

def child_env(**extra: str) -> dict[str, str]:
    # The child must import this checkout's tinygpt whether or not it is pip-installed.
    path = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, **extra)


def run_child(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float) -> tuple[float, str]:
    """Run a training command to its end: its wall time and its output (stdout and stderr together). A
    failure raises with the output's last lines, which say why."""
    print("  $ " + shlex.join([Path(cmd[0]).name, *cmd[1:]]), flush=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"no result after {timeout:.0f} s (stopped)") from None
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = " | ".join(proc.stdout.strip().splitlines()[-4:])
        raise RuntimeError(f"exit status {proc.returncode}: {tail[-800:]}")
    return wall, proc.stdout


def section_shakespeare(plan: Plan) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tinygpt-gpu-") as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "tinygpt", "train", "--preset", "shakespeare-gpu",
               "--data", str(SHAKESPEARE), "--out", str(run_dir),
               "--train.compile", str(plan.compile).lower(), *plan.train_flags]
        # a private data cache: every run tokenizes from scratch (0.1 s), as a first run would
        wall, _ = run_child(cmd, REPO, child_env(TINYGPT_CACHE=str(Path(tmp) / "cache")), plan.timeout_s)
        entries = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    finals = [e for e in entries if e.get("final")]
    if not finals:
        raise RuntimeError("the run's metrics.jsonl has no final evaluation")
    final = finals[-1]
    periodic = [e for e in entries if not e.get("final")]
    return dict(command=shlex.join(["tinygpt", *cmd[3:]]), val_loss=final["val_loss"],
                train_loss=final["train_loss"], steps=final["step"], train_s=final["elapsed_s"], wall_s=wall,
                tokens_per_s=(periodic or finals)[-1].get("tokens_per_s"),
                val_curve=[(e["step"], e["val_loss"]) for e in entries])


def write_char_dataset(text_file: Path, out: Path) -> dict[str, int]:
    """What nanoGPT's data/shakespeare_char/prepare.py writes, without its download (the GPU machine has no
    network): the ids of the sorted unique characters, the first 90% of the text for training, train.bin
    and val.bin as uint16, and meta.pkl with vocab_size, itos and stoi."""
    text = text_file.read_text(encoding="utf-8")  # newlines translated, as prepare.py's open() does
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    n = int(len(text) * 0.9)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train.bin", text[:n]), ("val.bin", text[n:])):
        with open(out / name, "wb") as f:
            array.array("H", (stoi[c] for c in part)).tofile(f)  # native byte order, as numpy's tofile
    with open(out / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)
    return dict(vocab_size=len(chars), train_tokens=n, val_tokens=len(text) - n)


def nanogpt_commit() -> str | None:
    """The commit of the nanoGPT copy, where it is a git clone."""
    try:
        out = subprocess.run(["git", "-C", str(NANOGPT), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def section_nanogpt(plan: Plan) -> dict[str, Any]:
    if not (NANOGPT / "train.py").is_file():
        return dict(skipped=f"nanoGPT's source is not in {NANOGPT}; get it with `{NANOGPT_HOWTO}`")
    with tempfile.TemporaryDirectory(prefix="nanogpt-") as tmp:
        work = Path(tmp) / "nanoGPT"
        # a copy: the data files and checkpoints it writes stay out of the cache
        shutil.copytree(NANOGPT, work, ignore=shutil.ignore_patterns(".git", "out*", "*.bin", "*.pkl"))
        data = write_char_dataset(SHAKESPEARE, work / "data" / "shakespeare_char")
        cmd = [sys.executable, "train.py", "config/train_shakespeare_char.py", f"--compile={plan.compile}",
               "--wandb_log=False", f"--out_dir={Path(tmp) / 'out'}", *plan.nanogpt_flags]
        wall, out = run_child(cmd, work, child_env(), plan.timeout_s)
    evals = EVAL_LINE.findall(out)
    if not evals:
        raise RuntimeError("its output has no 'step N: train loss X, val loss Y' line")
    step, train_loss, val_loss = evals[-1]
    # the first iterations compile, and those at an evaluation include it: the median skips both
    iter_ms = [float(ms) for it, ms in ITER_LINE.findall(out) if int(it) >= 50]
    tokens = TOKENS_LINE.search(out)
    median_ms = statistics.median(iter_ms) if iter_ms else None
    return dict(command=shlex.join(["python", *cmd[1:]]), commit=nanogpt_commit(), data=data,
                val_loss=float(val_loss), train_loss=float(train_loss), steps=int(step), wall_s=wall,
                median_iter_ms=median_ms,
                tokens_per_s=(int(tokens.group(1).replace(",", "")) / median_ms * 1000
                              if tokens and median_ms else None),
                val_curve=[(int(s), float(v)) for s, _, v in evals])


def describe_training(r: dict[str, Any]) -> str:
    speed = f", {r['tokens_per_s']:,.0f} tok/s" if r.get("tokens_per_s") else ""
    return (f"val loss {r['val_loss']:.4f} (train {r['train_loss']:.4f}) after {r['steps']} steps, "
            f"wall time {r['wall_s']:.1f} s{speed}")


# ---------------------------------------------------------------- running, judging, reporting

RUNNERS: dict[str, tuple[Callable[[Plan], dict[str, Any]], Callable[[dict[str, Any]], str]]] = {
    "124m": (section_124m, describe_124m), "fp16": (section_fp16, describe_fp16),
    "shakespeare": (section_shakespeare, describe_training), "nanogpt": (section_nanogpt, describe_training),
}


def run_section(name: str, plan: Plan) -> dict[str, Any]:
    """One section's result, or its error: a failure never stops the sections after it."""
    run, describe = RUNNERS[name]
    start = time.perf_counter()
    try:
        result = run(plan)
    except Exception as e:  # noqa: BLE001 - any failure is this section's result
        traceback.print_exc()
        result = dict(error=f"{type(e).__name__}: {str(e).strip()}"[:1000])
    finally:
        free_device_memory()
    result["section_s"] = time.perf_counter() - start
    if "error" in result:
        line = f"failed: {result['error']}"
    elif "skipped" in result:
        line = f"skipped: {result['skipped']}"
    else:
        line = describe(result)
    print(f"{name} ({result['section_s']:.0f} s): {line}", flush=True)
    return result


def judge_shakespeare(sections: dict[str, dict[str, Any]], mode: str) -> None:
    """The Shakespeare goal needs both rows: tinygpt's val loss <= 1.47 in less wall time than nanoGPT's.
    Shortened runs (--quick, --smoke) stop long before the recipe's loss, so they are not judged."""
    ours, theirs = sections.get("shakespeare", {}), sections.get("nanogpt", {})
    if "val_loss" not in ours:
        return
    ours["goal"] = f"val <= {GOAL_VAL_LOSS} in less wall time than nanoGPT"
    if mode != "full":
        ours["goal_met"] = None
        ours["goal_note"] = f"not judged: --{mode} shortens the run"
        return
    faster = ours["wall_s"] < theirs["wall_s"] if "wall_s" in theirs else None
    ours["faster_than_nanogpt"] = faster
    ours["goal_met"] = None if faster is None else (ours["val_loss"] <= GOAL_VAL_LOSS and faster)


def verdict(r: dict[str, Any]) -> str:
    if "error" in r:
        return "error: " + r["error"][:60]
    if "skipped" in r:
        return "skipped"
    met = r.get("goal_met")
    return r.get("goal_note", "unknown") if met is None else ("met" if met else "missed")


def summary_rows(s: dict[str, dict[str, Any]]) -> list[tuple[str, ...]]:
    """(check, tinygpt, peer, ratio, goal, verdict) for each figure measured."""
    rows: list[tuple[str, ...]] = []
    speed = s.get("124m", {})
    if "ratio" in speed:
        ours, theirs = speed["tinygpt"], speed["transformers"]
        pct = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731
        gib = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        mem_ratio = f"{speed['memory_ratio']:.2f}x" if "memory_ratio" in speed else "-"
        rows += [("124M train step, tok/s", f"{ours['tok_s']:,.0f}", f"{theirs['tok_s']:,.0f}",
                  f"{speed['ratio']:.2f}x", "", ""),
                 ("124M MFU", pct(ours["mfu"]), pct(theirs["mfu"]), "", f">= {GOAL_MFU:.0%}", verdict(speed)),
                 ("124M peak memory, GiB", gib(ours["peak_memory_gib"]), gib(theirs["peak_memory_gib"]),
                  mem_ratio, "", "")]
    elif speed:
        rows.append(("124M train step", "-", "-", "-", f"MFU >= {GOAL_MFU:.0%}", verdict(speed)))
    fp16 = s.get("fp16", {})
    if "max_abs_diff" in fp16:
        rows.append((f"fp16 vs {fp16['reference_dtype']}, max |loss diff|", f"{fp16['max_abs_diff']:.4f}",
                     f"{fp16['skipped_steps']} skipped", "", f"<= {FP16_TOLERANCE}, finite", verdict(fp16)))
    elif fp16:
        rows.append(("fp16 vs bf16", "-", "-", "-", f"<= {FP16_TOLERANCE}", verdict(fp16)))
    ours, theirs = s.get("shakespeare", {}), s.get("nanogpt", {})
    if ours or theirs:
        val = lambda r: f"{r['val_loss']:.4f}" if "val_loss" in r else verdict(r)  # noqa: E731
        wall = lambda r: f"{r['wall_s']:.1f}" if "wall_s" in r else "-"  # noqa: E731
        both = "wall_s" in ours and "wall_s" in theirs
        ratio = f"{theirs['wall_s'] / ours['wall_s']:.2f}x" if both else "-"
        rows += [("Shakespeare val loss", val(ours), val(theirs), "", f"<= {GOAL_VAL_LOSS}", verdict(ours)),
                 ("Shakespeare wall time, s", wall(ours), wall(theirs), ratio, "< nanoGPT", "")]
    return rows


def save(report: dict[str, Any], path: Path) -> None:
    report["updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer steps everywhere, for a first try")
    p.add_argument("--smoke", action="store_true",
                   help="every section on the CPU with tiny shapes and a handful of steps (a dry run)")
    p.add_argument("--skip", nargs="+", choices=SECTIONS, default=[], metavar="NAME",
                   help=f"sections to leave out: {', '.join(SECTIONS)}")
    p.add_argument("--batch", type=int, help="micro-batch of the 124m and fp16 sections (default 16 x 1024 "
                                             "tokens, about right for an 80 GB card; --smoke: 4)")
    p.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON results")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("bench/gpu.py: no CUDA GPU here (torch.cuda.is_available() is False); run it on an NVIDIA "
                 "GPU machine, or with --smoke for the CPU dry run")
    plan = make_plan(args)
    start = time.perf_counter()
    device = torch.cuda.get_device_name(plan.device) if plan.device.type == "cuda" else "cpu"
    print(f"GPU check on {device} ({plan.mode}): autocast {dtype_name(plan.dtype)}, "
          f"compile {plan.compile}, batch {plan.batch} x {plan.shape['block_size']}", flush=True)
    sections: dict[str, dict[str, Any]] = {}
    report: dict[str, Any] = dict(mode=plan.mode, device=device, machine=machine_info(),
                                  args=sys.argv[1:] if argv is None else argv, sections=sections)
    for name in SECTIONS:
        if name in args.skip:
            sections[name] = dict(skipped="--skip")
            print(f"{name}: skipped (--skip)")
        else:
            sections[name] = run_section(name, plan)
        save(report, args.out)  # after every section: a run cut short keeps what it measured
    judge_shakespeare(sections, plan.mode)
    print()
    print_table(["check", "tinygpt", "peer", "ratio", "goal", "verdict"], summary_rows(sections))
    report["total_s"] = time.perf_counter() - start
    print(f"\ntotal wall time {report['total_s']:.0f} s; results in {args.out}")
    save(report, args.out)
    return report


if __name__ == "__main__":
    main()
