"""Device and precision choice (tinygpt.device)."""

import pytest
import torch

from tinygpt import device
from tinygpt.config import TrainConfig
from tinygpt.errors import TinyGPTError, UsageError


def test_autocast_dtype_follows_the_setting_and_the_cpu(monkeypatch):
    cpu = torch.device("cpu")
    assert device.autocast_dtype(TrainConfig(dtype="float32"), cpu) is None
    assert device.autocast_dtype(TrainConfig(dtype="bfloat16"), cpu) is torch.bfloat16
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    assert device.autocast_dtype(TrainConfig(dtype="auto"), cpu) is None  # emulated bf16 is far slower
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    assert device.autocast_dtype(TrainConfig(dtype="auto"), cpu) is torch.bfloat16


@pytest.mark.parametrize("gpu,capability,want", [
    ("Tesla T4", (7, 5), torch.float16), ("Tesla V100-SXM2-16GB", (7, 0), torch.float16),
    ("NVIDIA A100-SXM4-40GB", (8, 0), torch.bfloat16), ("NVIDIA H100 80GB HBM3", (9, 0), torch.bfloat16)])
def test_auto_precision_on_a_gpu_follows_its_compute_capability(monkeypatch, gpu, capability, want):
    """bf16 needs compute capability 8.0 (Ampere) in hardware; older GPUs get float16 with loss scaling."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: capability)
    cuda = torch.device("cuda", 0)
    assert device.autocast_dtype(TrainConfig(dtype="auto"), cuda) is want, gpu
    assert device.autocast_dtype(TrainConfig(dtype="float32"), cuda) is None
    assert device.autocast_dtype(TrainConfig(dtype="float16"), cuda) is torch.float16


@pytest.mark.parametrize("flags,want", [({"avx2", "fma"}, None), ({"avx512f", "avx512_bf16"}, torch.bfloat16),
                                        ({"avx512f", "amx_bf16", "amx_tile"}, torch.bfloat16), (set(), None)])
def test_auto_precision_on_a_cpu_follows_its_flags(monkeypatch, flags, want):
    monkeypatch.setattr(device, "cpu_flags", lambda: flags)
    assert device.autocast_dtype(TrainConfig(dtype="auto"), torch.device("cpu")) is want
    # float16 is only ever asked for: CPUs compute it no faster than float32
    assert device.autocast_dtype(TrainConfig(dtype="float16"), torch.device("cpu")) is torch.float16


def test_mps_trains_in_float32_and_compiles_only_when_asked():
    mps = torch.device("mps")
    assert device.autocast_dtype(TrainConfig(dtype="auto"), mps) is None  # bf16 on MPS has NaN reports
    assert not device.compile_enabled(TrainConfig(compile="auto"), mps)
    assert device.compile_enabled(TrainConfig(compile="auto"), torch.device("cuda", 0))
    assert not device.compile_enabled(TrainConfig(compile="auto"), torch.device("cpu"))
    assert device.compile_enabled(TrainConfig(compile=True), torch.device("cpu"))
    assert not device.compile_enabled(TrainConfig(compile=False), torch.device("cuda", 0))


def test_resolve_device_names_the_problem(monkeypatch):
    assert device.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UsageError, match="unknown device 'tpu:7'"):
        device.resolve_device("tpu:7")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device, "mps_available", lambda: False)
    assert device.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(TinyGPTError, match="no CUDA GPU"):
        device.resolve_device("cuda")
    with pytest.raises(TinyGPTError, match=r"^device 'mps' asked for, but this PyTorch has no Apple MPS"):
        device.resolve_device("mps")


def test_auto_device_prefers_cuda_then_mps(monkeypatch):
    monkeypatch.setattr(device, "mps_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device.resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device.resolve_device("auto") == torch.device("cuda")


def fake_topology(root, cores):
    """A sysfs cpu folder: logical CPU i on (package, core) cores[i]."""
    for cpu, (package, core) in enumerate(cores):
        topo = root / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text(f"{package}\n")
        (topo / "core_id").write_text(f"{core}\n")


def test_physical_cores_count_hyperthreads_once(tmp_path):
    # 2 sockets x 4 cores x 2 threads, numbered as Linux does: the second threads after the first ones
    fake_topology(tmp_path, [(s, c) for _ in range(2) for s in range(2) for c in range(4)])
    assert device.physical_cores(set(range(16)), tmp_path) == 8
    assert device.physical_cores({0, 8}, tmp_path) == 1  # two threads of one core (taskset)
    assert device.physical_cores({0, 1, 2}, tmp_path / "missing") == 3  # unreadable: count what we may use


@pytest.mark.parametrize("environ,launcher,want", [
    ({}, None, (16, "16 physical core(s)")),  # one process: every core
    ({"LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}, {}, (8, "16 physical core(s) / 2 processes")),
    ({"LOCAL_WORLD_SIZE": "4", "OMP_NUM_THREADS": "1"}, None, (4, "16 physical core(s) / 4 processes")),
    ({"LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "3"}, {"OMP_NUM_THREADS": "3"}, (3, "OMP_NUM_THREADS")),
    ({"LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}, {"OMP_NUM_THREADS": "1"}, (1, "OMP_NUM_THREADS")),
    ({"OMP_NUM_THREADS": "6"}, None, (6, "OMP_NUM_THREADS")),
    ({"LOCAL_WORLD_SIZE": "32", "OMP_NUM_THREADS": "1"}, {}, (1, "16 physical core(s) / 32 processes")),
])
def test_each_cpu_process_gets_its_share_of_the_cores(monkeypatch, environ, launcher, want):
    """torchrun sets OMP_NUM_THREADS=1 for each of several processes unless the user set it; that default is
    replaced by the process's share, the user's value is kept."""
    monkeypatch.setattr(device, "allowed_cpus", lambda: set(range(32)))
    monkeypatch.setattr(device, "physical_cores", lambda cpus: 16)
    monkeypatch.setattr(device, "launcher_environ", lambda: launcher)
    assert device.cpu_threads(environ) == want


def test_out_of_memory_errors_are_recognised():
    assert device.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert device.is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 8.00 GB)"))
    assert not device.is_out_of_memory(RuntimeError("shape mismatch"))
    assert device.peak_memory_gib(torch.device("cpu")) > 0
