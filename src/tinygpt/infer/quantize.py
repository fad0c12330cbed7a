"""Fewer bytes per weight for decoding: bfloat16 weights, or int8 weights with a float scale per output channel.

Batch-1 decoding reads every weight once per token, so on a CPU its speed is bound by the bytes it reads:
bf16 halves them and int8 quarters them. int8 is weight-only and symmetric: each output row of a linear layer
is divided by its largest magnitude / 127 and rounded; the token embedding's gather stays in float (a gather
reads one row, not the matrix), and a tied output layer gets its own int8 copy.

The int8 matmul kernel is chosen by a one-time probe, as the decode loop chooses oneDNN: PyTorch's
`_weight_int8pack_mm` (not public API) with bf16 activations where it exists and agrees with the reference,
else a plain path that widens the int8 weights for each call (correct everywhere, fast nowhere).
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinygpt.device import fastest_seconds

DTYPES = ("float32", "bfloat16", "int8")


def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) as int8 rows and their float32 scales (out,): w ~= q * scales[:, None]."""
    scales = w.detach().float().abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.round(w.detach().float() / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


@functools.cache
def int8pack_works() -> bool:
    """Whether torch._weight_int8pack_mm runs here and gives the dequantized product (probed once)."""
    try:
        g = torch.Generator().manual_seed(0)
        w, x = torch.randn(64, 64, generator=g), torch.randn(2, 64, generator=g)
        q, s = int8_rows(w)
        got = torch._weight_int8pack_mm(x.bfloat16(), q, s.bfloat16()).float()
        want = x @ (q.float() * s[:, None]).T
        return bool(torch.allclose(got, want, atol=0.1, rtol=0.05))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


class Int8Linear(nn.Module):
    """A linear layer holding int8 weights and per-output-channel scales (see the module docstring)."""

    kernel: str | None = None  # "int8pack" or "widen"; None: probe on first use. Tests set it to force a path.

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        q, scales = int8_rows(weight)
        self.register_buffer("weight", q)
        self.register_buffer("scales", scales)
        self.register_buffer("scales_bf16", scales.to(torch.bfloat16), persistent=False)  # int8pack's, made once
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.in_features, self.out_features = weight.size(1), weight.size(0)
        # _weight_int8pack_mm crashed the process (a segfault, PyTorch 2.13 on an AVX-512 Xeon) for inputs of
        # several rows whose width is not a multiple of 16 (24, 40, 65, 72, ...); such layers widen instead.
        self.packable = weight.size(1) % 32 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.kernel or ("int8pack" if self.packable and int8pack_works() and x.device.type == "cpu" else "widen")
        if kernel == "int8pack":  # its fast path wants bf16 activations (float32 ones measured 10x slower)
            flat = x.reshape(-1, x.size(-1)).to(torch.bfloat16)
            y = torch._weight_int8pack_mm(flat, self.weight, self.scales_bf16)
            y = y.view(*x.shape[:-1], -1).to(x.dtype)
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)


@functools.cache
def int8_speedup() -> float:
    """How many times faster a one-row product with a large weight runs through Int8Linear than in float32 here
    (timed once, ~0.1 s; the decode loop's float32 path is F.linear or oneDNN, whichever it picked). Measured:
    3x on an Intel Xeon with AMX (int8pack with bf16 activations); below 1 where bf16 is emulated."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(2048, 1024, generator=g), torch.randn(1, 1024, generator=g)
    layer = Int8Linear(w, None)
    with torch.no_grad():
        return fastest_seconds(lambda: F.linear(x, w)) / fastest_seconds(lambda: layer(x))


def quantize(model: nn.Module, dtype: str) -> nn.Module:
    """The model ready for decoding in `dtype`: float32 (unchanged), bfloat16 (every weight), or int8 (every
    linear layer, the output layer included; embeddings and norms stay float32). Changes the model in place."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if dtype == "bfloat16":
        return model.to(torch.bfloat16)
    if dtype == "int8":
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, Int8Linear(child.weight, child.bias))
    return model.eval()
