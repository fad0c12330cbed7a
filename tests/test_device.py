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


def test_resolve_device_names_the_problem():
    assert device.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UsageError, match="unknown device 'tpu:7'"):
        device.resolve_device("tpu:7")
    if not torch.cuda.is_available():
        assert device.resolve_device("auto") == torch.device("cpu")
        with pytest.raises(TinyGPTError, match="no CUDA GPU"):
            device.resolve_device("cuda")
