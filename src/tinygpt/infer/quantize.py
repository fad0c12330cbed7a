"""Fewer bytes per weight for decoding: bfloat16 weights, or int8 weights with a float scale per output channel.

Batch-1 decoding reads every weight once per token, so on a CPU its speed is bound by the bytes it reads:
bf16 halves them and int8 quarters them. The int8 weights are symmetric: each output row of a linear layer
is divided by its largest magnitude / 127 and rounded; the token embedding's gather stays in float (a gather
reads one row, not the matrix), and a tied output layer gets its own int8 copy.

Three kernels compute an int8 layer; a one-time probe times the ones that run here and agree with the reference,
for a large weight and a small one, and each layer takes the fastest for its size:

* fbgemm (PyTorch's quantized.linear_dynamic): the weights packed for VNNI int8 dot products, the activations
  quantized to 8 bits on the fly (one scale per call, so rows of a batch share it). Streamed a 124M model's large
  weights at about twice int8pack's speed on an AMD EPYC with AVX-512, but pays ~15 us a call: slower on small layers.
* int8pack (torch._weight_int8pack_mm, not public API): weight-only, bf16 activations; fast where bf16 is native.
* widen: the int8 weights widened for each call (correct everywhere, fast nowhere).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinygpt.device import cpu_has_vnni, fastest_seconds, streamed_copies

DTYPES = ("float32", "bfloat16", "int8")
KERNELS = ("fbgemm", "int8pack", "widen")
FBGEMM_MAX_ROWS = 16  # the server's default batch; calls with more rows (prefill, evaluation) widen instead
LARGE = 1 << 20  # weights of this many elements and more are "large": streaming them outweighs a call's set-up


def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) as int8 rows and their float32 scales (out,): w ~= q * scales[:, None]."""
    scales = w.detach().float().abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.round(w.detach().float() / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def fbgemm_pack(q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.ScriptObject:
    """The int8 rows as fbgemm's packed weight (per-channel scales, zero points 0), bias included."""
    with warnings.catch_warnings():  # quantized tensors are deprecated; the probe notices the day they are gone
        warnings.simplefilter("ignore", UserWarning)
        weight = torch._make_per_channel_quantized_tensor(q, scales.double(), torch.zeros(q.size(0), dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(weight, bias)


# Without VNNI, fbgemm multiplies u8 x s8 pairs into saturating int16 sums; 7-bit activations keep them in range.
REDUCE_RANGE = not cpu_has_vnni()


def kernel_call(kernel: str, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> Callable:
    """A function computing x (N, in) float32 -> (N, out) float32 with `kernel` on these int8 rows."""
    if kernel == "fbgemm":
        packed = fbgemm_pack(q, scales, bias)
        return lambda x: torch.ops.quantized.linear_dynamic(x, packed, REDUCE_RANGE)
    if kernel == "int8pack":  # its fast path wants bf16 activations (float32 ones measured 10x slower)
        scales_bf16 = scales.to(torch.bfloat16)
        return lambda x: (torch._weight_int8pack_mm(x.to(torch.bfloat16), q, scales_bf16).float()
                          + (0 if bias is None else bias))
    return lambda x: F.linear(x, q.float()) * scales + (0 if bias is None else bias)


def agrees(y: torch.Tensor, want: torch.Tensor) -> bool:
    """Whether a kernel's product is the dequantized one up to its activations' rounding. Measured against the
    largest output, not element by element: fbgemm's 7-bit activations (CPUs without VNNI) are off by ~1% of it,
    which an element-wise tolerance rejected on near-zero outputs, leaving AVX2 CPUs without their fastest kernel."""
    return bool((y - want).abs().max() <= 0.03 * want.abs().max())


@functools.cache
def working_kernels() -> tuple[str, ...]:
    """The kernels that run here and give the dequantized product (probed once; widen always does)."""
    g = torch.Generator().manual_seed(0)
    w, x, b = torch.randn(64, 64, generator=g), torch.randn(2, 64, generator=g), torch.randn(64, generator=g)
    q, s = int8_rows(w)
    want = x @ (q.float() * s[:, None]).T + b
    works = []
    for kernel in KERNELS[:-1]:
        try:
            if agrees(kernel_call(kernel, q, s, b)(x), want):
                works.append(kernel)
        except (AttributeError, RuntimeError, NotImplementedError):
            pass
    return (*works, "widen")


@functools.cache
def fastest_kernel(large: bool) -> str:
    """The working kernel that computes one-row products fastest here (~0.3 s, once): for large weights streamed
    from memory (many, more than the cache holds, as a decode step reads them), or for one small weight."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(*((2048, 1024) if large else (512, 512)), generator=g)
    x = torch.randn(1, w.size(1), generator=g)
    q, s = int8_rows(w)
    weights = streamed_copies(q) if large else [q]

    def seconds(kernel: str) -> float:
        calls = [kernel_call(kernel, w, s, None) for w in weights]
        return fastest_seconds(lambda: [call(x) for call in calls], calls=10 // len(calls) or 1, repeats=3)

    # Widening reads the int8 weight and then writes and reads a float32 copy: it never streams a large weight
    # faster than the others, and timing it over the copies took most of a second.
    kernels = (working_kernels()[:-1] or working_kernels()) if large else working_kernels()
    with torch.no_grad():
        return min(kernels, key=seconds)


class Int8Linear(nn.Module):
    """A linear layer holding int8 weights and per-output-channel scales (see the module docstring)."""

    kernel: str | None = None  # one of KERNELS; None: the probe's choice. Tests set it to force a path.

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        q, scales = int8_rows(weight)
        self.register_buffer("weight", q)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.in_features, self.out_features = weight.size(1), weight.size(0)
        self.calls: dict[str, Callable] = {}  # per kernel, made on first use (fbgemm packs its own copy)
        self.chosen: dict[tuple, Callable] = {}  # (forced kernel, device type, many rows) -> its call

    def choose(self, x: torch.Tensor) -> str:
        if x.device.type != "cpu":
            return "widen"
        kernel = self.kernel or fastest_kernel(self.weight.numel() >= LARGE)
        # _weight_int8pack_mm crashed the process (a segfault, PyTorch 2.13 on an AVX-512 Xeon) for inputs of
        # several rows whose width is not a multiple of 16 (24, 40, 65, 72, ...); such layers widen instead.
        if kernel == "int8pack" and self.in_features % 32:
            return "widen"
        # fbgemm rounds all the rows of a call with one activation scale: fine for a decode step's few rows, but
        # over an evaluation's thousands it moved the demo model's val perplexity by -1.3% (one row: -0.02%).
        # Many rows are compute-bound anyway, where widening once per call costs little.
        return "widen" if kernel == "fbgemm" and x.numel() > FBGEMM_MAX_ROWS * x.size(-1) else kernel

    def call(self, x: torch.Tensor) -> Callable:
        key = (self.kernel, x.device.type, x.numel() > FBGEMM_MAX_ROWS * x.size(-1))
        if key not in self.chosen:
            kernel = self.choose(x)
            if kernel not in self.calls:
                self.calls[kernel] = kernel_call(kernel, self.weight, self.scales, self.bias)
            self.chosen[key] = self.calls[kernel]
        return self.chosen[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The choice is looked up once per (kernel, device), and conversions that would not change anything
        # are skipped: a decode step of a 10M model makes ~25 of these calls, each op costing a few us.
        flat = x.reshape(-1, x.size(-1))
        y = self.call(x)(flat if flat.dtype == torch.float32 else flat.float())
        y = y.view(*x.shape[:-1], -1) if x.dim() != 2 else y
        return y if y.dtype == x.dtype else y.to(x.dtype)


@functools.cache
def int8_speedup() -> float:
    """How many times faster a one-row product with a large weight runs through Int8Linear than in float32 here
    (timed once, ~0.1 s, against F.linear). Measured: 3x on an Intel Xeon with AMX (int8pack), 2.4x on an AMD EPYC
    with AVX-512 (fbgemm); int8pack alone was below 1 where bf16 is emulated."""
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
