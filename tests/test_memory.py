"""The memory estimator reproduces the facts sheet's formulas and the seed articles' claims."""

import math

import pytest
from transformers import LlamaConfig

from labkit import LabkitError
from labkit.memory import (
    GB,
    PRESETS,
    MemoryBreakdown,
    count_params,
    estimate_memory,
    fits,
    lora_trainable_params,
    resolve_shape,
    shape_from_config,
)

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_SEVEN = ATTENTION + ["gate_proj", "up_proj", "down_proj"]
CHECKPOINTED = {"gradient_checkpointing": True, "dtype": "bf16"}


# --- shapes ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_count_matches_its_shape(name):
    assert count_params(PRESETS[name]) == PRESETS[name].n_params


def test_smollm2_preset_has_the_verified_parameter_count():
    assert PRESETS["SmolLM2-135M"].n_params == 134_515_008


def test_shape_from_a_transformers_config_equals_the_preset():
    config = LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True)
    assert shape_from_config(config) == PRESETS["SmolLM2-135M"]


def test_a_bare_parameter_count_borrows_the_nearest_preset_shape():
    shape = resolve_shape(7e9)
    assert shape.n_params == 7_000_000_000 and shape.hidden == PRESETS["7B"].hidden


# --- LoRA parameter counts ------------------------------------------------------------------------

def test_smollm2_all_linear_rank_8_trains_2_442_240_parameters():
    assert lora_trainable_params("SmolLM2-135M", 8, "all-linear") == 2_442_240


def test_llama_3_1_8b_rank_16_on_all_seven_projections_trains_41_943_040_parameters():
    assert lora_trainable_params("8B", 16, ALL_SEVEN) == 41_943_040


def test_seed_001_figure_13_631_488_is_rank_16_on_attention_only():
    # Seed 001 prints 13,631,488 for r=16 on all seven projections: that is the attention-only
    # (q, k, v, o) count. All seven give 41,943,040 (above). Seed 004 prints 6,553,600 for r=16
    # on q, k, v, o, which matches no target set; the true figure is this one.
    assert lora_trainable_params("8B", 16, ATTENTION) == 13_631_488


def test_llama_default_targets_q_v_at_rank_16_train_6_815_744_parameters():
    assert lora_trainable_params("8B", 16, ["q_proj", "v_proj"]) == 6_815_744


def test_unknown_lora_target_is_rejected_with_the_valid_names():
    with pytest.raises(LabkitError, match="all-linear"):
        lora_trainable_params("8B", 16, ["lm_head"])


# --- formulas -------------------------------------------------------------------------------------

def test_full_fine_tuning_mixed_precision_costs_18_bytes_per_parameter():
    m = estimate_memory("7B", "full", dtype="bf16")
    assert m.weights + m.gradients + m.optimizer == 18 * PRESETS["7B"].n_params


def test_full_fine_tuning_fp32_costs_16_bytes_per_parameter():
    m = estimate_memory("7B", "full", dtype="fp32")
    assert m.weights + m.gradients + m.optimizer == 16 * PRESETS["7B"].n_params


def test_lora_keeps_the_base_at_its_dtype_plus_16_bytes_per_trainable_parameter():
    trainable = lora_trainable_params("8B", 16)
    m = estimate_memory("8B", "lora", dtype="bf16", r=16)
    assert m.weights + m.gradients + m.optimizer == 2 * PRESETS["8B"].n_params + 16 * trainable


def test_adamw8bit_keeps_2_bytes_of_state_and_sgd_none():
    n = lora_trainable_params("8B", 16)
    assert estimate_memory("8B", "lora", optimizer="adamw8bit").optimizer == 2 * n
    assert estimate_memory("8B", "lora", optimizer="sgd").optimizer == 0


def test_double_quantization_shrinks_the_qlora_base():
    plain = estimate_memory("70B", "qlora", double_quant=False).weights
    double = estimate_memory("70B", "qlora", double_quant=True).weights
    quantized_share = 1 - 2 * 128256 * 8192 / PRESETS["70B"].n_params  # all but embeddings and head
    saved_per_param = 0.0625 - (1 / 64 + 4 / (64 * 256))
    assert plain - double == pytest.approx(PRESETS["70B"].n_params * quantized_share * saved_per_param, rel=1e-3)


def test_activations_follow_korthikanti_per_layer_in_16_bit():
    s, b, shape = 512, 2, PRESETS["7B"]
    per_layer = s * b * shape.hidden * (34 + 5 * shape.heads * s / shape.hidden)
    assert estimate_memory(shape, "lora", batch=b, seq_len=s).activations == round(shape.layers * per_layer)


def test_fp32_activations_are_twice_the_16_bit_ones():
    bf16 = estimate_memory("SmolLM2-135M", "lora", dtype="bf16").activations
    assert estimate_memory("SmolLM2-135M", "lora", dtype="fp32").activations == 2 * bf16


def test_gradient_checkpointing_cuts_activations_by_an_order_of_magnitude():
    full = estimate_memory("7B", "qlora", batch=4, seq_len=2048).activations
    checkpointed = estimate_memory("7B", "qlora", batch=4, seq_len=2048, gradient_checkpointing=True).activations
    assert checkpointed < full / 10


def test_logits_of_smollm2_at_8_by_512_fp32_are_805_mb_kept_twice():
    m = estimate_memory("SmolLM2-135M", "lora", batch=8, seq_len=512, dtype="fp32")
    assert m.logits == 2 * 805_306_368


def test_logits_only_at_labelled_positions_scale_with_their_share():
    all_positions = estimate_memory("SmolLM2-135M", "lora", batch=8, seq_len=512).logits
    assert estimate_memory("SmolLM2-135M", "lora", batch=8, seq_len=512, logits_fraction=0.25).logits == (
        all_positions / 4)


def test_total_is_the_sum_of_the_parts_and_prints_in_gb_and_mb():
    m = MemoryBreakdown(weights=3 * 10**9, gradients=2 * 10**8, optimizer=0, activations=0, logits=0)
    assert m.total == 3_200_000_000
    assert "3.00 GB" in str(m) and "200.0 MB" in str(m) and "total" in str(m)


def test_fits_keeps_a_reserve_for_the_cuda_context():
    m = MemoryBreakdown(weights=int(23.5 * GB), gradients=0, optimizer=0, activations=0, logits=0)
    assert fits(m, 24, reserve_gb=0) and not fits(m, 24, reserve_gb=1)


# --- the articles' claims -------------------------------------------------------------------------

def test_7b_needs_roughly_28_gb_just_for_weights_in_fp32():
    weights_gb = estimate_memory("7B", "full", dtype="fp32").weights / GB
    assert weights_gb == pytest.approx(28, rel=0.05)  # 26.95 GB for Llama-2-7B's 6.74B parameters


@pytest.mark.parametrize("batch,seq_len", [(1, 512), (1, 2048), (4, 512), (4, 2048)])
def test_7b_qlora_fits_a_16_gb_gpu_with_gradient_checkpointing(batch, seq_len):
    assert fits(estimate_memory("7B", "qlora", batch=batch, seq_len=seq_len, **CHECKPOINTED), 16)


def test_7b_qlora_at_4_by_2048_needs_gradient_checkpointing_to_fit_24_gb():
    assert not fits(estimate_memory("7B", "qlora", batch=4, seq_len=2048, dtype="bf16"), 24)


def test_13b_qlora_fits_a_24_gb_gpu():
    assert fits(estimate_memory("13B", "qlora", batch=4, seq_len=2048, **CHECKPOINTED), 24)


def test_70b_qlora_fits_one_80_gb_gpu():
    assert fits(estimate_memory("70B", "qlora", batch=1, seq_len=2048, **CHECKPOINTED), 80)


def test_full_fine_tuning_of_7b_needs_several_80_gb_gpus():
    total_gb = estimate_memory("7B", "full", batch=1, seq_len=512, **CHECKPOINTED).total_gb
    assert total_gb > 80 and math.ceil(total_gb / 80) >= 2


# --- bad input ------------------------------------------------------------------------------------

def test_unknown_method_names_the_valid_ones():
    with pytest.raises(LabkitError, match="qlora"):
        estimate_memory("7B", "dora")


def test_negative_batch_is_rejected():
    with pytest.raises(LabkitError, match="batch must be a positive integer"):
        estimate_memory("7B", "lora", batch=-1)


def test_unknown_dtype_names_the_valid_ones():
    with pytest.raises(LabkitError, match="bf16"):
        estimate_memory("7B", "lora", dtype="int8")


def test_unknown_optimizer_names_the_valid_ones():
    with pytest.raises(LabkitError, match="adamw8bit"):
        estimate_memory("7B", "lora", optimizer="adafactor")


def test_unknown_preset_lists_the_presets():
    with pytest.raises(LabkitError, match="SmolLM2-135M"):
        estimate_memory("9B", "lora")


def test_logits_fraction_outside_0_1_is_rejected():
    with pytest.raises(LabkitError, match="logits_fraction"):
        estimate_memory("7B", "lora", logits_fraction=1.5)
