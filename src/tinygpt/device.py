"""Where and in which precision to run: device resolution and autocast."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

from tinygpt.config import TrainConfig
from tinygpt.errors import TinyGPTError, UsageError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TinyGPTError(f"device {name!r} asked for, but no CUDA GPU is available; use --train.device cpu")
    return dev


@functools.cache
def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere, which makes every check below say
    no)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags")
            for flag in line.split(":", 1)[1].split()}


def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes bf16 in hardware (AVX512-BF16 or AMX). Elsewhere PyTorch emulates it:
    measured on a 2-core AVX2 EPYC, a bf16 matmul ran at 1.3 GFLOP/s against 171 in float32."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def cpu_has_vnni() -> bool:
    """Whether the CPU has int8 dot products that accumulate in 32 bits (AVX512-VNNI or AVX-VNNI)."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni"})


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast compute type, or None for plain float32. auto: bf16 on CUDA and on CPUs with native
    bf16 (1.3-1.6x faster training steps there), float32 elsewhere."""
    if cfg.dtype == "bfloat16":
        return torch.bfloat16
    if cfg.dtype == "auto" and (device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())):
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# Dense bf16 tensor-core peaks from the vendors' data sheets, for model-FLOPs utilisation (MFU).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12,
                   "RTX 4090": 165e12}


def peak_flops(device: torch.device) -> float | None:
    """The GPU's bf16 peak, when it is one we know; None elsewhere (MFU is then not reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)
