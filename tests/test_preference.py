"""ORPO and KTO from scratch, specified against TRL's ORPOTrainer and KTOTrainer (a tiny random Llama keeps it fast)."""

import warnings
from types import SimpleNamespace

import pytest
import torch

from labkit.dpo import DPOConfig, collate_pairs, dpo_loss, reference_logps, sequence_logps, tokenize_pair
from labkit.preference import (
    KTOConfig,
    ORPOConfig,
    collate_kto,
    collate_orpo,
    count_forwards,
    kl_batch,
    kl_estimate,
    kto_loss,
    kto_losses,
    log1mexp,
    odds_ratio_loss,
    orpo_loss,
    ranking_accuracy,
    reply_tokens,
    tokenize_example,
    tokenize_orpo,
    train_preference,
    unpair,
)
from labkit import LabkitError
from labkit.sft import IGNORE, add_lora, assistant_loss, collate, tokenize_chat

from conftest import perturb_adapter

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5
BETA = 0.1


# ---------------------------------------------------------------- ORPO, equal to TRL


def trl_orpo():
    """TRL's ORPOTrainer class (in trl.experimental, which warns on import that its API may change)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.orpo import ORPOTrainer
    return ORPOTrainer


def trl_odds_ratio(chosen: torch.Tensor, rejected: torch.Tensor, beta: float = BETA):
    """TRL's ORPOTrainer.odds_ratio_loss, called on plain tensors (the method reads only beta and the device)."""
    ORPOTrainer = trl_orpo()

    trainer = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device=chosen.device))
    return ORPOTrainer.odds_ratio_loss(trainer, chosen, rejected)


def test_orpo_loss_matches_trl_odds_ratio_loss():
    g = torch.Generator().manual_seed(0)
    chosen = -torch.rand(64, generator=g) * 3 - 1e-4  # per-token mean log-probs: negative, some near 0
    rejected = -torch.rand(64, generator=g) * 3 - 1e-4
    nll = torch.tensor(1.7)
    losses, _, _, ratio, odds = trl_odds_ratio(chosen, rejected)
    ours = odds_ratio_loss(chosen, rejected, BETA)
    assert (ours + losses).abs().max().item() < TOL  # TRL returns beta * log sigmoid, and subtracts it
    assert abs((nll + ours.mean()).item() - (nll - losses.mean()).item()) < TOL  # the full ORPO loss, TRL's way


def test_orpo_mean_reply_logps_match_trls_get_batch_logps(vocab_llama, tokenizer, pairs):
    from labkit.dpo import sequence_logps

    ORPOTrainer = trl_orpo()
    batch = collate_pairs([tokenize_pair(tokenizer, p) for p in pairs], tokenizer.pad_token_id)
    model = vocab_llama()
    with torch.no_grad():
        ours = sequence_logps(model, batch) / reply_tokens(batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    theirs = ORPOTrainer.get_batch_logps(logits, batch["labels"], average_log_prob=True)
    assert (ours - theirs).abs().max().item() < TOL


def test_log1mexp_is_stable_where_the_naive_formula_is_not():
    x = torch.tensor([-1e-9, -1e-4, -0.5, -0.7, -5.0, -50.0], dtype=torch.float64)
    assert torch.allclose(log1mexp(x.float()).double(), torch.log(-torch.expm1(x)), rtol=1e-5)
    assert torch.isinf(torch.log(1 - torch.exp(torch.tensor(-1e-9)))).item()  # naive: log(0)


def test_orpo_runs_one_forward_pass_and_no_reference(vocab_llama, tokenizer, pairs):
    batch = collate_pairs([tokenize_pair(tokenizer, p) for p in pairs], tokenizer.pad_token_id)
    model = add_lora(vocab_llama(), ORPOConfig(r=4, lora_alpha=8))
    with count_forwards(model) as orpo_calls:
        orpo_loss(model, batch)
    with count_forwards(model) as dpo_calls:
        dpo_loss(model, batch)
    assert orpo_calls[0] == 1 and dpo_calls[0] == 2


def test_orpo_loss_is_the_chosen_nll_plus_the_odds_ratio_term(vocab_llama, tokenizer, pairs):
    batch = collate_pairs([tokenize_pair(tokenizer, p) for p in pairs], tokenizer.pad_token_id)
    model = vocab_llama()
    with torch.no_grad():
        summed, sums = orpo_loss(model, batch, beta=BETA)
        mean = sequence_logps(model, batch) / reply_tokens(batch)
    chosen, rejected = mean.chunk(2)
    expected = (-chosen + odds_ratio_loss(chosen, rejected, BETA)).sum()
    assert abs(summed.item() - expected.item()) < TOL * abs(expected.item())
    assert abs(sums["nll_loss"] + chosen.sum().item()) < 1e-4


def replayed(pair: dict) -> dict:
    """An SFT conversation from a pair's prompt and chosen reply, as ORPO replays an earlier task."""
    return {"messages": pair["prompt"] + pair["chosen"]}


def test_orpo_batch_of_pairs_alone_is_collate_pairs_batch(tokenizer, pairs):
    rows = [tokenize_orpo(tokenizer, p) for p in pairs]
    ours, plain = collate_orpo(rows, tokenizer.pad_token_id), collate_pairs(rows, tokenizer.pad_token_id)
    assert all(torch.equal(ours[k], plain[k]) for k in plain) and ours["paired"].all()


def test_orpo_replayed_conversation_tokenizes_as_sft_does(tokenizer, pairs):
    row = tokenize_orpo(tokenizer, replayed(pairs[0]))
    sft = tokenize_chat(tokenizer, replayed(pairs[0])["messages"])
    assert row["rejected_ids"] is None and row["prompt_ids"] + row["chosen_ids"] == sft["input_ids"]
    assert [t for t in sft["labels"] if t != IGNORE] == row["chosen_ids"]


def test_orpo_replayed_conversation_adds_only_its_per_token_nll(vocab_llama, tokenizer, pairs):
    model = vocab_llama()
    pair_rows = [tokenize_orpo(tokenizer, p) for p in pairs[:2]]
    replay_row = tokenize_orpo(tokenizer, replayed(pairs[2]))
    with torch.no_grad():
        mixed, mixed_sums = orpo_loss(model, collate_orpo(pair_rows + [replay_row], tokenizer.pad_token_id), BETA)
        alone, alone_sums = orpo_loss(model, collate_orpo(pair_rows, tokenizer.pad_token_id), BETA)
        nll, count = assistant_loss(model, collate([tokenize_chat(tokenizer, replayed(pairs[2])["messages"])],
                                                   tokenizer.pad_token_id))
    assert abs(mixed.item() - (alone.item() + nll.item() / count)) < TOL * abs(mixed.item())
    assert mixed_sums["pairs"] == 2 and abs(mixed_sums["rewards/accuracies"] - alone_sums["rewards/accuracies"]) < TOL


def test_orpo_replay_without_an_assistant_reply_is_refused(tokenizer, pairs):
    with pytest.raises(LabkitError, match="assistant"):
        tokenize_orpo(tokenizer, {"messages": pairs[0]["prompt"]})


# ---------------------------------------------------------------- KTO, equal to TRL


@pytest.fixture(scope="module")
def trl_kto(vocab_llama, tokenizer, pairs):
    """TRL's KTOTrainer on a tiny Llama with a LoRA adapter (reference = adapter disabled), and one collated batch."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import KTOConfig as TRLKTOConfig, KTOTrainer

    examples = unpair(pairs)
    args = TRLKTOConfig(output_dir="/tmp/labkit-trl-kto", report_to="none", bf16=False, use_cpu=True,
                        gradient_checkpointing=False, beta=BETA, max_length=512,
                        per_device_train_batch_size=len(examples), desirable_weight=1.0, undesirable_weight=1.0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = KTOTrainer(model=vocab_llama(), args=args, train_dataset=Dataset.from_list(examples),
                         processing_class=tokenizer, peft_config=lora)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(examples))])
    ours = collate_kto([tokenize_example(tokenizer, e) for e in examples], tokenizer.pad_token_id)
    for seed in range(20):  # an adapter that moves the policy up on the mismatched pairs, so z0 > 0 is exercised
        perturb_adapter(trainer.model, seed=seed)  # (which seed does depends on the library versions' model init)
        with torch.no_grad():
            z0 = kl_estimate(sequence_logps(trainer.model, kl_batch(ours)), reference_logps(trainer.model, kl_batch(ours)))
        if z0 > 0:
            break
    trainer.model.train()
    return trainer, batch, ours


def test_kto_batch_equals_trls_with_the_same_mismatched_kl_pairs(trl_kto):
    _, theirs, ours = trl_kto
    for prefix in ("", "KL_"):
        assert torch.equal(ours[f"{prefix}input_ids"], theirs[f"{prefix}input_ids"])
        assert torch.equal((ours[f"{prefix}labels"] != IGNORE).long(), theirs[f"{prefix}completion_mask"])
    assert torch.equal(ours["desirable"], theirs["label"])


def test_kto_loss_matches_trl_kto_trainer(trl_kto):
    trainer, theirs, ours = trl_kto
    model = trainer.model
    trainer._metrics["train"].clear()
    model.zero_grad()
    trl_loss = trainer.compute_loss(model, theirs)
    trl_loss.backward()
    trl_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    summed, sums = kto_loss(model, ours, beta=BETA)
    n = ours["input_ids"].shape[0]
    (summed / n).backward()
    assert abs(summed.item() / n - trl_loss.item()) < TOL, (summed.item() / n, trl_loss.item())
    assert trainer._metrics["train"]["kl"][-1] > 0, "the KL estimate should be positive here, not clamped"
    assert abs(sums["kl"] / n - trainer._metrics["train"]["kl"][-1]) < TOL
    for key in ("rewards/chosen", "rewards/rejected"):
        assert abs(sums[key] / n - trainer._metrics["train"][key][-1]) < TOL, key
    assert max(g.abs().max().item() for g in trl_grads.values()) > 1e-4  # non-trivial gradients
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert (p.grad - trl_grads[name]).abs().max().item() < TOL, name
    model.zero_grad()


def test_kto_loss_weighs_desirable_and_undesirable_examples_around_the_kl_reference_point():
    logratios, kl = torch.tensor([2.0, 2.0]), torch.tensor(0.5)
    desirable = torch.tensor([True, False])
    losses = kto_losses(logratios, torch.zeros(2), desirable, kl, beta=1.0, desirable_weight=2.0,
                        undesirable_weight=0.5)
    expected = torch.stack([2.0 * (1 - torch.sigmoid(torch.tensor(1.5))), 0.5 * (1 - torch.sigmoid(torch.tensor(-1.5)))])
    assert torch.allclose(losses, expected)
    assert kl_estimate(torch.tensor([-3.0, -1.0]), torch.tensor([0.0, 0.0])).item() == 0.0  # clamped at 0


def test_unpair_makes_one_desirable_and_one_undesirable_reply_per_pair(pairs):
    examples = unpair(pairs)
    assert len(examples) == 2 * len(pairs)
    assert [e["label"] for e in examples[:2]] == [True, False]
    assert examples[0]["completion"] == pairs[0]["chosen"] and examples[1]["completion"] == pairs[0]["rejected"]


def test_kto_runs_four_forward_passes_two_of_them_on_the_reference(vocab_llama, tokenizer, pairs):
    batch = collate_kto([tokenize_example(tokenizer, e) for e in unpair(pairs)], tokenizer.pad_token_id)
    model = add_lora(vocab_llama(), KTOConfig(r=4, lora_alpha=8))
    with count_forwards(model) as calls:
        kto_loss(model, batch)
    assert calls[0] == 4


# ---------------------------------------------------------------- training with labkit's loop


def test_orpo_training_ranks_chosen_replies_above_rejected_ones(vocab_llama, tokenizer, pairs):
    config = ORPOConfig(steps=6, batch_size=2, lr=5e-3, r=4, lora_alpha=8, warmup_ratio=0.0)
    result = train_preference(vocab_llama(), tokenizer, pairs, config, plot=False, progress=False)
    history = result.history
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["rewards/margins"] > history[0]["rewards/margins"]


def test_kto_training_starts_at_half_a_unit_of_loss_and_descends(vocab_llama, tokenizer, pairs):
    config = KTOConfig(steps=6, batch_size=4, lr=5e-3, r=4, lora_alpha=8, warmup_ratio=0.0)
    result = train_preference(vocab_llama(), tokenizer, unpair(pairs), config, plot=False, progress=False)
    history = result.history
    assert history[0]["loss"] == pytest.approx(0.5, abs=1e-6)  # policy == reference: 1 - sigmoid(0) for every reply
    assert history[-1]["loss"] < 0.5
    assert history[-1]["rewards/chosen"] > history[-1]["rewards/rejected"]


def test_ranking_accuracy_counts_a_tie_as_half():
    assert ranking_accuracy(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 3.0])) == pytest.approx(0.5)


def test_dpo_config_and_preference_configs_share_the_sft_fields():
    assert {"steps", "lr", "r", "beta"} <= set(vars(ORPOConfig())) & set(vars(KTOConfig())) & set(vars(DPOConfig()))
