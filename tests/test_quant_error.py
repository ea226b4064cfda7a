"""labkit.quant, measured: quantization error of tensors and models, and how evenly a code's values are used (notebook 04)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from labkit import LabkitError
from labkit import quant as Q

pytestmark = pytest.mark.usefixtures("one_thread")


def gaussian(shape=(256, 256), seed: int = 0) -> torch.Tensor:
    """Weight-like values: N(0, 0.02)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02


# ---------------------------------------------------------------- normalised blocks and errors


def test_blockwise_normalized_divides_each_block_by_its_absmax():
    w = gaussian((4, 128))
    blocks = w.reshape(-1, 64)
    scaled = Q.blockwise_normalized(w, 64).view(-1, 64)
    assert torch.equal(scaled.abs().amax(dim=1), torch.ones(8))
    assert torch.allclose(scaled, blocks / blocks.abs().amax(dim=1, keepdim=True))


def test_blockwise_normalized_leaves_out_a_trailing_partial_block():
    assert Q.blockwise_normalized(gaussian((1, 100)), 64).numel() == 64


def test_quantization_error_nf4_below_fp4_and_int4_on_gaussian_weights():
    w = gaussian((512, 256))
    error = {qt: Q.quantization_error(w, qt, 64)["relative_error"] for qt in ["nf4", "fp4", "int4"]}
    assert error["nf4"] < error["int4"] and error["nf4"] < error["fp4"], error


def test_quantization_error_grows_with_the_block_size():
    w = gaussian((256, 256))
    errors = [Q.quantization_error(w, "nf4", bs)["relative_error"] for bs in [32, 64, 256, 1024]]
    assert errors == sorted(errors) and errors[0] < errors[-1]


def test_quantization_error_matches_dequantizing_by_hand():
    w = gaussian((64, 96))
    report = Q.quantization_error(w, "fp4", 128, double_quant=True)
    back = Q.quantize_4bit(w, "fp4", 128, double_quant=True).dequantize()
    assert report["relative_error"] == pytest.approx(((back - w).norm() / w.norm()).item(), rel=1e-5)
    assert report["rmse"] == pytest.approx((back - w).pow(2).mean().sqrt().item(), rel=1e-5)
    assert report["bits"] == Q.bits_per_parameter(128, True) and report["n"] == w.numel()


def test_quantization_error_is_zero_for_values_on_the_code():
    w = Q.nf4_code().repeat(8) * 0.5  # every block of 64 holds the 16 code values times its absmax
    report = Q.quantization_error(w, "nf4", 64)
    assert report["sq_error"] == 0.0 and report["relative_error"] == 0.0


def test_quantization_error_of_all_zeros_is_zero():
    assert Q.quantization_error(torch.zeros(4, 64))["relative_error"] == 0.0


def test_model_quantization_error_pools_squared_errors_over_all_linear_weights(tiny_llama):
    model = tiny_llama(num_hidden_layers=3)
    report = Q.model_quantization_error(model, "nf4", 64)
    singles = [Q.quantization_error(m.weight, "nf4", 64) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name != "lm_head"]  # fmt: skip
    assert len(singles) == 3 * 7
    assert report["weights"] == sum(s["n"] for s in singles)
    pooled = math.sqrt(sum(s["sq_error"] for s in singles) / sum(s["sq_norm"] for s in singles))
    assert report["relative_error"] == pytest.approx(pooled, rel=1e-12)


def test_model_quantization_error_layers_picks_decoder_layers(tiny_llama):
    model = tiny_llama(num_hidden_layers=3)
    one_layer = sum(m.weight.numel() for m in model.model.layers[1].modules() if isinstance(m, nn.Linear))
    assert Q.model_quantization_error(model, layers=[1])["weights"] == one_layer
    assert Q.model_quantization_error(model, layers=range(0, 3, 2))["weights"] == 2 * one_layer


def test_model_quantization_error_refuses_a_model_without_linear_weights(tiny_llama):
    model = Q.quantize_model(tiny_llama())  # only lm_head is left, and it is skipped
    with pytest.raises(LabkitError, match="no nn.Linear"):
        Q.model_quantization_error(model)


# ---------------------------------------------------------------- code usage


@pytest.mark.parametrize("quant_type, values", [("nf4", 16), ("fp4", 15), ("int4", 15)])
def test_code_usage_has_one_share_per_distinct_code_value(quant_type, values):
    """FP4 has +0 and -0, int4 has 0 twice: each counts as one value."""
    shares = Q.code_usage(gaussian(), quant_type, 64)
    assert shares.shape == (values,)
    assert shares.sum().item() == pytest.approx(1.0)


def test_code_usage_counts_where_each_value_was_quantized():
    code = Q.nf4_code()
    w = torch.cat([code, code[:-1].flip(0), code[-1:]]) * 0.25  # each value twice per block of 32
    assert torch.equal(Q.code_usage(w, "nf4", 32), torch.full((16,), 1 / 16, dtype=torch.float64))


def test_usage_entropy_of_uniform_is_four_bits():
    assert Q.usage_entropy(torch.full((16,), 1 / 16)) == pytest.approx(4.0)


def test_usage_entropy_of_a_single_value_is_zero():
    assert Q.usage_entropy(torch.tensor([0.0, 1.0, 0.0])) == 0.0


def test_nf4_uses_its_values_more_evenly_than_int4_and_fp4_on_gaussian_weights():
    entropy = {qt: Q.usage_entropy(Q.code_usage(gaussian((512, 256)), qt, 64)) for qt in ["nf4", "fp4", "int4"]}
    assert entropy["nf4"] > 3.8 and entropy["nf4"] > entropy["int4"] and entropy["nf4"] > entropy["fp4"]
