import copy

import pytest
import torch

from labkit.data import read_jsonl
from labkit.full_ft import FullFTConfig, cached_full_ft, course_full_config, full_ft_key, train_full
from labkit.paths import data_dir
from labkit.runtime import PROFILES
from labkit import LabkitError
from labkit.sft import SFT, SFTConfig, course_config, train_loop, train_sft

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = FullFTConfig(steps=3, batch_size=2, lr=1e-3, eval_every=3, seed=0)


@pytest.fixture(scope="module")
def examples():
    return read_jsonl(data_dir() / "train.jsonl")[:12]


@pytest.fixture()
def model(tiny_llama):
    """A small random Llama over SmolLM2's vocabulary, so the real tokenizer and chat template apply."""
    return tiny_llama(vocab_size=49152)


def test_full_ft_changes_every_weight_and_keeps_the_best_validation_loss(model, tokenizer, examples):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_full(model, tokenizer, examples[:8], examples[8:], TINY)
    moved = [k for k, v in result.model.state_dict().items() if not torch.equal(v, before[k])]
    assert set(moved) == set(before)  # every weight, not an adapter
    evals = [h["val_loss"] for h in result.history if "val_loss" in h]
    assert result.best_val_loss == min(evals) and result.history[-1]["loss"] < result.history[0]["loss"]
    assert not any(p.requires_grad for p in result.model.parameters())


def test_full_ft_first_step_sees_the_same_batch_as_lora_sft(model, tokenizer, examples):
    lora = train_sft(copy.deepcopy(model), tokenizer, examples[:8], None,
                     SFTConfig(steps=1, batch_size=2, r=4, lora_alpha=8, seed=0), plot=False, progress=False)
    full = train_full(copy.deepcopy(model), tokenizer, examples[:8], None, FullFTConfig(steps=1, batch_size=2, seed=0))
    # LoRA starts exactly at the base (B = 0), so on the same batch the first losses are equal
    assert full.history[0]["loss"] == pytest.approx(lora.history[0]["loss"], abs=1e-6)


def test_cached_full_ft_is_reused_without_retraining(model, tokenizer, examples, tmp_path, monkeypatch):
    from labkit import full_ft

    monkeypatch.setenv("LABKIT_HOME", str(tmp_path))
    config = FullFTConfig(steps=2, batch_size=2, lr=1e-3, eval_every=1, seed=0)
    first, folder = cached_full_ft(copy.deepcopy(model), tokenizer, "tiny", examples[:4], examples[4:6], config)
    monkeypatch.setattr(full_ft, "train_full", lambda *a, **k: pytest.fail("trained again on a cache hit"))
    second, again = cached_full_ft(copy.deepcopy(model), tokenizer, "tiny", examples[:4], examples[4:6], config)
    assert again == folder and second.history == first.history and second.best_step == first.best_step
    for (name, a), (_, b) in zip(first.model.state_dict().items(), second.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert full_ft_key("tiny", examples[:4], examples[4:6], config) != full_ft_key("tiny", examples[:5], examples[4:6], config)


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_course_full_config_uses_the_lora_runs_batches_and_a_lower_lr(profile):
    budget, lora = PROFILES[profile], course_config(PROFILES[profile])
    full = course_full_config(budget)
    assert (full.steps, full.batch_size, full.grad_accum, full.seed) == (lora.steps, lora.batch_size, lora.grad_accum, lora.seed)
    assert full.lr < lora.lr / 10


def test_full_ft_is_the_sft_loop_with_every_weight_trainable(model, tokenizer, examples):
    by_loop = train_loop(copy.deepcopy(model), tokenizer, examples[:8], examples[8:], TINY, SFT, plot=False,
                         progress=False)
    by_full_ft = train_full(copy.deepcopy(model), tokenizer, examples[:8], examples[8:], TINY, progress=False)
    assert by_loop.history == by_full_ft.history and not hasattr(by_loop.model, "peft_config")
    assert all(torch.equal(a, b) for a, b in zip(by_loop.model.state_dict().values(),
                                                 by_full_ft.model.state_dict().values()))


def test_full_ft_refuses_checkpoints_that_would_hold_only_an_adapter(model, tokenizer, examples, tmp_path):
    with pytest.raises(LabkitError, match="out_dir"):
        train_loop(model, tokenizer, examples[:8], None, TINY, SFT, out_dir=tmp_path, plot=False, progress=False)
