"""labkit.lora: LoRA / rsLoRA / DoRA from scratch, checked against peft on the real SmolLM2-135M."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from labkit import LabkitError
from labkit import lora as L
from labkit import quant as Q

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict  # noqa: E402

QV = ["q_proj", "v_proj"]


# ---------------------------------------------------------------- fixtures and helpers


pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module")
def smollm2() -> nn.Module:
    """The real SmolLM2-135M-Instruct in fp32 (offline cache), loaded once for this module."""
    from labkit.models import ModelUnavailableError, load_model

    try:
        model, _ = load_model()
    except ModelUnavailableError as error:
        pytest.skip(str(error))
    return model


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    """A short batch of token ids: 2 x 16."""
    return torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(0))


def sharing_copy(model: nn.Module, own: tuple[str, ...] = ()) -> nn.Module:
    """A copy of the module tree that shares parameter tensors with `model` (cheap: no 538 MB copy).

    Parameters whose names end with any of `own` are copied, so merging into them is safe.
    """
    memo = {id(p): p for name, p in model.named_parameters() if not (own and name.endswith(own))}
    return copy.deepcopy(model, memo)


def tiny_llama(seed: int = 0) -> nn.Module:
    """A random 2-layer Llama (hidden 64) for fast tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def randomize_adapters(peft_model: nn.Module, seed: int = 1) -> None:
    """Give peft's adapters non-trivial weights: B ~ N(0, 0.02), DoRA magnitudes scaled by ~10%."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.02)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.1 * torch.randn(param.shape, generator=g))


def peft_and_ours(base: nn.Module, targets, use_dora: bool = False, **config) -> tuple[nn.Module, nn.Module]:
    """A peft model with random adapters and our model carrying the very same adapter weights."""
    lora_config = LoraConfig(r=8, lora_alpha=16, target_modules=targets, use_dora=use_dora, **config)
    theirs = get_peft_model(sharing_copy(base), lora_config)
    randomize_adapters(theirs)
    ours = L.inject_lora(
        sharing_copy(base), r=8, alpha=16, target_modules=targets, use_dora=use_dora,
        use_rslora=config.get("use_rslora", False),
    )  # fmt: skip
    L.copy_from_peft(ours, theirs)
    return theirs.eval(), ours.eval()


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits without gradients."""
    with torch.no_grad():
        return model(ids).logits


# ---------------------------------------------------------------- LoRA on the real model


def test_zero_init_B_output_equals_base_at_step_0(smollm2, ids):
    ours = L.inject_lora(sharing_copy(smollm2), r=8, alpha=16, target_modules="all-linear")
    assert all(torch.all(layer.lora_B == 0) for layer in L.lora_layers(ours))
    assert torch.equal(logits(ours, ids), logits(smollm2, ids))


@pytest.mark.parametrize("targets", [QV, "all-linear"], ids=["q_v", "all_linear"])
def test_outputs_equal_peft_with_same_adapter_weights(smollm2, ids, targets):
    """Achieved max abs logit difference: 0.0 (the same fp32 operations in the same order)."""
    theirs, ours = peft_and_ours(smollm2, targets)
    expected, got = logits(theirs, ids), logits(ours, ids)
    assert not torch.equal(expected, logits(smollm2, ids))  # the adapters do change the output
    difference = (got - expected).abs().max().item()
    assert difference <= 1e-6, f"max abs diff {difference}"


def test_dora_outputs_equal_peft_dora(smollm2, ids):
    """DoRA on q/v with random B and magnitudes. Achieved max abs logit difference: 0.0."""
    theirs, ours = peft_and_ours(smollm2, QV, use_dora=True)
    difference = (logits(ours, ids) - logits(theirs, ids)).abs().max().item()
    assert difference <= 1e-5, f"max abs diff {difference}"


def test_merged_weights_equal_peft_merged_weights(smollm2):
    own = ("q_proj.weight", "v_proj.weight")  # private copies of the weights that get merged into
    theirs = get_peft_model(sharing_copy(smollm2, own), LoraConfig(r=8, lora_alpha=16, target_modules=QV))
    randomize_adapters(theirs)
    ours = L.inject_lora(sharing_copy(smollm2, own), r=8, alpha=16, target_modules=QV)
    L.copy_from_peft(ours, theirs)
    theirs.merge_adapter()
    L.merge_lora(ours)
    merged_theirs = {k.removeprefix("base_model.model."): v for k, v in theirs.state_dict().items()}
    merged_ours = {k: v for k, v in ours.state_dict().items() if k.endswith("base_layer.weight")}
    assert len(merged_ours) == 2 * 30
    for name, weight in merged_ours.items():
        assert torch.equal(weight, merged_theirs[name]), name


@pytest.mark.parametrize(
    "targets, expected", [(QV, 460_800), ("all-linear", 2_442_240)], ids=["q_v", "all_linear"]
)
def test_trainable_parameter_counts_equal_peft(smollm2, targets, expected):
    theirs = get_peft_model(sharing_copy(smollm2), LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    ours = L.inject_lora(sharing_copy(smollm2), r=8, alpha=16, target_modules=targets)
    assert L.count_parameters(ours) == theirs.get_nb_trainable_parameters()
    assert L.count_parameters(ours)[0] == expected
    if targets == "all-linear":  # 10,176 * r per layer: (576+576) + (576+192)*2 + (576+576) + 3*(576+1536)
        assert expected == 10_176 * 8 * 30


def test_all_linear_wraps_every_linear_except_lm_head(smollm2):
    ours = L.inject_lora(sharing_copy(smollm2), r=8, alpha=16, target_modules="all-linear")
    wrapped = {name.split(".")[-1] for name, m in ours.named_modules() if isinstance(m, L.LoRALinear)}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert isinstance(ours.lm_head, nn.Linear) and len(L.lora_layers(ours)) == 7 * 30


def test_adapter_state_round_trips_through_peft(smollm2, ids):
    theirs, ours = peft_and_ours(smollm2, QV)
    fresh_theirs = get_peft_model(sharing_copy(smollm2), LoraConfig(r=8, lora_alpha=16, target_modules=QV)).eval()
    set_peft_model_state_dict(fresh_theirs, L.to_peft_state(ours))
    assert torch.equal(logits(fresh_theirs, ids), logits(ours, ids))
    fresh_ours = L.inject_lora(sharing_copy(smollm2), r=8, alpha=16, target_modules=QV).eval()
    L.load_peft_state(fresh_ours, get_peft_model_state_dict(theirs))  # the keys peft saves to disk
    assert torch.equal(logits(fresh_ours, ids), logits(theirs, ids))


# ---------------------------------------------------------------- the layer on its own


def make_layer(**kwargs) -> L.LoRALinear:
    """A LoRALinear over a random 32 -> 24 Linear with bias, and a non-zero B."""
    torch.manual_seed(0)
    layer = L.LoRALinear(nn.Linear(32, 24), **{"r": 4, "alpha": 8, **kwargs})
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    return layer


def test_lora_A_kaiming_uniform_and_B_zero_at_init():
    layer = L.LoRALinear(nn.Linear(576, 192), r=8, alpha=16)
    bound = 1 / math.sqrt(576)  # kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert layer.lora_A.shape == (8, 576) and layer.lora_B.shape == (192, 8)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.95 * bound
    assert torch.all(layer.lora_B == 0)


def test_forward_is_base_plus_scaled_BA():
    layer = make_layer()
    x = torch.randn(3, 32)
    expected = layer.base_layer(x) + x @ layer.lora_A.T @ layer.lora_B.T * (8 / 4)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)


def test_rslora_scaling_is_alpha_over_sqrt_r():
    assert L.LoRALinear(nn.Linear(8, 8), r=16, alpha=16).scaling == 1.0
    assert L.LoRALinear(nn.Linear(8, 8), r=16, alpha=16, use_rslora=True).scaling == 4.0
    theirs = get_peft_model(tiny_llama(), LoraConfig(r=16, lora_alpha=16, use_rslora=True, target_modules=QV))
    ours = L.inject_lora(tiny_llama(), r=16, alpha=16, target_modules=QV, use_rslora=True)
    peft_scaling = theirs.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"]
    assert ours.model.layers[0].self_attn.q_proj.scaling == peft_scaling == 4.0


def test_dropout_only_on_the_adapter_path():
    layer = make_layer(dropout=0.5).train()
    x = torch.randn(3, 32)
    torch.manual_seed(7)
    out = layer(x)
    torch.manual_seed(7)
    dropped = F.dropout(x, 0.5, training=True)
    expected = layer.base_layer(x) + dropped @ layer.lora_A.T @ layer.lora_B.T * layer.scaling
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    with torch.no_grad():
        layer.lora_B.zero_()
    assert torch.equal(layer(x), layer.base_layer(x))  # the base path never sees dropout
    layer.eval()
    torch.testing.assert_close(layer(x), layer.base_layer(x))


def test_merge_then_unmerge_restores_the_weight():
    layer = make_layer()
    original = layer.base_layer.weight.detach().clone()
    x = torch.randn(3, 32)
    unmerged_out = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer.base_layer.weight, original + layer.delta_weight(), rtol=0, atol=0)
    torch.testing.assert_close(layer(x), unmerged_out, rtol=0, atol=1e-6)  # no double counting
    layer.merge()  # merging twice is a no-op
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.base_layer.weight, original, rtol=0, atol=1e-7)


def test_dora_magnitude_starts_at_row_norms_and_output_at_base():
    layer = L.LoRALinear(nn.Linear(32, 24), r=4, alpha=8, use_dora=True)
    torch.testing.assert_close(layer.lora_magnitude_vector, layer.base_layer.weight.norm(dim=1))
    x = torch.randn(3, 32)
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=1e-6)


def test_dora_merge_equals_forward_and_unmerge_restores():
    layer = make_layer(use_dora=True)
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(1.1)
    original = layer.base_layer.weight.detach().clone()
    x = torch.randn(3, 32)
    expected = layer(x)
    L.merge_lora(layer)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)
    L.unmerge_lora(layer)
    torch.testing.assert_close(layer.base_layer.weight, original, rtol=0, atol=1e-6)


def test_dora_with_dropout_matches_peft_in_training_mode():
    theirs = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=QV, use_dora=True,
                                                     lora_dropout=0.3))  # fmt: skip
    randomize_adapters(theirs)
    ours = L.inject_lora(tiny_llama(), r=4, alpha=8, target_modules=QV, use_dora=True, dropout=0.3)
    L.copy_from_peft(ours, theirs)
    theirs.train(), ours.train()
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(3)
    expected = theirs(ids).logits
    torch.manual_seed(3)
    torch.testing.assert_close(ours(ids).logits, expected, rtol=0, atol=1e-5)


def test_inject_lora_freezes_everything_but_the_adapters():
    model = L.inject_lora(tiny_llama(), r=4, alpha=8, target_modules="all-linear", use_dora=True)
    trainable = {name.rsplit(".", 1)[-1] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "lora_magnitude_vector"}


def test_unknown_target_modules_raise_a_clear_error():
    with pytest.raises(LabkitError, match="No linear layer matches"):
        L.inject_lora(tiny_llama(), target_modules=["query_key_value"])


# ---------------------------------------------------------------- QLoRA from scratch


def test_qlora_from_scratch_equals_peft_on_bnb_linear4bit():
    """LoRA over our NF4Linear vs peft's LoRA over bnb Linear4bit (NF4, double quant), same adapters.

    Compared in training mode (dropout 0), where bnb dequantizes and runs an fp32 matmul: max abs
    logit difference 0.0. The frozen 4-bit base gets no gradient; the adapters do.
    """
    bnb = pytest.importorskip("bitsandbytes")
    theirs_base = tiny_llama()
    for name, module in list(theirs_base.named_modules()):
        if isinstance(module, nn.Linear) and name != "lm_head":
            quantized = bnb.nn.Linear4bit(
                module.in_features, module.out_features, bias=False, compute_dtype=torch.float32, quant_type="nf4"
            )
            weight = module.weight.data.clone()
            quantized.weight = bnb.nn.Params4bit(
                weight, requires_grad=False, quant_type="nf4", blocksize=64, compress_statistics=True
            ).to("cpu")
            parent, _, child = name.rpartition(".")
            setattr(theirs_base.get_submodule(parent), child, quantized)
    theirs = get_peft_model(theirs_base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_adapters(theirs)
    ours = L.inject_lora(Q.quantize_model(tiny_llama(), blocksize=64, double_quant=True), r=4, alpha=8,
                         target_modules="all-linear")  # fmt: skip
    L.copy_from_peft(ours, theirs)
    assert isinstance(ours.model.layers[0].mlp.up_proj.base_layer, Q.NF4Linear)
    theirs.train(), ours.train()
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    ours_logits = ours(ids).logits
    difference = (ours_logits - theirs(ids).logits).abs().max().item()
    assert difference <= 1e-6, f"max abs diff {difference}"
    ours_logits.sum().backward()
    layer = ours.model.layers[0].mlp.up_proj
    assert layer.lora_A.grad is not None and layer.lora_A.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in layer.base_layer.parameters())
    assert L.count_parameters(ours) == theirs.get_nb_trainable_parameters()


def test_merging_into_a_4bit_base_raises():
    layer = L.LoRALinear(Q.NF4Linear(nn.Linear(64, 64)), r=4, alpha=8)
    with pytest.raises(LabkitError, match="4-bit"):
        layer.merge()
