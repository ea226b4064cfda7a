"""labkit.quant: 4-bit quantization from scratch, bit-exact with bitsandbytes 0.50.2 on CPU."""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as BF  # noqa: E402
from bitsandbytes.backends.default import ops as bnb_default_ops  # noqa: E402

from labkit import quant as Q  # noqa: E402

SHAPES = [
    (64,), (100,), (2,), (63,), (1, 1), (7, 13), (3, 65), (129, 1), (1000, 3),
    (128, 64), (576, 576), (1536, 576), (576, 1536),
]  # fmt: skip
BLOCKSIZES = [64, 128]
QUANT_TYPES = ["nf4", "fp4"]
CASES = list(itertools.product(SHAPES, QUANT_TYPES, BLOCKSIZES, [False, True]))
CASE_IDS = [f"{'x'.join(map(str, s))}-{qt}-bs{bs}-{'dq' if dq else 'nodq'}" for s, qt, bs, dq in CASES]


def weights(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Weight-like test data: N(0, 0.02), with a few exact zeros and one outlier."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 0.02
    flat = x.view(-1)
    flat[:: 17] = 0.0
    flat[len(flat) // 2] = 0.5
    return x


def bnb_quantize(x: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool):
    """bitsandbytes' quantize_4bit on CPU."""
    return BF.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant)


@functools.lru_cache(maxsize=None)
def quantized_both_ways(shape: tuple[int, ...], quant_type: str, blocksize: int, double_quant: bool):
    """(x, bnb packed, bnb QuantState, ours) for one case, shared by the tests below."""
    x = weights(shape)
    packed, state = bnb_quantize(x, quant_type, blocksize, double_quant)
    return x, packed, state, Q.quantize_4bit(x, quant_type, blocksize, double_quant)


def bnb_cpu_kernel_is_row_aligned(shape: tuple[int, ...], blocksize: int) -> bool:
    """Where bnb 0.50.2's CPU dequantize kernel indexes blocks correctly (see the quirk test below)."""
    last = shape[-1]
    return len(shape) == 1 or last % 2 == 1 or last % blocksize == 0


# ---------------------------------------------------------------- codes


pytestmark = pytest.mark.usefixtures("one_thread")



def test_nf4_code_from_normal_quantiles_equals_bnb_table():
    code = Q.nf4_code()
    assert torch.equal(code, BF.get_4bit_type("nf4", device="cpu"))
    assert code.tolist() == list(Q.BNB_NF4_TABLE)
    assert code[7] == 0.0 and (code > 0).sum() == 8 and (code < 0).sum() == 7


def test_fp4_code_equals_bnb_table():
    assert torch.equal(Q.fp4_code(), BF.get_4bit_type("fp4", device="cpu"))
    assert Q.fp4_code()[:8].mul(12).tolist() == [0, 0.0625, 8, 12, 4, 6, 2, 3]


def test_int4_code_is_symmetric_with_15_levels():
    code = Q.int4_code()
    assert code.numel() == 16 and torch.equal(code, -code.flip(0))
    assert code.unique().numel() == 15 and code.max() == 1.0


def test_dynamic_map_equals_bnb_create_dynamic_map():
    assert torch.equal(Q.dynamic_map_signed(), BF.create_dynamic_map(signed=True))


# ---------------------------------------------------------------- bit-exact quantization


@pytest.mark.parametrize("shape, quant_type, blocksize, double_quant", CASES, ids=CASE_IDS)
def test_quantize_4bit_bytes_and_absmax_identical_to_bnb(shape, quant_type, blocksize, double_quant):
    x, packed, state, ours = quantized_both_ways(shape, quant_type, blocksize, double_quant)
    n = math.prod(shape)
    assert ours.packed.shape == packed.shape == ((n + 1) // 2, 1)
    assert torch.equal(ours.packed, packed)
    if double_quant:
        assert state.nested and state.state2.blocksize == ours.absmax.blocksize == 256
        assert torch.equal(ours.absmax.qabsmax, state.absmax)  # uint8, one per block
        assert torch.equal(ours.absmax.absmax2, state.state2.absmax)  # fp32, one per 256 blocks
        assert torch.equal(ours.absmax.offset, state.offset)
        assert torch.equal(ours.absmax.code, state.state2.code)
    else:
        assert ours.absmax.shape == (math.ceil(n / blocksize),)
        assert torch.equal(ours.absmax, state.absmax)


@pytest.mark.parametrize("shape, quant_type, blocksize, double_quant", CASES, ids=CASE_IDS)
def test_dequantize_4bit_identical_to_bnb_reference_kernel(shape, quant_type, blocksize, double_quant):
    """bnb's own pure-PyTorch kernel (backends/default), with bnb's dequantized absmax."""
    x, packed, state, quantized = quantized_both_ways(shape, quant_type, blocksize, double_quant)
    absmax = BF.dequantize_blockwise(state.absmax, state.state2) + state.offset if double_quant else state.absmax
    reference = bnb_default_ops._dequantize_4bit_compute.__wrapped__(  # unwrapped: skip torch.compile
        packed.reshape(-1), absmax, BF.get_4bit_type(quant_type, device="cpu"), blocksize, shape, torch.float32
    )
    ours = quantized.dequantize()
    assert ours.shape == x.shape
    assert torch.equal(ours.reshape(-1), reference.reshape(-1))


ALIGNED = [(c, i) for c, i in zip(CASES, CASE_IDS) if bnb_cpu_kernel_is_row_aligned(c[0], c[2])]


@pytest.mark.parametrize(
    "shape, quant_type, blocksize, double_quant", [c for c, _ in ALIGNED], ids=[i for _, i in ALIGNED]
)
def test_dequantize_4bit_identical_to_bnb_cpu(shape, quant_type, blocksize, double_quant):
    x, packed, state, quantized = quantized_both_ways(shape, quant_type, blocksize, double_quant)
    theirs = BF.dequantize_4bit(packed, state)
    ours = quantized.dequantize()
    # Values identical; bnb returns (1, n) for even 1-D inputs and transposes tensors of <= 2 values.
    assert torch.equal(ours.reshape(-1), theirs.reshape(-1))


def test_bnb_cpu_dequantize_misreads_blocks_that_straddle_rows():
    """bnb 0.50.2's vectorised CPU kernel takes row r, column c's scale from absmax[r * (n // bs) + c // bs].

    That is right only when the row length n is a multiple of the blocksize: SmolLM2's 576-wide rows
    at blocksize 128 come back wrong from bnb (and so would a bnb Linear4bit forward); ours is correct.
    """
    x = weights((576, 576))
    packed, state = bnb_quantize(x, "nf4", 128, False)
    theirs = BF.dequantize_4bit(packed, state)
    ours = Q.quantize_4bit(x, "nf4", 128).dequantize()
    if torch.equal(theirs, ours):
        pytest.skip("this bitsandbytes build dequantizes straddling blocks correctly")
    rows, cols = torch.arange(576).view(-1, 1), torch.arange(576).view(1, -1)
    values = Q.dequantize_4bit(packed, torch.ones_like(state.absmax), Q.nf4_code(), x.shape, 128)
    row_wise_scale = state.absmax[rows * (576 // 128) + cols // 128]
    assert torch.equal(theirs, values * row_wise_scale)
    assert (theirs - x).abs().max() > 5 * (ours - x).abs().max()


def test_value_on_a_midpoint_goes_to_the_lower_index():
    code = Q.nf4_code()
    midpoints = (code[:-1] + code[1:]) / 2
    x = torch.cat([torch.tensor([1.0]), midpoints]).repeat(2)[:32]  # absmax 1: x/absmax == x exactly
    packed, _ = Q.quantize_blockwise_4bit(x, code, 64)
    indices = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 15], 1).view(-1)
    assert indices[1:16].tolist() == list(range(15))  # midpoint k -> index k, not k + 1
    assert torch.equal(packed, bnb_quantize(x, "nf4", 64, False)[0])


def test_all_zero_blocks_match_bnb():
    """A zero full block stores absmax 0; a zero trailing partial block stores 1e-38 (bnb clamps it)."""
    x = torch.zeros(64 * 3 + 5)
    x[64:128] = weights((64,))
    packed, state = bnb_quantize(x, "nf4", 64, False)
    ours = Q.quantize_4bit(x, "nf4", 64)
    assert torch.equal(ours.packed, packed) and torch.equal(ours.absmax, state.absmax)
    assert ours.absmax[0] == 0 and ours.absmax[-1] == torch.tensor(1e-38)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_half_precision_inputs_identical_to_bnb(dtype, quant_type):
    x = weights((576, 576)).to(dtype)
    packed, state = bnb_quantize(x, quant_type, 64, True)
    ours = Q.quantize_4bit(x, quant_type, 64, double_quant=True)
    assert torch.equal(ours.packed, packed) and torch.equal(ours.absmax.qabsmax, state.absmax)
    dequantized = ours.dequantize()
    assert dequantized.dtype == dtype
    assert torch.equal(dequantized, BF.dequantize_4bit(packed, state))


@pytest.mark.parametrize("n", [1, 7, 255, 256, 257, 1407, 13824])
def test_8bit_blockwise_identical_to_bnb(n):
    """The absmax quantizer: bnb's C kernel snaps x/absmax to a 65536-point grid before the lookup."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    q, state = BF.quantize_blockwise(x, blocksize=256)
    code = Q.dynamic_map_signed()
    ours, absmax = Q.quantize_blockwise_8bit(x, code, 256)
    assert torch.equal(ours, q) and torch.equal(absmax, state.absmax)
    assert torch.equal(Q.dequantize_blockwise_8bit(ours, absmax, code, 256), BF.dequantize_blockwise(q, state))


# ---------------------------------------------------------------- storage


def test_bits_per_parameter_4_5_without_and_4_127_with_double_quant():
    assert Q.bits_per_parameter(64) == 4.5
    assert Q.bits_per_parameter(64, double_quant=True) == pytest.approx(4.127, abs=5e-4)
    assert Q.bits_per_parameter(64, double_quant=True) == 4 + 8 / 64 + 32 / (64 * 256)


def test_stored_bits_per_parameter_of_a_real_layer_shape():
    x = weights((1536, 576))
    n = x.numel()
    plain = Q.quantize_4bit(x, "nf4", 64)
    nested = Q.quantize_4bit(x, "nf4", 64, double_quant=True)
    assert (plain.packed.numel() * 8 + plain.absmax.numel() * 32) / n == 4.5
    dq = nested.absmax
    bits = nested.packed.numel() * 8 + dq.qabsmax.numel() * 8 + dq.absmax2.numel() * 32 + 32  # + offset
    assert bits / n == pytest.approx(4.127, abs=1e-3)


# ---------------------------------------------------------------- NF4Linear


def make_pair(quant_type: str, double_quant: bool) -> tuple[nn.Linear, Q.NF4Linear, nn.Module]:
    """An fp32 Linear (576 -> 1536, like SmolLM2's up_proj plus a bias), ours and bnb's 4-bit copies."""
    torch.manual_seed(0)
    linear = nn.Linear(576, 1536)
    with torch.no_grad():
        linear.weight.normal_(0, 0.02)
    ours = Q.NF4Linear(linear, blocksize=64, double_quant=double_quant, quant_type=quant_type)
    theirs = bnb.nn.Linear4bit(
        576, 1536, bias=True, compute_dtype=torch.float32, compress_statistics=double_quant, quant_type=quant_type
    )
    theirs.weight = bnb.nn.Params4bit(
        linear.weight.data.clone(), requires_grad=False, quant_type=quant_type, blocksize=64,
        compress_statistics=double_quant,
    ).to("cpu")  # fmt: skip
    theirs.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return linear, ours, theirs


@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("nf4", False), ("fp4", True)])
def test_nf4linear_output_equals_bnb_linear4bit(quant_type, double_quant):
    """bnb's dequantize-then-matmul path (training mode): achieved max abs error 0.0 (identical)."""
    _, ours, theirs = make_pair(quant_type, double_quant)
    theirs.train()  # the path QLoRA training takes; eval + no-grad may use a fused bf16 kernel
    x = torch.randn(4, 576, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        error = (ours(x) - theirs(x)).abs().max().item()
    assert torch.equal(ours.weight_packed, theirs.weight.data)
    assert error == 0.0, f"max abs error {error}"


def test_nf4linear_close_to_bnb_fused_bf16_inference_kernel():
    """On AVX512-BF16 CPUs bnb's eval forward repacks W and computes in bf16: max abs error ~7.6e-3
    here (outputs up to ~1.9), against 0.155 for 4-bit quantization itself."""
    linear, ours, theirs = make_pair("nf4", True)
    if not theirs.support_avx512bf16_for_cpu:
        pytest.skip("no AVX512-BF16: bnb uses the exact dequantize path (tested above)")
    theirs.eval()
    x = torch.randn(4, 576, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        error = (ours(x) - theirs(x)).abs().max().item()
        quantization_error = (ours(x) - linear(x)).abs().max().item()
    assert error < 2e-2, f"max abs error {error}"
    assert error < quantization_error / 5


def test_nf4linear_is_frozen_and_stores_about_half_a_byte_per_weight():
    linear, ours, _ = make_pair("nf4", True)
    assert not any(p.requires_grad for p in ours.parameters())
    assert ours.weight_packed.dtype == torch.uint8
    bytes_per_weight = ours.storage_bytes() / linear.weight.numel()
    assert bytes_per_weight == pytest.approx(Q.bits_per_parameter(64, True) / 8, abs=2e-3)


def test_quantize_model_replaces_every_linear_except_lm_head():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    Q.quantize_model(model, blocksize=64, double_quant=True)
    kinds = {name: type(m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, Q.NF4Linear))}
    assert kinds.pop("lm_head") is nn.Linear
    assert len(kinds) == 2 * 7 and set(kinds.values()) == {Q.NF4Linear}
    with torch.no_grad():
        after = model(ids).logits
    assert 0 < (after - before).abs().max() < 0.1 * before.abs().max()
