"""Where and in which precision to run: device resolution and autocast."""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from tinygpt.config import TrainConfig
from tinygpt.errors import TinyGPTError, UsageError


def resolve_device(name: str) -> torch.device:
    """auto: cuda, then Apple's mps, then cpu. A device that is named but missing is one line, not a trace."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TinyGPTError(f"device {name!r} asked for, but no CUDA GPU is available; use --train.device cpu")
    if dev.type == "mps" and not mps_available():
        raise TinyGPTError(f"device {name!r} asked for, but this PyTorch has no Apple MPS device here (it "
                           "needs Apple silicon and macOS 12.3+); use --train.device cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"device {name!r} is not supported; use auto, cpu, cuda, cuda:N or mps")
    return dev


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


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
    """The autocast compute type, or None for plain float32 (see TrainConfig.dtype). auto: bf16 where the
    hardware computes it (CUDA compute capability 8.0+; CPUs with AVX512-BF16/AMX, 1.3-1.6x faster training
    steps there), float16 with loss scaling on older CUDA GPUs, whose bf16 is emulated or refused, and float32
    on MPS (bf16 there has reports of NaNs) and on other CPUs."""
    forced = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if cfg.dtype in forced:
        return forced[cfg.dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def compile_enabled(cfg: TrainConfig, device: torch.device) -> bool:
    """train.compile, with auto meaning on CUDA only."""
    return device.type == "cuda" if cfg.compile == "auto" else bool(cfg.compile)


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


# ---------------------------------------------------------------- CPU threads

SYSFS_CPUS = Path("/sys/devices/system/cpu")


def physical_cores(cpus: set[int], sysfs: Path = SYSFS_CPUS) -> int:
    """The physical cores among the logical CPUs `cpus` (hyper-threads of one core count once), from sysfs;
    len(cpus) where the topology cannot be read. Matrix kernels gain nothing from a core's second thread."""
    cores = set()
    for cpu in cpus:
        topology = sysfs / f"cpu{cpu}" / "topology"
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(),
                       (topology / "core_id").read_text().strip()))
        except OSError:
            return len(cpus)
    return len(cores) or len(cpus)


def allowed_cpus() -> set[int]:
    """The logical CPUs this process may run on (taskset, a container's cpuset), else all of them."""
    try:
        return os.sched_getaffinity(0)
    except AttributeError:  # macOS, Windows
        return set(range(os.cpu_count() or 1))


def user_set_threads(environ: Mapping[str, str], launcher_environ: Mapping[str, str] | None) -> bool:
    """Whether OMP_NUM_THREADS is the user's. torchrun sets it to 1 for each of several processes when it is
    not set already; its own starting environment (launcher_environ: /proc/<parent>/environ on Linux) tells
    the two apart. Where that cannot be read, a 1 under torchrun is taken to be torchrun's."""
    if "OMP_NUM_THREADS" not in environ:
        return False
    if int(environ.get("LOCAL_WORLD_SIZE", "1")) <= 1:
        return True
    if launcher_environ is not None:
        return "OMP_NUM_THREADS" in launcher_environ
    return environ["OMP_NUM_THREADS"] != "1"


def launcher_environ() -> dict[str, str] | None:
    """The environment the parent process (torchrun's agent) started with, or None where unreadable."""
    try:
        raw = Path(f"/proc/{os.getppid()}/environ").read_bytes()
    except OSError:
        return None
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def cpu_threads(environ: Mapping[str, str] = os.environ) -> tuple[int, str]:
    """Threads for this CPU training process, and why: OMP_NUM_THREADS where the user set it, else its share
    of the physical cores it may run on (all of them for one process; under torchrun, the cores divided by
    the processes on this machine, where torchrun alone would give each process one thread)."""
    if user_set_threads(environ, launcher_environ()):
        return max(1, int(environ["OMP_NUM_THREADS"])), "OMP_NUM_THREADS"
    procs = max(1, int(environ.get("LOCAL_WORLD_SIZE", "1")))
    cores = physical_cores(allowed_cpus())
    share = max(1, cores // procs)
    return share, f"{cores} physical core(s)" + (f" / {procs} processes" if procs > 1 else "")


def use_cpu_threads() -> str:
    """Set this process's torch threads (see cpu_threads); returns the log's words for it."""
    threads, why = cpu_threads()
    torch.set_num_threads(threads)
    return f"{threads} CPU thread(s) ({why})"


# ---------------------------------------------------------------- memory


def is_out_of_memory(e: BaseException) -> bool:
    """A device out-of-memory error: CUDA's has its own class, MPS raises a RuntimeError that says so."""
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower() and "MPS" in str(e))


def peak_memory_gib(device: torch.device) -> float:
    """The most memory the run has held: allocated tensors on CUDA, the driver's allocation on MPS (it
    keeps no peak, so the current figure), and the process's peak resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2**30
    import resource  # POSIX only, and only the CPU needs it

    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / (2**30 if sys.platform == "darwin" else 2**20)  # macOS reports bytes, Linux KiB


def free_memory(device: torch.device) -> None:
    """Give cached device memory back after an attempt that failed or was thrown away."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type == "mps":
        torch.mps.empty_cache()
