import json
import math

import pytest
import torch
from peft import PeftModel

from labkit.data import read_jsonl
from labkit.paths import data_dir
from labkit.sft import (
    IGNORE,
    SFTConfig,
    TrainingDiverged,
    add_lora,
    assistant_loss,
    collate,
    latest_checkpoint,
    length_grouped_batches,
    lr_at,
    save_checkpoint,
    tokenize_chat,
    train_sft,
)

TINY = SFTConfig(steps=4, batch_size=2, lr=1e-3, r=4, lora_alpha=8, eval_every=2, seed=0)


@pytest.fixture(scope="module")
def examples():
    return read_jsonl(data_dir() / "train.jsonl")[:16]


@pytest.fixture()
def fresh_model(smollm2):
    """A deep copy of the shared base model, so LoRA wrapping never leaks between tests."""
    import copy

    model, tokenizer = smollm2
    return copy.deepcopy(model), tokenizer


def test_labels_cover_exactly_the_assistant_reply_and_end_of_turn(smollm2, examples):
    _, tokenizer = smollm2
    row = tokenize_chat(tokenizer, examples[0]["messages"])
    labelled = [t for t, l in zip(row["input_ids"], row["labels"]) if l != IGNORE]
    assert tokenizer.decode(labelled) == examples[0]["messages"][-1]["content"] + "<|im_end|>\n"


def test_labels_match_trl_completion_mask(smollm2, examples):
    from trl.trainer.sft_trainer import SFTConfig as TRLConfig, SFTTrainer
    from datasets import Dataset

    model, tokenizer = smollm2
    data = Dataset.from_list([{"prompt": ex["messages"][:-1], "completion": ex["messages"][-1:]} for ex in examples[:6]])
    args = TRLConfig(output_dir="/tmp/labkit-trl-mask", report_to="none", bf16=False, use_cpu=True, max_length=512)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(6)])
    ours = collate([tokenize_chat(tokenizer, ex["messages"]) for ex in examples[:6]], tokenizer.pad_token_id)
    width = ours["input_ids"].shape[1]
    assert torch.equal(batch["input_ids"][:, :width], ours["input_ids"])
    assert torch.equal(batch["labels"][:, :width], ours["labels"])


def test_loss_equals_trl_assistant_only_loss_on_one_batch(fresh_model, examples):
    from datasets import Dataset
    from trl.trainer.sft_trainer import SFTConfig as TRLConfig, SFTTrainer

    model, tokenizer = fresh_model
    model = add_lora(model, TINY)
    with torch.no_grad():  # a non-zero adapter, so the comparison exercises the LoRA path too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    data = Dataset.from_list([{"prompt": ex["messages"][:-1], "completion": ex["messages"][-1:]} for ex in examples[:4]])
    args = TRLConfig(output_dir="/tmp/labkit-trl-loss", report_to="none", bf16=False, use_cpu=True, max_length=512)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    ours = collate([tokenize_chat(tokenizer, ex["messages"]) for ex in examples[:4]], tokenizer.pad_token_id)
    with torch.no_grad():
        trl_loss = trainer.compute_loss(model, batch).item()
        total, n = assistant_loss(model, ours)
    assert abs(total.item() / n - trl_loss) < 1e-4, (total.item() / n, trl_loss)


def test_loss_skips_unlabelled_positions_and_equals_full_logits_loss(fresh_model, examples):
    model, tokenizer = fresh_model
    batch = collate([tokenize_chat(tokenizer, ex["messages"]) for ex in examples[:4]], tokenizer.pad_token_id)
    with torch.no_grad():
        total, n = assistant_loss(model, batch)
        reference = model(**batch).loss  # transformers' loss on full logits, mean over labelled tokens
    assert abs(total.item() / n - reference.item()) < 1e-5


def test_length_grouped_batches_are_deterministic_and_cover_every_example():
    lengths = [5, 50, 7, 48, 6, 49, 8, 47]
    batches = length_grouped_batches(lengths, 2, 4, seed=3)
    assert batches == length_grouped_batches(lengths, 2, 4, seed=3)
    assert sorted(i for b in batches for i in b) == list(range(8))


def test_schedule_warms_up_then_decays_to_zero():
    cfg = SFTConfig(steps=100, lr=1e-3, warmup_ratio=0.05)
    assert lr_at(0, cfg.lr, cfg.steps, cfg.warmup_ratio) == pytest.approx(2e-4)
    assert lr_at(4, cfg.lr, cfg.steps, cfg.warmup_ratio) == pytest.approx(1e-3)
    assert lr_at(99, cfg.lr, cfg.steps, cfg.warmup_ratio) < 1e-6 + 1e-3 * 0.01


def test_training_lowers_validation_loss_and_restores_the_best(fresh_model, examples):
    model, tokenizer = fresh_model
    result = train_sft(model, tokenizer, examples[:8], examples[8:12], TINY, plot=False, progress=False)
    evals = [h["val_loss"] for h in result.history if "val_loss" in h]
    assert evals[-1] < evals[0] or result.best_val_loss < evals[0]
    assert result.best_val_loss == min(evals)


def test_same_seed_gives_the_same_losses(smollm2, examples):
    import copy

    base, tokenizer = smollm2
    runs = [train_sft(copy.deepcopy(base), tokenizer, examples[:8], None, TINY, plot=False, progress=False) for _ in range(2)]
    assert [h["loss"] for h in runs[0].history] == [h["loss"] for h in runs[1].history]


def test_resume_after_interruption_ends_with_the_same_loss(smollm2, examples, tmp_path):
    import copy

    base, tokenizer = smollm2
    cfg = SFTConfig(**{**TINY.__dict__, "checkpoint_every": 1})
    full = train_sft(copy.deepcopy(base), tokenizer, examples[:8], None, cfg, plot=False, progress=False)
    train_sft(copy.deepcopy(base), tokenizer, examples[:8], None, cfg, out_dir=tmp_path, plot=False, progress=False, stop_after=2)
    resumed = train_sft(copy.deepcopy(base), tokenizer, examples[:8], None, cfg, out_dir=tmp_path, resume=True, plot=False, progress=False)
    assert len(resumed.history) == cfg.steps
    assert abs(resumed.history[-1]["loss"] - full.history[-1]["loss"]) < 1e-5


def test_checkpoint_interrupted_mid_write_leaves_the_previous_one_usable(fresh_model, tmp_path):
    model, _ = fresh_model
    model = add_lora(model, TINY)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    first = save_checkpoint(tmp_path, 1, model, optimizer, [], {})
    (tmp_path / ".tmp-crashed").mkdir()  # what a crash during the next write leaves behind
    (tmp_path / ".tmp-crashed" / "state.pt").write_bytes(b"half a file")
    assert latest_checkpoint(tmp_path) == first
    assert torch.load(first / "state.pt", weights_only=False)["step"] == 1


def test_absurd_learning_rate_stops_with_a_clear_message(fresh_model, examples, tmp_path):
    model, tokenizer = fresh_model
    cfg = SFTConfig(**{**TINY.__dict__, "lr": 1e30, "max_grad_norm": 1e30, "steps": 4, "checkpoint_every": 1})
    with pytest.raises(TrainingDiverged, match=r"at step \d+: training diverged.*learning rate"):
        train_sft(model, tokenizer, examples[:8], None, cfg, out_dir=tmp_path, plot=False, progress=False)
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None
    state = torch.load(ckpt / "state.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["adapter"].values())


def test_saved_adapter_loads_with_plain_peft_and_gives_the_same_outputs(smollm2, examples, tmp_path):
    import copy

    base, tokenizer = smollm2
    result = train_sft(copy.deepcopy(base), tokenizer, examples[:8], None, TINY, plot=False, progress=False)
    result.model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    batch = collate([tokenize_chat(tokenizer, examples[0]["messages"])], tokenizer.pad_token_id)
    with torch.no_grad():
        a = result.model(input_ids=batch["input_ids"]).logits
        b = reloaded(input_ids=batch["input_ids"]).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_cached_run_is_reused_without_retraining(smollm2, examples, tmp_path, monkeypatch):
    import copy

    from labkit import sft

    monkeypatch.setenv("LABKIT_HOME", str(tmp_path))
    base, tokenizer = smollm2
    cfg = SFTConfig(**{**TINY.__dict__, "steps": 2})
    first, folder = sft.cached_sft(copy.deepcopy(base), tokenizer, "smollm2", examples[:4], None, cfg, plot=False, progress=False)
    monkeypatch.setattr(sft, "train_sft", lambda *a, **k: pytest.fail("trained again on a cache hit"))
    second, again = sft.cached_sft(copy.deepcopy(base), tokenizer, "smollm2", examples[:4], None, cfg)
    assert again == folder and second.history == first.history
    assert sft.run_key("smollm2", examples[:4], cfg) != sft.run_key("smollm2", examples[:5], cfg)


def test_cosine_schedule_matches_transformers():
    from transformers import get_cosine_schedule_with_warmup

    steps, warmup_ratio, lr = 100, 0.05, 1e-3
    warmup = round(warmup_ratio * steps)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    theirs = []
    for _ in range(steps + 1):
        theirs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    # after warmup: the same cosine step for step; during warmup labkit is one step ahead (its first step is not at lr 0)
    for step in range(steps):
        expected = theirs[step] if step >= warmup else theirs[step + 1]
        assert lr_at(step, lr, steps, warmup_ratio) == pytest.approx(expected, rel=1e-9, abs=1e-15), step


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_recommended_config_trains_on_the_same_tokens_as_the_course_run(tokenizer, profile):
    from labkit.runtime import PROFILES
    from labkit.sft import course_config, recommended_config, step_tokens

    train = read_jsonl(data_dir() / "train.jsonl")
    main, rec = course_config(PROFILES[profile]), recommended_config(PROFILES[profile])
    assert rec.batch_size * rec.grad_accum >= 32 and (rec.lr, rec.weight_decay, rec.lora_dropout) == (2e-4, 0.01, 0.05)
    assert 0.03 <= rec.warmup_ratio <= 0.05
    assert sum(step_tokens(tokenizer, train, rec)) == sum(step_tokens(tokenizer, train, main))
