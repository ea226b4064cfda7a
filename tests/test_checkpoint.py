"""Specifications of labkit.checkpoint: atomic checkpoints and cached adapters, checksummed and checked before loading."""

import json

import pytest
import torch

from labkit.checkpoint import (
    CHECKSUMS,
    CheckpointError,
    check_writable,
    load_adapter_weights,
    load_cached_adapter,
    load_checkpoint,
    load_verified_adapter,
    run_identity,
    save_adapter,
    save_checkpoint,
    verify_checksums,
)
from labkit.sft import SFTConfig, add_lora

pytestmark = pytest.mark.usefixtures("one_thread")

LORA = SFTConfig(r=4, lora_alpha=8)


@pytest.fixture()
def adapted(tiny_llama):
    """A tiny Llama with a LoRA adapter whose B matrices are non-zero, and its optimizer."""
    model = add_lora(tiny_llama(), LORA)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])


def test_checkpoint_is_written_with_checksums_that_verify(adapted, tmp_path):
    model, optimizer = adapted
    folder = save_checkpoint(tmp_path, 3, model, optimizer, [], {}, run_identity(model, "SFT"))
    assert (folder / CHECKSUMS).read_text().split()[1] == "state.pt"
    verify_checksums(folder, "unused")


def test_checkpoint_loads_back_for_the_same_run(adapted, tmp_path):
    model, optimizer = adapted
    save_checkpoint(tmp_path, 3, model, optimizer, [{"step": 3}], {}, run_identity(model, "SFT"))
    state = load_checkpoint(tmp_path, model, run_identity(model, "SFT"))
    assert state["step"] == 3 and state["run"]["r"] == 4 and state["run"]["objective"] == "SFT"


def test_no_checkpoint_yet_means_nothing_to_resume(adapted, tmp_path):
    model, _ = adapted
    assert load_checkpoint(tmp_path, model) is None


def test_run_identity_names_base_model_rank_targets_and_objective(adapted):
    model, _ = adapted
    run = run_identity(model, "DPO")
    assert run["base_model"] == "llama (2 layers, hidden 64, vocab 128)"
    assert run["r"] == 4 and "q_proj" in run["target_modules"] and run["objective"] == "DPO"


def test_adapter_weights_round_trip(adapted, tiny_llama):
    model, _ = adapted
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    other = add_lora(tiny_llama(), LORA)
    load_adapter_weights(other, weights)
    assert all(torch.equal(p, weights[n]) for n, p in other.named_parameters() if p.requires_grad)


def test_cached_adapter_round_trips_with_its_run_record(adapted, tiny_llama, tmp_path):
    model, _ = adapted
    folder = save_adapter(model, tmp_path / "run", {"best_step": 7})
    assert {p.name for p in folder.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors", "run.json", CHECKSUMS}
    loaded, run = load_cached_adapter(tiny_llama(), folder, {"r": 4, "target_modules": "all-linear"})
    assert run == {"best_step": 7}
    ids = torch.tensor([[1, 2, 3]])
    assert torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6)


def test_no_cached_adapter_means_a_cache_miss(tiny_llama, tmp_path):
    assert load_cached_adapter(tiny_llama(), tmp_path / "absent") is None


def test_writable_folder_passes_the_preflight_and_is_left_empty(tmp_path):
    check_writable(tmp_path / "new" / "run")
    assert list((tmp_path / "new" / "run").iterdir()) == []


def test_unwritable_folder_fails_the_preflight(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(CheckpointError, match="cannot write there"):
        check_writable(tmp_path / "a_file" / "run")


def test_an_adapter_saved_over_another_replaces_it_whole(adapted, tiny_llama, tmp_path):
    model, _ = adapted
    save_adapter(add_lora(tiny_llama(seed=1), LORA), tmp_path / "adapter", {"version": 1})
    save_adapter(model, tmp_path / "adapter", {"version": 2})
    assert json.loads((tmp_path / "adapter" / "run.json").read_text()) == {"version": 2}
    verify_checksums(tmp_path / "adapter", "unused", ("adapter_model.safetensors", "run.json"))
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary or old copy left beside it


def test_a_verified_adapter_loads_and_gives_the_same_outputs(adapted, tiny_llama, tmp_path):
    model, _ = adapted
    loaded = load_verified_adapter(tiny_llama(), save_adapter(model, tmp_path / "adapter", {}))
    ids = torch.tensor([[1, 2, 3]])
    assert torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6)


def test_a_missing_adapter_folder_is_named(tiny_llama, tmp_path):
    with pytest.raises(CheckpointError, match="absent: there is no adapter folder there. Fix: pass an adapter folder"):
        load_verified_adapter(tiny_llama(), tmp_path / "absent")


def test_a_checkpoint_records_the_settings_and_data_it_must_be_resumed_with(adapted):
    model, _ = adapted
    run = run_identity(model, "SFT", LORA, {"data": "4 examples, sha256 0123456789abcdef"})
    assert run["lr"] == LORA.lr and run["steps"] == LORA.steps and run["data"].startswith("4 examples")
    assert "checkpoint_every" not in run  # a resume may change how often it checkpoints
