"""Merging, the 4-bit merge pitfall, adapter hot-swap, the model card and the Modelfile, on tiny random Llamas."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

from labkit import LabkitError
from labkit.deploy import (
    adapter_bytes,
    base_bytes,
    cached_adapter,
    check_modelfile,
    cost_per_million_tokens,
    load_adapters,
    merge_variants,
    merged_copy,
    model_card,
    modelfile,
    nf4_round_trip,
    select,
)
from labkit.sft import SFTResult

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = torch.tensor([[1, 5, 9, 17, 33, 64, 100, 2]])


def with_adapter(model, seed: int = 1, name: str = "default", scale: float = 0.05):
    """Wrap a model with a LoRA adapter whose B is random (a trained-looking update, not the zero init)."""
    torch.manual_seed(seed)  # A's init and B's values depend on the seed alone
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), adapter_name=name)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, scale)
    return peft_model.eval()


def test_a_merged_model_computes_what_the_adapter_computes(tiny_llama):
    model = with_adapter(tiny_llama())
    merged = merged_copy(model)
    assert (merged(IDS).logits - model(IDS).logits).abs().max() < 1e-5
    assert not any("lora_" in n for n, _ in merged.named_parameters())


def test_merged_copy_leaves_the_adapter_in_place(tiny_llama):
    model = with_adapter(tiny_llama())
    merged_copy(model)
    assert any("lora_" in n for n, _ in model.named_parameters())


def test_nf4_round_trip_keeps_shape_and_moves_weights(tiny_llama):
    weight = tiny_llama().model.layers[0].mlp.up_proj.weight.detach()
    back = nf4_round_trip(weight)
    assert back.shape == weight.shape and not torch.equal(back, weight)
    assert torch.equal(nf4_round_trip(back), back)  # already on the grid: quantizing again changes nothing


def test_requantizing_a_merge_loses_a_small_update(tiny_llama):
    kept = merge_variants(with_adapter(tiny_llama(), scale=0.002))["_update_kept"]
    assert kept["fp32 merge"] == 1.0
    assert abs(kept["NF4 base + adapter"] - 1.0) < 1e-4
    assert kept["NF4 merge, re-quantized"] < 0.8


def test_the_nf4_base_plus_adapter_variant_matches_an_adapter_on_a_quantized_base(tiny_llama):
    model = with_adapter(tiny_llama())
    variant = merge_variants(model)["NF4 base + adapter"]
    with torch.no_grad():
        for layer in [m for m in model.modules() if hasattr(m, "get_delta_weight") and hasattr(m, "base_layer")]:
            layer.base_layer.weight.copy_(nf4_round_trip(layer.base_layer.weight))
    assert (variant(IDS).logits - model(IDS).logits).abs().max() < 1e-4


def test_several_adapters_load_on_one_base_and_switch(tiny_llama, tmp_path):
    for seed, name in [(1, "a"), (2, "b")]:
        with_adapter(tiny_llama(), seed=seed).save_pretrained(tmp_path / name)
    model = load_adapters(tiny_llama(), {"a": tmp_path / "a", "b": tmp_path / "b"})
    expected_a = with_adapter(tiny_llama(), seed=1)(IDS).logits
    expected_b = with_adapter(tiny_llama(), seed=2)(IDS).logits
    assert torch.allclose(model(IDS).logits, expected_a, atol=1e-6)
    assert select(model, "b") >= 0.0  # the seconds it took; how fast is measured in 08, not asserted here
    assert torch.allclose(model(IDS).logits, expected_b, atol=1e-6)


def test_two_active_adapters_add_their_updates(tiny_llama, tmp_path):
    for seed, name in [(1, "a"), (2, "b")]:
        with_adapter(tiny_llama(), seed=seed).save_pretrained(tmp_path / name)
    model = load_adapters(tiny_llama(), {"a": tmp_path / "a", "b": tmp_path / "b"})
    select(model, ["a", "b"])
    stacked = with_adapter(merged_copy(with_adapter(tiny_llama(), seed=1)), seed=2)  # b trained on top of merged a
    assert torch.allclose(model(IDS).logits, stacked(IDS).logits, atol=1e-5)


def test_load_adapters_needs_at_least_one(tiny_llama):
    with pytest.raises(LabkitError, match="at least one"):
        load_adapters(tiny_llama(), {})


def test_adapter_memory_is_counted_apart_from_the_base(tiny_llama, tmp_path):
    with_adapter(tiny_llama(), seed=1).save_pretrained(tmp_path / "a")
    model = load_adapters(tiny_llama(), {"a": tmp_path / "a"})
    plain = tiny_llama()
    assert base_bytes(model) == sum(p.numel() * 4 for p in plain.parameters())
    assert adapter_bytes(model, "a") == sum(p.numel() * 4 for n, p in model.named_parameters() if "lora_" in n) > 0


def test_cached_adapter_trains_once(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_HOME", str(tmp_path))
    calls = []

    def train(model):
        calls.append(1)
        return SFTResult(with_adapter(model), history=[{"step": 1, "loss": 1.0}])

    first, folder = cached_adapter(tiny_llama(), "key", train)
    second, again = cached_adapter(tiny_llama(), "key", train)
    assert calls == [1] and folder == again
    assert torch.allclose(first(IDS).logits, second(IDS).logits, atol=1e-6)


def test_the_model_card_is_written_from_the_records(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"a": 1}\n{"a": 2}\n')
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "run.json").write_text(json.dumps({"best_val_loss": 0.123, "best_step": 40}))
    card = model_card("m", "base", adapter, [data], {"r": 16}, {"field_acc": (0.9, 0.85, 0.95)}, ["synthetic"],
                      {"weights": data}, {"torch": "2"})
    assert "`train.jsonl`: 2 examples" in card and "- r: `16`" in card and "0.1230 at step 40" in card
    assert "| field_acc | 0.900 | [0.850, 0.950] |" in card and "- synthetic" in card


def test_the_modelfile_written_parses(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    parsed = check_modelfile(modelfile("m.gguf", "Triage."), tmp_path)
    assert parsed["FROM"] == ["./m.gguf"] and parsed["SYSTEM"] == ['"""Triage."""']
    assert "temperature 0" in parsed["PARAMETER"]


@pytest.mark.parametrize("text, problem", [
    ("FROM ./m.gguf\nTEMPERATURE 0\n", "unknown instruction"),
    ("FROM ./m.gguf\nPARAMETER heat 1\n", "unknown parameter"),
    ('FROM ./m.gguf\nSYSTEM """never closed\n', "never closed"),
    ("PARAMETER temperature 0\n", "no FROM"),
    ("FROM ./missing.gguf\n", "does not exist"),
])
def test_a_broken_modelfile_is_refused(tmp_path, text, problem):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(LabkitError, match=problem):
        check_modelfile(text, tmp_path)


def test_cost_per_million_tokens_is_price_over_throughput():
    assert cost_per_million_tokens(1000, 3.6) == pytest.approx(1.0)
