"""Helpers shared by the benchmarks: machine facts, timing, tables and the results file.

Every benchmark script imports this first; it puts the checkout's src/ on the path, so the
benchmarks run from a plain checkout whether or not tinygpt is pip-installed in the venv.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402  (after the path set-up above, like every tinygpt import in the benchmarks)

from tinygpt.device import cpu_has_native_bf16  # noqa: E402  (the trainer's own test, so both agree)

RESULTS = REPO / "bench" / "results.json"
# Tiny Shakespeare ships in data/; GPT-2's ranks file does not (the README says how to get it): the benchmarks
# look for it in ../shared/data beside the checkout, where these machines keep it.
SHAKESPEARE = REPO / "data" / "tinyshakespeare.txt"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


# ---------------------------------------------------------------- machine facts

def cpu_info() -> tuple[str, set[str]]:
    """The CPU's model name and its feature flags (empty where /proc/cpuinfo does not exist)."""
    model: str | None = None
    flags: set[str] = set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():  # every core repeats the same block: the first one says it all
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model is None:
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return model or platform.processor() or platform.machine(), flags


def bf16_skip_reason(device: torch.device) -> str | None:
    """Why bf16 is not benchmarked on this device, or None when it is. Without native bf16 a CPU emulates
    it, about 100x slower than float32, so a bf16 figure would only measure the emulation."""
    if device.type == "cuda":
        return None if torch.cuda.is_bf16_supported() else "no bf16 on this GPU"
    return None if cpu_has_native_bf16() else "no native bf16 on this CPU"


def bench_devices() -> list[torch.device]:
    """The CPU always; the first GPU too where CUDA is available."""
    return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


def machine_info() -> dict[str, Any]:
    model, flags = cpu_info()
    info: dict[str, Any] = {
        "cpu": model,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "native_bf16_cpu": cpu_has_native_bf16(),
        "simd": sorted(f for f in flags if f.startswith(("avx", "amx"))),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_cases(shapes: Sequence[str], dtypes: Sequence[str],
              measure: Callable[[str, str, torch.device], dict[str, Any]],
              describe: Callable[[dict[str, Any]], str]) -> list[dict[str, Any]]:
    """measure(shape, dtype, device) for every device, dtype and shape, printing describe(result) as each
    finishes; a dtype the device would only emulate is recorded as skipped, with the reason."""
    results: list[dict[str, Any]] = []
    for device in bench_devices():
        for dtype_name in dtypes:
            skip = bf16_skip_reason(device) if dtype_name == "bfloat16" else None
            if skip:
                print(f"{device.type} bf16: skipped ({skip})")
                results.append(dict(device=device.type, dtype=dtype_name, skipped=skip))
                continue
            for shape in shapes:
                r = measure(shape, dtype_name, device)
                print(f"{device.type} {shape} {dtype_name}: {describe(r)}{load_warning(r['other_load'])}",
                      flush=True)
                results.append(r)
    return results


# ---------------------------------------------------------------- timing

def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a wall-clock reading covers it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Seconds one call of fn takes (device work included), and what it returned."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


def _busy_cpu_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot, from /proc/stat (None where it does not
    exist)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _process_cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of a running process, from /proc (0 where it cannot be read)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14 and 15


class OtherLoad:
    """Measures how much of the machine other processes used while a benchmark ran.

    On a shared machine a timing is only as good as the quiet around it: another process on one of
    two cores can halve a figure. This reads the machine's busy time and this process's own CPU time
    at both ends; the difference, as a share of all cores over the wall time, is the others' load.
    Usage: `with OtherLoad() as load: ...`, then `load.share` (0..1, None where unknown).
    """

    WARN = 0.10

    def __init__(self, pids: Sequence[int] = ()) -> None:
        self.share: float | None = None
        # processes that are part of the benchmark (a server it started): theirs is not others' load
        self.pids = pids

    def __enter__(self) -> OtherLoad:
        self._start = (time.perf_counter(), _busy_cpu_seconds(), self._own())
        return self

    def __exit__(self, *exc: object) -> None:
        wall0, busy0, own0 = self._start
        wall, busy, own = time.perf_counter() - wall0, _busy_cpu_seconds(), self._own()
        if busy is None or busy0 is None or wall <= 0:
            return
        others = (busy - busy0) - (own - own0)
        self.share = min(1.0, max(0.0, others / (wall * (os.cpu_count() or 1))))

    def _own(self) -> float:
        t = os.times()  # this process and its waited-for children (the memory benchmark's subprocesses)
        return t.user + t.system + t.children_user + t.children_system + sum(map(_process_cpu_seconds,
                                                                                 self.pids))


def load_warning(share: float | None) -> str:
    """A note for a figure measured while other processes were busy, else ''."""
    if share is None or share < OtherLoad.WARN:
        return ""
    return f" [other processes used {share:.0%} of the CPUs meanwhile: this figure is pessimistic]"


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def ratio(ours: float | None, theirs: float | None) -> float | None:
    """ours / theirs, where both were measured."""
    if not ours or not theirs:
        return None
    return ours / theirs


# ---------------------------------------------------------------- output

def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain aligned table: readable in a terminal and pasteable into the docs."""
    cells = [list(headers)] + [[fmt(c) if not isinstance(c, str) else c for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def save_results(section: str, result: Any, path: Path = RESULTS) -> None:
    """Merge one benchmark's result into the results file, keeping the other benchmarks' last results."""
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            data = {}  # a half-written file from an interrupted run: start again
    data["machine"] = machine_info()
    data.setdefault("results", {})[section] = result
    data["updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
    path.write_text(json.dumps(data, indent=2) + "\n")


def parser(doc: str, shapes: Sequence[str] | None = None,
           dtypes: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The options every benchmark script shares: its docstring's first paragraph as the description,
    --quick and --no-save, and where it measures several shapes or dtypes, --shapes and --dtypes."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    if shapes is not None:
        p.add_argument("--shapes", nargs="+", choices=list(shapes), default=list(shapes))
    if dtypes is not None:
        p.add_argument("--dtypes", nargs="+", choices=list(dtypes), default=list(dtypes))
    p.add_argument("--quick", action="store_true", help="fewer repetitions, for a first look")
    p.add_argument("--no-save", action="store_true", help="do not write bench/results.json")
    return p
