"""Fewer bytes per weight for decoding: quantize() converts a model's weights, auto_dtype() picks the dtype.

Batch-1 decoding reads every weight once per token, so on a CPU its speed is bound by the bytes it reads:
bf16 halves them and int8 quarters them. int8 linear layers become Int8Linear (infer/kernels.py, which owns
the int8 format and its kernels); the token embedding's gather stays in float (a gather reads one row, not the
matrix), and a tied output layer gets its own int8 copy.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn as nn

from tinygpt import rundir
from tinygpt.checkpoint import Checkpoint
from tinygpt.data.prepare import Dataset, load_prepared
from tinygpt.infer.kernels import Int8Linear, int8_speedup
from tinygpt.model import GPT
from tinygpt.split_loss import loss_over

DTYPES = ("float32", "bfloat16", "int8")
INT8_MIN_SPEEDUP = 1.2  # below this, int8's approximation is not worth it
INT8_PERPLEXITY_BOUND = 0.01  # the most int8 may move the run's val perplexity (issue #14's quality bound)
QUALITY_WINDOWS = 4  # val windows auto_dtype scores each dtype on


def quantize(model: nn.Module, dtype: str) -> nn.Module:
    """The model ready for decoding in `dtype`: float32 (unchanged), bfloat16 (every weight), or int8 (every
    linear layer, the output layer included, except an adaptive softmax head's; embeddings and norms stay
    float32). Changes the model in place."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if dtype == "bfloat16":
        return model.to(torch.bfloat16)
    if dtype == "int8":
        # An adaptive softmax computes in its weights' dtype (log-probs need a float one): it stays float32.
        adaptive = {m for head in model.modules() if isinstance(head, nn.AdaptiveLogSoftmaxWithLoss)
                    for m in head.modules()}
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear and parent not in adaptive:
                    setattr(parent, name, Int8Linear(child.weight, child.bias))
    return model.eval()


def val_loss(model: GPT, data: Dataset, windows: int) -> float:
    """The mean loss over `windows` windows of data's val split, in one batch (auto_dtype's quality check)."""
    device = model.transformer.wte.weight.device
    return loss_over(model, data.val, windows, device, None, windows, data.packed).loss


def auto_dtype(ckpt: Checkpoint, log: Callable[[str], None]) -> str:
    """--dtype auto: int8 where a one-time probe finds it faster here and it moves the run's val perplexity
    (val_loss over a few windows) by less than 1%; otherwise float32, the exact path. Returns the choice; with
    int8, ckpt.model becomes the quantized model."""
    if ckpt.model.transformer.wte.weight.device.type != "cpu":
        return "float32"
    speedup = int8_speedup()
    if speedup < INT8_MIN_SPEEDUP:
        log(f"dtype auto: float32 (int8 decoding is {speedup:.2f}x as fast here)")
        return "float32"
    try:
        data = load_prepared(ckpt.run_dir / rundir.DATA) if ckpt.run_dir else None
    except (OSError, ValueError, KeyError):
        data = None
    if data is None:  # a checkpoint folder on its own, or a run whose data/ is gone
        log("dtype auto: float32 (no val split beside this checkpoint to check int8's quality on)")
        return "float32"
    int8 = quantize(copy.deepcopy(ckpt.model), "int8")
    losses = [val_loss(m, data, QUALITY_WINDOWS) for m in (ckpt.model, int8)]
    change = math.exp(losses[1] - losses[0]) - 1
    if abs(change) >= INT8_PERPLEXITY_BOUND:
        log(f"dtype auto: float32 (int8 would move the val perplexity by {change:+.2%})")
        return "float32"
    log(f"dtype auto: int8 ({speedup:.1f}x as fast per layer here; val perplexity {change:+.2%} on "
        f"{QUALITY_WINDOWS} windows)")
    ckpt.model = int8
    return "int8"
