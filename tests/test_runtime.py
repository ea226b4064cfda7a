import random

import numpy as np
import pytest
import torch

from labkit import LabkitError
import labkit.runtime as runtime
from labkit.runtime import (
    autocast,
    cpu_bf16_features,
    detect,
    pick_amp_dtype,
    pick_dtype,
    pick_profile,
    requested_dtype,
    seed_everything,
)


@pytest.fixture
def no_dtype_override(monkeypatch):
    monkeypatch.delenv("LABKIT_DTYPE", raising=False)


def fake_cpu(monkeypatch, mkldnn_bf16: bool, **capabilities):
    """Make torch's capability queries describe another CPU."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: mkldnn_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"architecture": "x86_64", **capabilities})


def test_cpu_loads_weights_in_fp32(monkeypatch):
    monkeypatch.setenv("LABKIT_DTYPE", "bf16")
    assert pick_dtype("cpu") == torch.float32


def test_t4_capability_7_5_gets_fp16(no_dtype_override):
    assert pick_dtype("cuda", capability=(7, 5)) == torch.float16


def test_ampere_capability_8_0_gets_bf16(no_dtype_override):
    assert pick_dtype("cuda", capability=(8, 0)) == torch.bfloat16


def test_hopper_capability_9_0_gets_bf16(no_dtype_override):
    assert pick_dtype("cuda", capability=(9, 0)) == torch.bfloat16


def test_mps_trains_in_fp32():
    assert pick_dtype("mps") == torch.float32


def test_cpu_without_cuda_loads_fp32_weights_with_cpu_profile(monkeypatch):
    monkeypatch.delenv("LABKIT_PROFILE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "pick_device", lambda: "cpu")
    rt = detect()
    assert (rt.device, rt.dtype, rt.profile) == ("cpu", torch.float32, "cpu")
    assert rt.model_name == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_avx512_bf16_is_native(monkeypatch):
    fake_cpu(monkeypatch, True, avx512_bf16=True, amx_bf16=False)
    assert cpu_bf16_features() == ["avx512_bf16"]


def test_amx_is_native(monkeypatch):
    fake_cpu(monkeypatch, True, avx512_bf16=False, amx_bf16=True)
    assert cpu_bf16_features() == ["amx_bf16"]


def test_avx512_without_bf16_is_emulated(monkeypatch):
    fake_cpu(monkeypatch, True, avx512_f=True, avx512_bf16=False, amx_bf16=False)
    assert cpu_bf16_features() == []


def test_no_onednn_bf16_is_emulated(monkeypatch):
    fake_cpu(monkeypatch, False, avx512_bf16=True)
    assert cpu_bf16_features() == []


def test_native_cpu_computes_in_bf16_when_the_default_says_so(monkeypatch, no_dtype_override):
    monkeypatch.setattr(runtime, "BF16_MIXED_ON_NATIVE_CPU", True)
    fake_cpu(monkeypatch, True, avx512_bf16=True)
    assert pick_amp_dtype("cpu") == torch.bfloat16


def test_emulating_cpu_computes_in_fp32(monkeypatch, no_dtype_override):
    monkeypatch.setattr(runtime, "BF16_MIXED_ON_NATIVE_CPU", True)
    fake_cpu(monkeypatch, True, avx512_bf16=False, amx_bf16=False)
    assert pick_amp_dtype("cpu") is None


def test_default_is_fp32_even_where_bf16_is_native(monkeypatch, no_dtype_override):
    monkeypatch.setattr(runtime, "BF16_MIXED_ON_NATIVE_CPU", False)
    assert pick_amp_dtype("cpu", native_bf16=True) is None


def test_mixed_precision_keeps_weights_fp32(monkeypatch):
    monkeypatch.setenv("LABKIT_DTYPE", "bf16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "pick_device", lambda: "cpu")
    rt = detect()
    assert (rt.dtype, rt.amp_dtype) == (torch.float32, torch.bfloat16)
    assert "bfloat16 mixed (float32 weights)" in str(rt)


def test_override_fp32_wins_on_a_native_cpu(monkeypatch):
    monkeypatch.setattr(runtime, "BF16_MIXED_ON_NATIVE_CPU", True)
    monkeypatch.setenv("LABKIT_DTYPE", "fp32")
    assert pick_amp_dtype("cpu", native_bf16=True) is None


def test_override_bf16_forces_mixed_precision(monkeypatch):
    monkeypatch.setenv("LABKIT_DTYPE", "BF16")
    assert pick_amp_dtype("cpu", native_bf16=False) == torch.bfloat16


def test_override_sets_cuda_weight_dtype(monkeypatch):
    monkeypatch.setenv("LABKIT_DTYPE", "fp32")
    assert pick_dtype("cuda", capability=(8, 0)) == torch.float32
    assert pick_amp_dtype("cuda") is None


def test_unknown_dtype_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("LABKIT_DTYPE", "fp16")
    with pytest.raises(LabkitError, match=r"LABKIT_DTYPE='fp16' is not a precision; set it to one of \['fp32', 'bf16'\]"):
        requested_dtype()


def test_autocast_without_amp_dtype_changes_nothing():
    a = torch.randn(4, 4)
    with autocast("cpu", None):
        assert (a @ a).dtype == torch.float32


def test_autocast_in_bf16_runs_matmuls_in_bf16():
    a = torch.randn(4, 4)
    with autocast("cpu", torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16


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


def test_runtime_report_names_device_dtype_bf16_hardware_and_profile(monkeypatch, no_dtype_override):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "pick_device", lambda: "cpu")
    text = str(detect())
    for word in ("device", "dtype", "float32", "LABKIT_DTYPE", "bf16", "profile", "cpu"):
        assert word in text


@pytest.mark.parametrize("busy, warned", [(0.1, False), (1.0, True)])
def test_runtime_report_says_when_other_jobs_leave_fewer_free_cores_than_threads(monkeypatch, busy, warned):
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(runtime, "busy_cores", lambda: busy)
    text = str(runtime.Runtime("cpu", torch.float32, 2, "cpu", {"model": "m"}))
    assert ("busy" in text and "LABKIT_THREADS" in text) == warned


@pytest.mark.parametrize("converted", [False, True])
def test_runtime_report_names_the_offline_weights_once_they_are_converted(monkeypatch, tmp_path, converted):
    monkeypatch.setenv("LABKIT_HOME", str(tmp_path))
    rt = runtime.Runtime("cpu", torch.float32, 2, "cpu", {"model": runtime.SMOLLM2_135M})
    if converted:
        folder = runtime.model_dir(rt.model_name)
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
    text = str(rt)
    assert ("weights  the offline copy" in text and "Q4_1" in text) == converted


def test_busy_cores_is_a_share_of_this_machines_cores():
    busy = runtime.busy_cores(interval=0.05)
    assert busy is None or 0 <= busy <= (runtime.os.cpu_count() or 1)


def test_seed_everything_repeats_python_numpy_and_torch():
    def draw():
        return random.random(), np.random.rand(), torch.rand(1).item()

    seed_everything(7)
    first = draw()
    seed_everything(7)
    assert draw() == first


def test_mixed_precision_run_has_its_own_adapter_cache_key(monkeypatch):
    import labkit.sft
    from labkit.sft import SFTConfig, run_key

    monkeypatch.setattr(labkit.sft, "pick_device", lambda: "cpu")
    examples = [{"messages": [{"role": "user", "content": "hi"}]}]
    monkeypatch.setenv("LABKIT_DTYPE", "fp32")
    fp32 = run_key("m", examples, SFTConfig())
    monkeypatch.setenv("LABKIT_DTYPE", "bf16")
    assert run_key("m", examples, SFTConfig()) != fp32


def test_cpu_mixed_precision_runs_attention_in_fp32_and_restores_sdpa(tiny_llama):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    before = ALL_ATTENTION_FUNCTIONS["sdpa"]
    seen = []
    with autocast("cpu", torch.bfloat16):
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is runtime.fp32_attention
        q = k = v = torch.randn(1, 2, 5, 8, dtype=torch.bfloat16)
        out, _ = runtime.fp32_attention(torch.nn.Module(), q, k, v, None, is_causal=True)
        seen.append(out.dtype)
        model = tiny_llama()
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert seen == [torch.bfloat16] and torch.isfinite(logits).all()
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is before


def test_fp32_attention_equals_sdpa_in_fp32():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 8) for _ in range(3))
    module = torch.nn.Module()
    ours, _ = runtime.fp32_attention(module, q, k, v, None, is_causal=True)
    ref, _ = sdpa_attention_forward(module, q, k, v, None, is_causal=True)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("value", ["abc", "0", "-2"])
def test_a_bad_thread_count_is_a_clear_error_not_a_traceback(monkeypatch, value):
    monkeypatch.setenv("LABKIT_THREADS", value)
    with pytest.raises(LabkitError, match=rf"LABKIT_THREADS='{value}' is not a whole number from 1 to 1024; set it"):
        runtime.detect(seed=None)


def test_the_thread_count_is_read_from_the_environment(monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setenv("LABKIT_THREADS", "1")
    try:
        assert runtime.detect(seed=None).threads == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("device, says", [
    ("cuda", "device 'cuda' was asked for, but this machine has no GPU"),
    ("cuda:1", "device 'cuda:1' was asked for, but this machine has no GPU"),
    ("tpu", "device 'tpu' is not a device. Fix: use cpu, cuda or mps"),
])
def test_a_device_this_machine_lacks_is_a_clear_error(monkeypatch, device, says):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(LabkitError, match=says):
        runtime.check_device(device)
