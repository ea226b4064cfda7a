import random

import numpy as np
import pytest
import torch

from labkit import LabkitError
from labkit.runtime import detect, pick_dtype, pick_profile, seed_everything


def test_cpu_trains_in_fp32():
    assert pick_dtype("cpu") == torch.float32


def test_t4_capability_7_5_gets_fp16():
    assert pick_dtype("cuda", capability=(7, 5)) == torch.float16


def test_ampere_capability_8_0_gets_bf16():
    assert pick_dtype("cuda", capability=(8, 0)) == torch.bfloat16


def test_hopper_capability_9_0_gets_bf16():
    assert pick_dtype("cuda", capability=(9, 0)) == torch.bfloat16


def test_mps_trains_in_fp32():
    assert pick_dtype("mps") == torch.float32


def test_this_machine_is_cpu_fp32_with_cpu_profile(monkeypatch):
    monkeypatch.delenv("LABKIT_PROFILE", raising=False)
    rt = detect()
    assert (rt.device, rt.dtype, rt.profile) == ("cpu", torch.float32, "cpu")
    assert rt.model_name == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_profile_is_gpu_on_cuda_and_cpu_elsewhere(monkeypatch):
    monkeypatch.delenv("LABKIT_PROFILE", raising=False)
    assert pick_profile("cuda") == "gpu"
    assert pick_profile("cpu") == "cpu"


def test_environment_variable_overrides_profile(monkeypatch):
    monkeypatch.setenv("LABKIT_PROFILE", "gpu")
    assert pick_profile("cpu") == "gpu"


def test_unknown_profile_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("LABKIT_PROFILE", "tpu")
    with pytest.raises(LabkitError, match="LABKIT_PROFILE='tpu' is not a profile"):
        pick_profile("cpu")


def test_runtime_report_names_device_dtype_and_profile():
    text = str(detect())
    for word in ("device", "dtype", "float32", "profile", "cpu"):
        assert word in text


def test_seed_everything_repeats_python_numpy_and_torch():
    def draw():
        return random.random(), np.random.rand(), torch.rand(1).item()

    seed_everything(7)
    first = draw()
    seed_everything(7)
    assert draw() == first
