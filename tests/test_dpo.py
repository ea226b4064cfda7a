"""DPO from scratch, specified against TRL's DPOTrainer on identical batches (a tiny random Llama keeps it fast)."""

import math

import pytest
import torch

from labkit.checkpoint import CheckpointError
from labkit.dpo import (
    METRICS,
    DPOConfig,
    cached_dpo,
    collate_pairs,
    dpo_loss,
    greets_by_name,
    pair_logps,
    preference_accuracy,
    preference_loss,
    reference_logps,
    sequence_logps,
    tokenize_pair,
    train_dpo,
)
from labkit.sft import IGNORE, add_lora

from conftest import perturb_adapter

TOL = 1e-5
BETA = 0.1


@pytest.fixture(scope="module")
def trl(vocab_llama, tokenizer, pairs):
    """TRL's DPOTrainer on a tiny Llama with a LoRA adapter (reference = adapter disabled), and its collated batch."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig as TRLDPOConfig, DPOTrainer

    data = Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])
    args = TRLDPOConfig(output_dir="/tmp/labkit-trl-dpo", report_to="none", bf16=False, use_cpu=True,
                        gradient_checkpointing=False, beta=BETA, max_length=512)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=vocab_llama(), args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=lora)
    perturb_adapter(trainer.model)
    trainer.model.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(pairs))])
    return trainer, batch


def trl_step(trainer, batch, loss_type: str = "sigmoid"):
    """TRL's loss, logged metrics and adapter gradients for one batch."""
    trainer.loss_types, trainer.loss_weights = [loss_type], [1.0]
    trainer._metrics["train"].clear()
    model = trainer.model
    model.zero_grad()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return loss.item(), {k: v[-1] for k, v in trainer._metrics["train"].items()}, grads


def our_step(model, batch, loss_type: str = "sigmoid"):
    """Our loss (mean over pairs, as TRL reports it), metrics and adapter gradients for one batch."""
    model.zero_grad()
    summed, sums = dpo_loss(model, batch, beta=BETA, loss_type=loss_type)
    n = batch["input_ids"].shape[0] // 2
    (summed / n).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return summed.item() / n, {k: v / n for k, v in sums.items()}, grads


@pytest.fixture(scope="module")
def ours_batch(tokenizer, pairs):
    return collate_pairs([tokenize_pair(tokenizer, p) for p in pairs], tokenizer.pad_token_id)


# ---------------------------------------------------------------- equal to TRL


def test_pairs_tokenize_to_trls_ids_and_completion_mask(trl, ours_batch):
    _, batch = trl
    assert torch.equal(ours_batch["input_ids"], batch["input_ids"])
    assert torch.equal(ours_batch["attention_mask"], batch["attention_mask"])
    assert torch.equal((ours_batch["labels"] != IGNORE).long(), batch["completion_mask"])


def test_loss_equals_trl_dpo_trainer_on_the_same_batch(trl, ours_batch):
    trainer, batch = trl
    theirs, _, _ = trl_step(trainer, batch)
    ours, _, _ = our_step(trainer.model, ours_batch)
    assert abs(ours - theirs) < TOL, (ours, theirs)


def test_rewards_and_logps_equal_trls_logged_metrics(trl, ours_batch):
    trainer, batch = trl
    _, theirs, _ = trl_step(trainer, batch)
    _, ours, _ = our_step(trainer.model, ours_batch)
    assert abs(theirs["rewards/margins"]) > 1e-3  # the adapter really moved the policy away from the reference
    for key in METRICS:
        tol = TOL * max(1.0, abs(theirs[key]))  # logps are sums of ~40 log-probs (~ -400): compare them relatively
        assert abs(ours[key] - theirs[key]) < tol, (key, ours[key], theirs[key])


def test_gradients_equal_trls(trl, ours_batch):
    trainer, batch = trl
    _, _, theirs = trl_step(trainer, batch)
    _, _, ours = our_step(trainer.model, ours_batch)
    assert ours.keys() == theirs.keys() and len(ours) > 0
    assert max(g.abs().max().item() for g in theirs.values()) > 1e-3  # non-trivial gradients
    for name in theirs:
        assert (ours[name] - theirs[name]).abs().max().item() < TOL, name


@pytest.mark.parametrize("loss_type", ["ipo", "hinge"])
def test_ipo_and_hinge_losses_and_gradients_equal_trls(trl, ours_batch, loss_type):
    trainer, batch = trl
    theirs, _, their_grads = trl_step(trainer, batch, loss_type)
    ours, _, our_grads = our_step(trainer.model, ours_batch, loss_type)
    # IPO's loss is ~25 here ((margin - 1/(2 beta))^2 with beta = 0.1), where fp32 resolves ~3e-6: compare relatively
    assert abs(ours - theirs) < TOL * max(1.0, abs(theirs)), (loss_type, ours, theirs)
    assert all((our_grads[n] - their_grads[n]).abs().max().item() < TOL for n in their_grads)


# ---------------------------------------------------------------- the loss itself


def test_loss_is_ln2_at_step_0_with_a_fresh_adapter(vocab_llama, tokenizer, ours_batch):
    model = add_lora(vocab_llama(), DPOConfig(r=4, lora_alpha=8))  # B = 0: the policy is the reference
    loss, sums = dpo_loss(model, ours_batch, beta=BETA)
    n = ours_batch["input_ids"].shape[0] // 2
    assert abs(loss.item() / n - math.log(2)) < 1e-6
    assert sums["rewards/margins"] == 0.0 and sums["rewards/accuracies"] == 0.0  # a tie is not counted as a win


def test_sequence_logp_is_the_sum_over_reply_tokens_only(vocab_llama, tokenizer, ours_batch):
    model = vocab_llama()
    with torch.no_grad():
        ours = sequence_logps(model, ours_batch)
        full = torch.log_softmax(model(input_ids=ours_batch["input_ids"],
                                       attention_mask=ours_batch["attention_mask"]).logits[:, :-1], dim=-1)
    targets = ours_batch["labels"][:, 1:]
    keep = targets != IGNORE
    expected = (full.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * keep).sum(dim=1)
    assert torch.allclose(ours, expected, atol=1e-4, rtol=1e-6)


def test_reference_is_the_same_model_with_the_adapter_disabled(vocab_llama, tokenizer, ours_batch):
    base = vocab_llama()
    with torch.no_grad():
        before = sequence_logps(base, ours_batch)
    n_params = sum(p.numel() for p in base.parameters())
    model = add_lora(base, DPOConfig(r=4, lora_alpha=8))
    perturb_adapter(model)
    with torch.no_grad():
        assert not torch.allclose(sequence_logps(model, ours_batch), before)
        assert torch.equal(reference_logps(model, ours_batch), before)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert sum(p.numel() for p in model.parameters()) == n_params + lora  # one set of base weights, no copy


def test_dpo_loss_is_minus_log_sigmoid_of_beta_times_the_margin():
    chosen, rejected = torch.tensor([3.0, -1.0]), torch.tensor([1.0, 1.0])
    expected = -torch.nn.functional.logsigmoid(0.5 * (chosen - rejected))
    assert torch.allclose(preference_loss(chosen, rejected, beta=0.5), expected)
    assert torch.allclose(preference_loss(chosen, rejected, 0.5, "hinge"), torch.relu(1 - 0.5 * (chosen - rejected)))


def test_ipo_pushes_the_per_token_margin_towards_one_over_two_beta():
    n = torch.tensor([4.0])
    at_target = preference_loss(torch.tensor([4 * 5.0]), torch.tensor([0.0]), 0.1, "ipo", n, n)  # 1/(2*0.1) = 5
    assert at_target.item() == pytest.approx(0.0)
    beyond = preference_loss(torch.tensor([4 * 9.0]), torch.tensor([0.0]), 0.1, "ipo", n, n)
    assert beyond.item() == pytest.approx(16.0)  # unlike DPO, overshooting the target is penalised


# ---------------------------------------------------------------- training and measuring


def test_dpo_training_with_the_sft_loop_raises_the_reward_margin(vocab_llama, tokenizer, pairs):
    model = vocab_llama()
    config = DPOConfig(steps=6, batch_size=2, lr=5e-3, r=4, lora_alpha=8, warmup_ratio=0.0)
    result = train_dpo(model, tokenizer, pairs, config=config, plot=False, progress=False)
    history = result.history
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert set(METRICS) <= history[-1].keys()
    assert history[-1]["rewards/margins"] > 0 and history[-1]["loss"] < math.log(2)


def test_a_cached_dpo_run_puts_the_same_trained_adapter_into_a_fresh_policy(vocab_llama, tokenizer, pairs,
                                                                            monkeypatch, tmp_path):
    monkeypatch.setenv("LABKIT_HOME", str(tmp_path))
    config = DPOConfig(steps=2, batch_size=2, lr=1e-2, beta=0.5, r=4, lora_alpha=8)
    first, folder = cached_dpo(add_lora(vocab_llama(), config), tokenizer, "tiny", pairs, config, plot=False,
                               progress=False)
    policy = add_lora(vocab_llama(), config)
    second, again = cached_dpo(policy, tokenizer, "tiny", pairs, config)
    assert again == folder and second.model is policy and second.history == first.history
    ours, theirs = dict(first.model.named_parameters()), dict(policy.named_parameters())
    assert all(torch.equal(p, ours[n]) for n, p in theirs.items() if "lora_" in n)
    assert any(p.any() for n, p in theirs.items() if "lora_B" in n)
    assert all(p.requires_grad for n, p in theirs.items() if "lora_" in n)  # still trainable, unlike a loaded peft adapter


def test_a_cached_dpo_run_refuses_a_policy_that_has_trained_already(vocab_llama, tokenizer, pairs, monkeypatch,
                                                                    tmp_path):
    monkeypatch.setenv("LABKIT_HOME", str(tmp_path))
    config = DPOConfig(steps=1, batch_size=2, r=4, lora_alpha=8)
    trained, _ = cached_dpo(add_lora(vocab_llama(), config), tokenizer, "tiny", pairs, config, plot=False,
                            progress=False)
    with pytest.raises(CheckpointError, match="already trained.*Fix: pass the policy as labkit.sft.add_lora"):
        cached_dpo(trained.model, tokenizer, "tiny", pairs, config)


def test_preference_accuracy_is_one_half_when_policy_equals_reference(vocab_llama, tokenizer, pairs):
    model = add_lora(vocab_llama(), DPOConfig(r=4, lora_alpha=8))
    policy = pair_logps(model, tokenizer, pairs, batch_size=2)
    reference = pair_logps(model, tokenizer, pairs, batch_size=2, reference=True)
    assert preference_accuracy(policy, reference) == 0.5
    up = (policy[0] + 1.0, policy[1])  # chosen more likely than under the reference: every pair ranked right
    assert preference_accuracy(up, reference) == 1.0


@pytest.mark.parametrize("reply, expected", [
    ("Hello Maria, sorry about the trouble with your payment.", True),
    ("Dear maria, thanks for letting us know.", True),
    ("Good morning Maria! Your refund is on its way.", True),
    ("Hi there, sorry about the trouble. Maria, we will fix it.", False),  # named later, not in the greeting
    ("Hello, sorry about the trouble with your payment.", False),
    ("Maria thanks you for your patience.", False),  # the name without a greeting
    ("Hi Mariana, sorry about that.", False),  # a different name that merely starts the same
])
def test_greeting_by_name_means_a_greeting_that_names_the_customer(reply, expected):
    assert greets_by_name(reply, "Maria") is expected
