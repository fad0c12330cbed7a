"""Which op computes a linear layer while decoding here, chosen by one-time probes.

Every probe is one race (`fastest`): the candidates that pass a correctness check are timed on the same
probe weight (PROBE_SHAPE; as copies exceeding the cache where a decode step streams such weights from
memory) and the fastest wins. Probes run lazily, once per process, the first time a model decodes: nothing
is probed at import. Two choices are made this way:

* float32 one-token steps: nn.Linear (MKL) or oneDNN's inner product (OneDNNLinears);
* int8 layers (Int8Linear): fbgemm, int8pack or widen, for large and for small weights.

The int8 layer lives here with its kernels because its kernel choice is its behaviour. infer/quantize.py keeps
the conversion of a model's weights and --dtype auto's choice, which reads a run's val split: the kernels need
neither a checkpoint nor data. The measurements behind each rule are in docs/benchmarks.md ("Kernel probes").
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinygpt.device import cpu_has_vnni

# ---------------------------------------------------------------- the race every probe runs

PROBE_SHAPE = (2048, 1024)  # a large weight: streaming it from memory outweighs a call's set-up
SMALL_PROBE_SHAPE = (512, 512)  # a weight that stays in cache, where a call's set-up counts
# More than a server CPU's last-level cache: a decode step streams each weight from memory once, and a probe
# that timed one weight sitting in cache picked the slower kernel for that.
STREAMED_BYTES = 64 << 20
PROBE_FAILURES = (AttributeError, RuntimeError, NotImplementedError)  # an op this build or CPU lacks


def probe_operands(shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The probes' seeded weight of `shape` and one input row for it."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(*shape, generator=g)
    return w, torch.randn(1, shape[1], generator=g)


def streamed_copies(t: torch.Tensor) -> list[torch.Tensor]:
    """Copies of t that together exceed the last-level cache, for a probe to time one pass over."""
    return [t.clone() for _ in range(max(1, STREAMED_BYTES // (t.numel() * t.element_size())))]


def fastest_seconds(fn: Callable[[], object], calls: int = 10, repeats: int = 5) -> float:
    """The fastest of `repeats` timings of `calls` calls of fn (the minimum: on a shared machine noise only
    ever adds time)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append(time.perf_counter() - start)
    return min(times)


def passes(check: Callable[[], object]) -> bool:
    """Whether a correctness check passes; one that raises fails (the op is missing here)."""
    try:
        return bool(check())
    except PROBE_FAILURES:
        return False


def fastest(candidates: Sequence[str], check: Callable[[str], object],
            timed: Callable[[str], Callable[[], object]], calls: int = 10, repeats: int = 5,
            handicap: Mapping[str, float] | None = None) -> dict[str, float]:
    """The candidates that pass `check` here, fastest first (the earlier one on a tie), with the seconds that
    `calls` calls of their timed() function took (the best of `repeats`), times their handicap. A lone
    candidate that passes is not timed (0 seconds); none passing gives {}."""
    works = [c for c in candidates if passes(functools.partial(check, c))]
    if len(works) == 1:
        return {works[0]: 0.0}
    seconds = {c: fastest_seconds(timed(c), calls, repeats) * (handicap or {}).get(c, 1.0) for c in works}
    return dict(sorted(seconds.items(), key=lambda item: item[1]))


# ---------------------------------------------------------------- float32: oneDNN for one-token steps

def onednn_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def onednn_agrees() -> bool:
    """Whether oneDNN's fused linear op agrees with F.linear: the op (what Inductor's CPU backend emits for
    linear layers) is not public API, so this build may lack it."""
    if not torch.backends.mkldnn.is_available():
        return False
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=g) for shape in ((1, 16), (8, 16), (8,)))
    return bool(torch.allclose(onednn_linear(x, w, b), F.linear(x, w, b), atol=1e-5))


@functools.cache
def onednn_wins() -> bool:
    """Whether oneDNN's inner product works here and computes one-row products with large float32 weights
    streamed from memory at least 5% faster than F.linear: which of the two is faster depends on the CPU."""
    w, x = probe_operands(PROBE_SHAPE)
    linears = {"linear": lambda c: F.linear(x, c), "onednn": lambda c: onednn_linear(x, c, None)}
    weights = functools.cache(lambda: streamed_copies(w))  # made only when oneDNN passes its check

    def timed(name: str) -> Callable[[], object]:
        return lambda: [linears[name](copy) for copy in weights()]

    race = fastest(("linear", "onednn"), lambda name: name == "linear" or onednn_agrees(), timed,
                   calls=2, repeats=3, handicap={"linear": 0.95})
    return next(iter(race)) == "onednn"


class OneDNNLinears:
    """While active, the model's float32 CPU nn.Linear layers compute single-row inputs with oneDNN.

    A one-token decode step multiplies one row by each weight matrix, a matrix-vector product that only has
    to stream the weight from memory. oneDNN's inner product does that straight from the weight as stored (no
    copy, no repacking); the result agrees with F.linear to float32 rounding (the sums run in another order).

    Only weights of at least MIN_WEIGHT_ELEMENTS take this path: a oneDNN call costs more to set up, which
    only pays where streaming the weight takes longer than that.

    Installed around each decode step only, as an instance attribute that shadows Linear.forward, so the model
    is untouched whenever the generator is suspended. Other inputs (several rows, autocast, other dtypes) take
    F.linear exactly as before.
    """

    MIN_WEIGHT_ELEMENTS = 1 << 18  # 1 MiB of float32

    def __init__(self, model: torch.nn.Module):
        self.forwards: dict[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]] = {}
        if not onednn_wins():
            return
        for module in model.modules():
            w = module.weight if type(module) is torch.nn.Linear else None
            if (w is not None and w.device.type == "cpu" and w.dtype == torch.float32 and w.is_contiguous()
                    and w.numel() >= self.MIN_WEIGHT_ELEMENTS
                    and "forward" not in vars(module)):  # leave a forward someone else replaced alone
                self.forwards[module] = functools.partial(_single_row_linear, module)

    def __enter__(self) -> OneDNNLinears:
        for module, forward in self.forwards.items():
            vars(module)["forward"] = forward  # a plain dict write: nn.Module.__setattr__ is slower
        return self

    def __exit__(self, *exc: object) -> None:
        for module in self.forwards:
            vars(module).pop("forward", None)


def _single_row_linear(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if x.numel() == x.size(-1) and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu"):
        return onednn_linear(x, module.weight, module.bias)
    return F.linear(x, module.weight, module.bias)


# ---------------------------------------------------------------- int8: weights of one byte, three kernels
#
# The int8 weights are symmetric: each output row is divided by its largest magnitude / 127 and rounded.
# Three kernels compute such a layer, and each layer takes the fastest working one for its size:
#
# * fbgemm (PyTorch's quantized.linear_dynamic): the weights packed for VNNI int8 dot products, the
#   activations quantized to 8 bits on the fly, each row with its own scale (fbgemm_rows); fast on large
#   weights, but a call costs more to set up, so it can lose on small ones.
# * int8pack (torch._weight_int8pack_mm, not public API): weight-only, bf16 activations; fast where bf16 is
#   native.
# * widen: the int8 weights widened for each call (correct everywhere, fast nowhere).

KERNELS = ("fbgemm", "int8pack", "widen")
LARGE = 1 << 20  # weights of this many elements and more are "large": streaming outweighs a call's set-up


def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) as int8 rows and their float32 scales (out,): w ~= q * scales[:, None]."""
    scales = w.detach().float().abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.round(w.detach().float() / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def fbgemm_pack(q: torch.Tensor, scales: torch.Tensor) -> torch.ScriptObject:
    """The int8 rows as fbgemm's packed weight (per-channel scales, zero points 0), without a bias."""
    with warnings.catch_warnings():  # quantized tensors are deprecated; the check notices the day they go
        warnings.simplefilter("ignore", UserWarning)
        zero_points = torch.zeros(q.size(0), dtype=torch.long)
        weight = torch._make_per_channel_quantized_tensor(q, scales.double(), zero_points, 0)
        return torch.ops.quantized.linear_prepack(weight, None)


def fbgemm_rows(q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> Callable:
    """fbgemm's product, each row's activations quantized with a scale of their own.

    linear_dynamic rounds all the rows of a call with one scale, from their joint minimum and maximum, so a
    row's result depended on the rows beside it: a served request's greedy tokens changed with whoever shared
    its batch (issue #25), and an evaluation's thousands of rows lost precision. Here each row is divided by
    its largest magnitude, and two input columns of -1 and 1 (against zero weights) pin every call's range to
    exactly [-1, 1]: the scale is then the same for every call, and each row's product is multiplied back by
    its own magnitude. A row gives the same bits alone or in any batch."""
    packed = fbgemm_pack(torch.cat([q, q.new_zeros(q.size(0), 2)], dim=1), scales)
    # Without VNNI, fbgemm multiplies u8 x s8 pairs into saturating int16 sums; 7-bit activations keep them in
    # range.
    reduce_range = not cpu_has_vnni()
    pins = torch.tensor([[-1.0, 1.0]])
    tiny = torch.finfo(torch.float32).tiny

    def call(x: torch.Tensor) -> torch.Tensor:
        magnitude = x.abs().amax(dim=1, keepdim=True).clamp_(min=tiny)
        pinned = torch.cat([x / magnitude, pins.expand(x.size(0), 2)], dim=1)
        y = torch.ops.quantized.linear_dynamic(pinned, packed, reduce_range)
        return y.mul_(magnitude) if bias is None else torch.addcmul(bias, y, magnitude)

    return call


def kernel_call(kernel: str, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> Callable:
    """A function computing x (N, in) float32 -> (N, out) float32 with `kernel` on these int8 rows."""
    if kernel == "fbgemm":
        return fbgemm_rows(q, scales, bias)
    if kernel == "int8pack":  # its fast path wants bf16 activations
        scales_bf16 = scales.to(torch.bfloat16)
        return lambda x: (torch._weight_int8pack_mm(x.to(torch.bfloat16), q, scales_bf16).float()
                          + (0 if bias is None else bias))
    return lambda x: F.linear(x, q.float()) * scales + (0 if bias is None else bias)


def agrees(y: torch.Tensor, want: torch.Tensor) -> bool:
    """Whether a kernel's product is the dequantized one up to its activations' rounding. Measured against
    the largest output, not element by element: fbgemm's 7-bit activations (CPUs without VNNI) miss an
    element-wise tolerance on near-zero outputs."""
    return bool((y - want).abs().max() <= 0.03 * want.abs().max())


@functools.cache
def int8_kernel_works(kernel: str) -> bool:
    """Whether `kernel` runs here and gives the dequantized product (checked once; widen always does)."""
    if kernel == "widen":
        return True
    g = torch.Generator().manual_seed(0)
    w, x, b = torch.randn(64, 64, generator=g), torch.randn(2, 64, generator=g), torch.randn(64, generator=g)
    q, s = int8_rows(w)
    want = x @ (q.float() * s[:, None]).T + b
    return passes(lambda: agrees(kernel_call(kernel, q, s, b)(x), want))


@functools.cache
def fastest_kernel(large: bool) -> str:
    """The working int8 kernel that computes one-row products fastest here: for large weights streamed from
    memory (as a decode step reads them), or for one small weight. Widening reads the int8 weight and then
    writes and reads a float32 copy, so for large weights it is only the fallback."""
    w, x = probe_operands(PROBE_SHAPE if large else SMALL_PROBE_SHAPE)
    q, s = int8_rows(w)
    weights = streamed_copies(q) if large else [q]

    def timed(kernel: str) -> Callable[[], object]:
        calls = [kernel_call(kernel, copy, s, None) for copy in weights]
        return lambda: [call(x) for call in calls]

    with torch.no_grad():
        candidates = KERNELS[:-1] if large else KERNELS
        race = fastest(candidates, int8_kernel_works, timed, calls=10 // len(weights) or 1, repeats=3)
    return next(iter(race), "widen")


class Int8Linear(nn.Module):
    """A linear layer of int8 weights and per-output-channel scales (see above); the bias stays float32."""

    kernel: str | None = None  # one of KERNELS; None: the probe's choice. Tests set it to force a path.

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        q, scales = int8_rows(weight)
        self.register_buffer("weight", q)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.in_features, self.out_features = weight.size(1), weight.size(0)
        self.calls: dict[str, Callable] = {}  # per kernel, made on first use (fbgemm packs its own copy)
        self.chosen: dict[tuple, Callable] = {}  # (forced kernel, device type) -> its call

    def choose(self, x: torch.Tensor) -> str:
        if x.device.type != "cpu":
            return "widen"
        kernel = self.kernel or fastest_kernel(self.weight.numel() >= LARGE)
        # _weight_int8pack_mm crashed the process (a segfault, PyTorch 2.13 on an AVX-512 Xeon) for inputs of
        # several rows whose width is not a multiple of 16 (24, 40, 65, 72, ...); such layers widen instead.
        return "widen" if kernel == "int8pack" and self.in_features % 32 else kernel

    def call(self, x: torch.Tensor) -> Callable:
        key = (self.kernel, x.device.type)
        if key not in self.chosen:
            kernel = self.choose(x)
            if kernel not in self.calls:
                self.calls[kernel] = kernel_call(kernel, self.weight, self.scales, self.bias)
            self.chosen[key] = self.calls[kernel]
        return self.chosen[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The choice is looked up once per (kernel, device), and conversions that would not change anything
        # are skipped: a decode step makes a few such calls per layer, and each op costs a few us.
        flat = x.reshape(-1, x.size(-1))
        y = self.call(x)(flat if flat.dtype == torch.float32 else flat.float())
        y = y.view(*x.shape[:-1], -1) if x.dim() != 2 else y
        return y if y.dtype == x.dtype else y.to(x.dtype)


@functools.cache
def int8_speedup() -> float:
    """How many times faster a one-row product with a large weight runs through Int8Linear than in float32
    here (timed once against F.linear): int8 decoding only pays where its kernels beat float32's here."""
    w, x = probe_operands(PROBE_SHAPE)
    layer = Int8Linear(w, None)
    products = {"float32": lambda: F.linear(x, w), "int8": lambda: layer(x)}
    with torch.no_grad():
        race = fastest(tuple(products), lambda name: True, lambda name: products[name])
    return race["float32"] / race["int8"]
