"""Memory per device with data parallelism and ZeRO stages, checked against the ZeRO paper."""

import pytest

from labkit import LabkitError
from labkit.memory import GB, estimate_memory
from labkit.sharding import ModelStates, estimate_memory_per_device, per_device, zero_states

PSI = 7.5e9  # the ZeRO paper's figure 1: 7.5B parameters, 64 devices, mixed-precision Adam (K = 12)


def paper_states() -> ModelStates:
    return zero_states(PSI, "full", dtype="fp16", grad_dtype="fp16")


def test_mixed_precision_adam_is_2_2_and_12_bytes_per_parameter_as_in_the_paper():
    states = paper_states()
    assert (states.parameters / PSI, states.gradients / PSI, states.optimizer / PSI) == (2, 2, 12)


@pytest.mark.parametrize("stage, gb", [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_zero_paper_example_per_device(stage, gb):
    assert round(per_device(paper_states(), 64, stage).total / GB, 1) == gb


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_paper_formulas_hold_for_any_device_count(stage):
    for n in (1, 2, 8, 1024):
        expected = {0: 16 * PSI, 1: 4 * PSI + 12 * PSI / n, 2: 2 * PSI + 14 * PSI / n, 3: 16 * PSI / n}[stage]
        assert per_device(paper_states(), n, stage).total == pytest.approx(expected)


def test_one_device_without_sharding_is_the_single_gpu_estimate():
    one = estimate_memory_per_device("8B", "full", devices=1, zero_stage=0, batch=2, seq_len=512)
    assert one.total == estimate_memory("8B", "full", batch=2, seq_len=512).total


def test_activations_and_logits_are_not_sharded():
    one = estimate_memory("8B", "lora", batch=2, seq_len=512)
    sharded = estimate_memory_per_device("8B", "lora", devices=8, zero_stage=3, batch=2, seq_len=512)
    assert (sharded.activations, sharded.logits) == (one.activations, one.logits)
    assert sharded.weights == pytest.approx(one.weights / 8, rel=1e-9)


def test_lora_keeps_no_master_copy_so_stage_1_only_splits_the_adapter_optimizer():
    states = zero_states("8B", "lora", r=16)
    assert states.optimizer == 8 * states.gradients / 4
    assert per_device(states, 4, 1).parameters == states.parameters


def test_a_bad_device_count_or_stage_is_refused():
    with pytest.raises(LabkitError, match="devices"):
        per_device(paper_states(), 0, 1)
    with pytest.raises(LabkitError, match="ZeRO stage"):
        estimate_memory_per_device("8B", devices=2, zero_stage=4)
