"""labkit.lora: LoRA / rsLoRA / DoRA from scratch, checked against peft on the real SmolLM2-135M; shared copies."""

from __future__ import annotations

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
def base(smollm2) -> nn.Module:
    """The real SmolLM2-135M-Instruct in fp32 (the session's copy: tests adapt shared_copy()s of it)."""
    return smollm2[0]


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    """A short batch of token ids: 2 x 16."""
    return torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(0))


def peft_and_ours(base: nn.Module, targets, use_dora: bool = False, **config) -> tuple[nn.Module, nn.Module]:
    """A peft model with random adapters and our model carrying the very same adapter weights."""
    lora_config = LoraConfig(r=8, lora_alpha=16, target_modules=targets, use_dora=use_dora, **config)
    theirs = get_peft_model(L.shared_copy(base), lora_config)
    L.randomize_adapters(theirs)
    ours = L.inject_lora(
        L.shared_copy(base), r=8, lora_alpha=16, target_modules=targets, use_dora=use_dora,
        use_rslora=config.get("use_rslora", False),
    )  # fmt: skip
    L.copy_from_peft(ours, theirs)
    return theirs.eval(), ours.eval()


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits without gradients."""
    with torch.no_grad():
        return model(ids).logits


# ---------------------------------------------------------------- LoRA on the real model


def test_zero_init_B_output_equals_base_at_step_0(base, ids):
    ours = L.inject_lora(L.shared_copy(base), r=8, lora_alpha=16, target_modules="all-linear")
    assert all(torch.all(layer.lora_B == 0) for layer in L.lora_layers(ours))
    assert torch.equal(logits(ours, ids), logits(base, ids))


@pytest.mark.parametrize("targets", [QV, "all-linear"], ids=["q_v", "all_linear"])
def test_outputs_equal_peft_with_same_adapter_weights(base, ids, targets):
    """Achieved max abs logit difference: 0.0 (the same fp32 operations in the same order)."""
    theirs, ours = peft_and_ours(base, targets)
    expected, got = logits(theirs, ids), logits(ours, ids)
    assert not torch.equal(expected, logits(base, ids))  # the adapters do change the output
    difference = (got - expected).abs().max().item()
    assert difference <= 1e-6, f"max abs diff {difference}"


def test_dora_outputs_equal_peft_dora(base, ids):
    """DoRA on q/v with random B and magnitudes. Achieved max abs logit difference: 0.0."""
    theirs, ours = peft_and_ours(base, QV, use_dora=True)
    difference = (logits(ours, ids) - logits(theirs, ids)).abs().max().item()
    assert difference <= 1e-5, f"max abs diff {difference}"


def test_merged_weights_equal_peft_merged_weights(base):
    own = ("q_proj.weight", "v_proj.weight")  # private copies of the weights that get merged into
    theirs = get_peft_model(L.shared_copy(base, own), LoraConfig(r=8, lora_alpha=16, target_modules=QV))
    L.randomize_adapters(theirs)
    ours = L.inject_lora(L.shared_copy(base, own), r=8, lora_alpha=16, target_modules=QV)
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
def test_trainable_parameter_counts_equal_peft(base, targets, expected):
    theirs = get_peft_model(L.shared_copy(base), LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    ours = L.inject_lora(L.shared_copy(base), r=8, lora_alpha=16, target_modules=targets)
    assert L.count_parameters(ours) == theirs.get_nb_trainable_parameters()
    assert L.count_parameters(ours)[0] == expected
    if targets == "all-linear":  # 10,176 * r per layer: (576+576) + (576+192)*2 + (576+576) + 3*(576+1536)
        assert expected == 10_176 * 8 * 30


def test_all_linear_wraps_every_linear_except_lm_head(base):
    ours = L.inject_lora(L.shared_copy(base), r=8, lora_alpha=16, target_modules="all-linear")
    wrapped = {name.split(".")[-1] for name, m in ours.named_modules() if isinstance(m, L.LoRALinear)}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert isinstance(ours.lm_head, nn.Linear) and len(L.lora_layers(ours)) == 7 * 30


def test_adapter_state_round_trips_through_peft(base, ids):
    theirs, ours = peft_and_ours(base, QV)
    fresh_theirs = get_peft_model(L.shared_copy(base), LoraConfig(r=8, lora_alpha=16, target_modules=QV)).eval()
    set_peft_model_state_dict(fresh_theirs, L.to_peft_state(ours))
    assert torch.equal(logits(fresh_theirs, ids), logits(ours, ids))
    fresh_ours = L.inject_lora(L.shared_copy(base), r=8, lora_alpha=16, target_modules=QV).eval()
    L.load_peft_state(fresh_ours, get_peft_model_state_dict(theirs))  # the keys peft saves to disk
    assert torch.equal(logits(fresh_ours, ids), logits(theirs, ids))


# ---------------------------------------------------------------- the layer on its own


def make_layer(**kwargs) -> L.LoRALinear:
    """A LoRALinear over a random 32 -> 24 Linear with bias, and a non-zero B."""
    torch.manual_seed(0)
    layer = L.LoRALinear(nn.Linear(32, 24), **{"r": 4, "lora_alpha": 8, **kwargs})
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    return layer


def test_lora_A_kaiming_uniform_and_B_zero_at_init():
    layer = L.LoRALinear(nn.Linear(576, 192), r=8, lora_alpha=16)
    bound = 1 / math.sqrt(576)  # kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert layer.lora_A.shape == (8, 576) and layer.lora_B.shape == (192, 8)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.95 * bound
    assert torch.all(layer.lora_B == 0)


def test_forward_is_base_plus_scaled_BA():
    layer = make_layer()
    x = torch.randn(3, 32)
    expected = layer.base_layer(x) + x @ layer.lora_A.T @ layer.lora_B.T * (8 / 4)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)


def test_rslora_scaling_is_alpha_over_sqrt_r(tiny_llama):
    assert L.LoRALinear(nn.Linear(8, 8), r=16, lora_alpha=16).scaling == 1.0
    assert L.LoRALinear(nn.Linear(8, 8), r=16, lora_alpha=16, use_rslora=True).scaling == 4.0
    theirs = get_peft_model(tiny_llama(), LoraConfig(r=16, lora_alpha=16, use_rslora=True, target_modules=QV))
    ours = L.inject_lora(tiny_llama(), r=16, lora_alpha=16, target_modules=QV, use_rslora=True)
    peft_scaling = theirs.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"]
    assert ours.model.layers[0].self_attn.q_proj.scaling == peft_scaling == 4.0


def test_dropout_only_on_the_adapter_path():
    layer = make_layer(lora_dropout=0.5).train()
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
    layer = L.LoRALinear(nn.Linear(32, 24), r=4, lora_alpha=8, use_dora=True)
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


def test_dora_with_dropout_matches_peft_in_training_mode(tiny_llama):
    theirs = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=QV, use_dora=True,
                                                     lora_dropout=0.3))  # fmt: skip
    L.randomize_adapters(theirs)
    ours = L.inject_lora(tiny_llama(), r=4, lora_alpha=8, target_modules=QV, use_dora=True, lora_dropout=0.3)
    L.copy_from_peft(ours, theirs)
    theirs.train(), ours.train()
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(3)
    expected = theirs(ids).logits
    torch.manual_seed(3)
    torch.testing.assert_close(ours(ids).logits, expected, rtol=0, atol=1e-5)


def test_inject_lora_freezes_everything_but_the_adapters(tiny_llama):
    model = L.inject_lora(tiny_llama(), r=4, lora_alpha=8, target_modules="all-linear", use_dora=True)
    trainable = {name.rsplit(".", 1)[-1] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "lora_magnitude_vector"}


def test_unknown_target_modules_raise_a_clear_error(tiny_llama):
    with pytest.raises(LabkitError, match="No linear layer matches"):
        L.inject_lora(tiny_llama(), target_modules=["query_key_value"])


# ---------------------------------------------------------------- QLoRA from scratch


def test_qlora_from_scratch_equals_peft_on_bnb_linear4bit(tiny_llama):
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
    L.randomize_adapters(theirs)
    ours = L.inject_lora(Q.quantize_model(tiny_llama(), blocksize=64, double_quant=True), r=4, lora_alpha=8,
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
    layer = L.LoRALinear(Q.NF4Linear(nn.Linear(64, 64)), r=4, lora_alpha=8)
    with pytest.raises(LabkitError, match="4-bit"):
        layer.merge()


# ---------------------------------------------------------------- copies and random adapters


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_shared_copy_shares_frozen_weights(tiny_llama):
    model = tiny_llama()
    copied = L.shared_copy(model)
    for (name, original), (_, shared) in zip(model.named_parameters(), copied.named_parameters()):
        assert shared.data_ptr() == original.data_ptr(), name
    assert copied.lm_head is not model.lm_head  # a new module tree over the same tensors


def test_shared_copy_keeps_tied_weights_tied(tiny_llama):
    model = tiny_llama(tie_word_embeddings=True)
    copied = L.shared_copy(model)
    assert copied.lm_head.weight is copied.model.embed_tokens.weight
    assert copied.lm_head.weight.data_ptr() == model.lm_head.weight.data_ptr()


def test_shared_copy_owns_the_weights_it_is_told_to(tiny_llama):
    model, own = tiny_llama(), ("q_proj.weight",)
    copied = L.shared_copy(model, own=own)
    for (name, original), (_, param) in zip(model.named_parameters(), copied.named_parameters()):
        assert (param.data_ptr() == original.data_ptr()) == (not name.endswith(own)), name
    before = weights(model)
    adapted = L.randomize_adapters(L.inject_lora(copied, r=2, lora_alpha=4, target_modules=["q_proj"]), std=0.1)
    L.merge_lora(adapted)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_injecting_into_a_shared_copy_leaves_the_original_trainable(tiny_llama):
    model = tiny_llama()
    L.inject_lora(L.shared_copy(model), r=2, lora_alpha=4, target_modules="all-linear")
    assert all(p.requires_grad for p in model.parameters())
    assert not L.lora_layers(model)


def test_randomize_adapters_sets_nonzero_B_from_the_seed(tiny_llama):
    adapted = L.inject_lora(tiny_llama(), r=2, lora_alpha=4, target_modules=["q_proj"], use_dora=True)
    magnitudes = [layer.lora_magnitude_vector.detach().clone() for layer in L.lora_layers(adapted)]
    L.randomize_adapters(adapted, seed=7, std=0.05)
    first = weights(adapted)
    assert all(layer.lora_B.abs().max() > 0 for layer in L.lora_layers(adapted))
    assert all(not torch.equal(m, layer.lora_magnitude_vector) for m, layer in zip(magnitudes, L.lora_layers(adapted)))
    again = L.inject_lora(tiny_llama(), r=2, lora_alpha=4, target_modules=["q_proj"], use_dora=True)
    L.randomize_adapters(again, seed=7, std=0.05)
    assert all(torch.equal(first[n], p) for n, p in again.named_parameters() if "lora_" in n)
