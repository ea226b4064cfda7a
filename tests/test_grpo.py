"""GRPO from scratch: the triage rewards on hand-written replies, group advantages, and the loss and its gradients
specified against TRL's GRPOTrainer on identical inputs (a tiny random Llama keeps it fast)."""

import json

import pytest
import torch

from labkit import LabkitError
from labkit.checkpoint import CheckpointError
from labkit.data import read_jsonl
from labkit.grpo import (
    LONGEST_ANSWER,
    LOSS_TYPES,
    GRPOConfig,
    aggregate,
    cached_grpo,
    clipped_surrogate,
    exact_reward,
    field_reward,
    for_trl,
    format_reward,
    group_advantages,
    grpo_loss,
    keys_only_reward,
    kl_k3,
    length_reward,
    loophole_share,
    per_token_logps,
    plot_rewards,
    policy_loss,
    reference_token_logps,
    sample_group,
    schema_reward,
    score,
    train_grpo,
    zero_signal_share,
)
from labkit.paths import data_dir
from labkit.sft import add_lora
from labkit.tickets import to_json

from conftest import perturb_adapter

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5
MAX_LEN = 48  # max_completion_length: dr_grpo divides by it
TEMPERATURE = 0.9  # TRL divides the logits by the sampling temperature before its log-probs: so do we
EPS, EPS_HIGH = 0.2, 0.28

GOLD = {"category": "billing", "priority": "high", "sentiment": "negative", "product": "Aurora Kettle",
        "order_id": "ORD-12345"}
RIGHT = to_json(GOLD)
ALL_NULL = json.dumps(dict.fromkeys(GOLD))


def with_values(**changes) -> str:
    return json.dumps({**GOLD, **changes})


# ---------------------------------------------------------------- rewards on hand-written replies


@pytest.mark.parametrize("reply, expected", [
    (RIGHT, 1.0),
    ("  " + RIGHT + "\n", 1.0),  # surrounding whitespace is not text
    (json.dumps({k: GOLD[k] for k in reversed(list(GOLD))}), 1.0),  # key order is the schema's business
    (with_values(category="refund"), 1.0),  # a wrong label is still the right format
    ("```json\n" + RIGHT + "\n```", 0.0),  # a code fence is text around the object
    ("Sure! " + RIGHT, 0.0),
    (RIGHT + " " + RIGHT, 0.0),  # two objects are not one
    ('{"category": "billing", "priority": ', 0.0),  # invalid JSON
    (with_values(notes="call back"), 0.0),  # an extra key
    (json.dumps({k: GOLD[k] for k in list(GOLD)[:4]}), 0.0),  # a missing key
    ("[" + RIGHT + "]", 0.0),  # a list, not an object
    ("", 0.0),
])
def test_format_reward_pays_only_one_json_object_with_exactly_the_five_keys(reply, expected):
    assert format_reward(reply) == expected


@pytest.mark.parametrize("reply, expected", [
    (RIGHT, 1.0),
    ("Here you go: " + RIGHT, 1.0),  # the values are fine; text around them is format_reward's business
    (with_values(product=None, order_id=None), 1.0),  # null is allowed for product and order_id
    (with_values(category="refund"), 0.8),  # a label outside its set
    (with_values(priority="High"), 0.8),  # labels are case-sensitive
    (with_values(order_id="12345"), 0.8),  # not the ORD- pattern
    (with_values(order_id="ord-12345"), 0.8),
    (with_values(order_id="ORD-1234"), 0.8),  # four digits
    (with_values(product="aurora kettle"), 0.8),  # not the catalogue's spelling
    (with_values(category=None), 0.8),  # category has no null
    (ALL_NULL, 0.4),  # only product and order_id may be null
    (with_values(notes="x"), 5 / 6),  # an extra key counts as one more wrong field
    (json.dumps({k: GOLD[k] for k in list(GOLD)[:4]}), 0.8),  # a missing field is a wrong field
    ('{"category": "billing", "priority": ', 0.0),  # invalid JSON
    ("no JSON at all", 0.0),
])
def test_schema_reward_is_the_share_of_fields_with_allowed_values(reply, expected):
    assert schema_reward(reply) == pytest.approx(expected)


@pytest.mark.parametrize("reply, expected", [
    (RIGHT, 1.0),
    (with_values(priority="low", sentiment="neutral"), 0.6),  # partial credit: 3 of 5 right
    (with_values(category="refund"), 0.8),
    ("Sure! " + RIGHT, 1.0),  # the first JSON object is the answer, as the course's metrics parse it
    ('{"category": "billing"', 0.0),  # invalid JSON
    (ALL_NULL, 0.0),
])
def test_field_reward_gives_partial_credit_per_right_field(reply, expected):
    assert field_reward(reply, GOLD) == pytest.approx(expected)


def test_exact_reward_is_all_or_nothing():
    assert exact_reward(RIGHT, GOLD) == 1.0
    assert exact_reward(with_values(sentiment="neutral"), GOLD) == 0.0  # 4 of 5 right still scores 0


def test_length_reward_is_zero_up_to_the_longest_answer_then_falls_to_minus_one():
    assert LONGEST_ANSWER >= len(RIGHT)
    assert length_reward(RIGHT) == 0.0
    assert length_reward("x" * (LONGEST_ANSWER + LONGEST_ANSWER // 2)) == pytest.approx(-0.5, abs=0.01)
    assert length_reward("x" * (3 * LONGEST_ANSWER)) == -1.0


def test_keys_only_reward_pays_answers_without_content_and_loophole_share_catches_them():
    assert keys_only_reward(ALL_NULL) == 1.0 and keys_only_reward(with_values(category="?")) == 1.0
    assert keys_only_reward(RIGHT) == 1.0 and keys_only_reward("no JSON") == 0.0
    assert loophole_share([RIGHT, RIGHT, RIGHT]) == 0.0
    assert loophole_share([ALL_NULL, with_values(category="?"), RIGHT, "no JSON"]) == 0.5


def test_for_trl_feeds_trl_completions_and_the_gold_column_to_a_labkit_reward():
    trl_field = for_trl(field_reward)
    completions = [[{"role": "assistant", "content": RIGHT}], [{"role": "assistant", "content": ALL_NULL}]]
    assert trl_field(completions=completions, gold=[json.dumps(GOLD)] * 2, prompts=None) == [1.0, 0.0]
    assert for_trl(format_reward)(completions=[RIGHT + "\n", "nope"]) == [1.0, 0.0]
    assert trl_field.__name__ == "field_reward"  # TRL logs rewards/<name>/mean


def test_score_sums_the_weighted_rewards_and_keeps_each():
    replies = [RIGHT, with_values(category="refund"), "no"]
    total, each = score(replies, [GOLD] * 3, {"format": format_reward, "schema": schema_reward}, (1.0, 0.5))
    assert torch.allclose(total, torch.tensor([1.5, 1.4, 0.0]))
    assert torch.equal(each["format"], torch.tensor([1.0, 1.0, 0.0]))


# ---------------------------------------------------------------- advantages and the zero-signal share


def test_group_advantages_equal_trls_formula_with_and_without_std_scaling():
    from trl.trainer.utils import nanstd

    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 1.0, 1.0, 0.0, 0.3, 0.3, 0.3, 0.3])
    k = 4
    groups = rewards.view(-1, k)
    mean = groups.mean(1).repeat_interleave(k)
    std = nanstd(groups, dim=1).repeat_interleave(k)  # TRL's std: Bessel-corrected (n - 1)
    assert torch.allclose(group_advantages(rewards, k), (rewards - mean) / (std + 1e-4), atol=1e-6)
    assert torch.allclose(group_advantages(rewards, k, scale=False), rewards - mean, atol=1e-7)


def test_a_group_whose_rewards_are_all_equal_gets_zero_advantages():
    advantages = group_advantages(torch.tensor([0.3, 0.3, 0.3, 1.0, 0.0, 0.0]), 3)
    assert torch.equal(advantages[:3], torch.zeros(3))
    assert advantages[3] > 0 > advantages[4]


def test_zero_signal_share_counts_groups_whose_k_rewards_are_all_equal():
    all_or_nothing = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    assert zero_signal_share(all_or_nothing, 3) == pytest.approx(2 / 3)
    partial = torch.tensor([0.2, 0.4, 0.6, 1.0, 1.0, 1.0, 0.6, 1.0, 0.8])  # the same replies, partly right
    assert zero_signal_share(partial, 3) == pytest.approx(1 / 3)


# ---------------------------------------------------------------- the loss's parts


def test_the_ratio_is_one_when_the_replies_come_from_this_policy_so_the_loss_is_minus_the_advantage():
    logps = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], requires_grad=True)
    advantages, mask = torch.tensor([1.0, -1.0]), torch.ones(2, 2)
    loss, metrics = grpo_loss(logps, None, advantages, mask)
    assert loss.item() == pytest.approx(0.0)  # (-1 -1 +1 +1) / 4
    loss.backward()  # the gradient is -A / tokens on each token: the policy gradient
    assert torch.allclose(logps.grad, torch.tensor([[-0.25, -0.25], [0.25, 0.25]]))
    assert metrics["clip_ratio"] == 0.0


def test_clipping_stops_the_gradient_of_a_token_already_pushed_past_the_range():
    old = torch.zeros(1, 3)
    logps = torch.tensor([[0.5, 0.1, -0.5]], requires_grad=True)  # ratios e^0.5 = 1.65 (past 1.28), 1.11, 0.61
    clipped_surrogate(logps, old, torch.tensor([1.0]), EPS, EPS_HIGH).sum().backward()
    assert logps.grad[0, 0] == 0  # A > 0 and already above 1 + epsilon_high: no further push
    assert logps.grad[0, 1] < 0 and logps.grad[0, 2] < 0  # inside, or below with A > 0: still pushed up


def test_k3_kl_is_zero_at_the_reference_and_positive_away_from_it():
    ref = torch.tensor([-1.0, -2.0, -0.1])
    assert torch.equal(kl_k3(ref, ref), torch.zeros(3))
    assert (kl_k3(ref + torch.tensor([0.3, -0.4, 0.05]), ref) > 0).all()


def test_loss_types_average_tokens_differently():
    per_token = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    assert aggregate(per_token, mask, "dapo").item() == pytest.approx(8 / 5)  # every token weighs the same
    assert aggregate(per_token, mask, "grpo").item() == pytest.approx((1 + 4) / 2)  # every reply weighs the same
    assert aggregate(per_token, mask, "dr_grpo", max_completion_length=8).item() == pytest.approx(8 / (2 * 8))
    with pytest.raises(LabkitError, match="max_completion_length"):
        aggregate(per_token, mask, "dr_grpo")


def test_grpo_loss_refuses_beta_without_reference_log_probs():
    with pytest.raises(LabkitError, match="beta=0.1 needs ref_logps"):
        grpo_loss(torch.zeros(1, 2), None, torch.ones(1), torch.ones(1, 2), beta=0.1)


@pytest.mark.parametrize("change, match", [
    (dict(loss_type="bnpo"), "loss_type='bnpo'.*Fix"), (dict(k=1), "k=1.*at least 2"),
    (dict(temperature=0.0), "temperature"), (dict(reward_weights=(1.0,)), "reward_weights.*one weight per reward"),
])
def test_config_says_what_is_wrong_and_how_to_fix_it(change, match):
    with pytest.raises(LabkitError, match=match):
        GRPOConfig(**change)


# ---------------------------------------------------------------- equal to TRL's GRPOTrainer


@pytest.fixture(scope="module")
def examples():
    return read_jsonl(data_dir() / "train.jsonl")[:3]


@pytest.fixture(scope="module")
def trl(vocab_llama, tokenizer, examples):
    """TRL's GRPOTrainer on a tiny Llama with a LoRA adapter (reference = adapter off), no vLLM, no reward model."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig as TRLGRPOConfig, GRPOTrainer

    data = Dataset.from_list([{"prompt": ex["messages"][:-1]} for ex in examples])
    args = TRLGRPOConfig(output_dir="/tmp/labkit-trl-grpo", report_to="none", bf16=False, use_cpu=True,
                         per_device_train_batch_size=4, num_generations=2, gradient_accumulation_steps=1,
                         max_completion_length=MAX_LEN, temperature=TEMPERATURE, epsilon=EPS, epsilon_high=EPS_HIGH)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=vocab_llama(), reward_funcs=for_trl(format_reward), args=args, train_dataset=data,
                          processing_class=tokenizer, peft_config=lora)
    perturb_adapter(trainer.model)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by TRL's training loop, which we do not run
    return trainer


@pytest.fixture(scope="module")
def inputs(trl, tokenizer, examples):
    """A scored batch as TRL's loss reads it: 2 prompts x 2 replies of different lengths, advantages, old log-probs
    perturbed (so ratios leave the clip range), the reference's log-probs."""
    from labkit.grpo import pad_rows

    prompts = [tokenizer.apply_chat_template(ex["messages"][:-1], add_generation_prompt=True, return_dict=True)
               ["input_ids"] for ex in examples[:2]]
    answers = [ex["messages"][-1]["content"] for ex in examples[:2]]
    replies = [answers[0], answers[0][:20], "Sure! " + answers[1], "I cannot help with that."]
    completions = [tokenizer(r, add_special_tokens=False)["input_ids"][:MAX_LEN - 1] + [tokenizer.eos_token_id]
                   for r in replies]
    prompt_ids, prompt_mask = pad_rows([prompts[0], prompts[0], prompts[1], prompts[1]], tokenizer.pad_token_id,
                                       left=True)
    completion_ids, completion_mask = pad_rows(completions, tokenizer.pad_token_id, left=False)
    batch = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
             "completion_mask": completion_mask,
             "advantages": group_advantages(torch.tensor([1.0, 0.2, 0.6, 0.0]), 2)}
    model = trl.model
    with torch.no_grad():
        logps = per_token_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask, TEMPERATURE)
    noise = 0.3 * torch.randn(logps.shape, generator=torch.Generator().manual_seed(0))
    batch["old_logps"] = logps + noise  # the replies were sampled by an older policy: ratios spread around 1
    batch["ref_logps"] = reference_token_logps(model, batch, TEMPERATURE)
    return batch


def as_trl_inputs(batch: dict) -> dict:
    return {"prompt_ids": batch["prompt_ids"], "prompt_mask": batch["prompt_mask"],
            "completion_ids": batch["completion_ids"], "completion_mask": batch["completion_mask"],
            "advantages": batch["advantages"], "old_per_token_logps": batch["old_logps"],
            "ref_per_token_logps": batch["ref_logps"], "num_items_in_batch": batch["completion_mask"].sum()}


def trl_step(trainer, batch: dict, loss_type: str, beta: float, kl_ratio: bool = True):
    """TRL's loss, logged metrics and adapter gradients for one batch."""
    trainer.loss_type, trainer.beta, trainer.args.use_bias_correction_kl = loss_type, beta, kl_ratio
    trainer._metrics["train"].clear()
    model = trainer.model
    model.zero_grad()
    loss = trainer.compute_loss(model, as_trl_inputs(batch))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return loss.item(), {k: v[-1] for k, v in trainer._metrics["train"].items()}, grads


def our_step(model, batch: dict, loss_type: str, beta: float, kl_ratio: bool = True):
    """labkit's loss, metrics and adapter gradients for the same batch."""
    config = GRPOConfig(loss_type=loss_type, beta=beta, epsilon=EPS, epsilon_high=EPS_HIGH, temperature=TEMPERATURE,
                        max_new_tokens=MAX_LEN, kl_ratio=kl_ratio)
    model.zero_grad()
    loss, metrics = policy_loss(model, batch, config)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return loss.item(), metrics, grads


def differences(ours: tuple, theirs: tuple) -> dict[str, float]:
    """Max abs and relative difference of the losses and of the gradients (relative: to the largest gradient)."""
    scale = max(g.abs().max().item() for g in theirs[2].values())
    grad_abs = max((ours[2][n] - theirs[2][n]).abs().max().item() for n in theirs[2])
    return {"loss_abs": abs(ours[0] - theirs[0]), "loss_rel": abs(ours[0] - theirs[0]) / max(abs(theirs[0]), 1e-12),
            "grad_abs": grad_abs, "grad_rel": grad_abs / scale, "grad_max": scale}


@pytest.mark.parametrize("loss_type, beta, kl_ratio", [(t, beta, True) for t in LOSS_TYPES for beta in (0.0, 0.04)]
                         + [("dapo", 0.04, False)])  # kl_ratio: TRL's use_bias_correction_kl (on by default)
def test_loss_and_gradients_equal_trls_grpo_trainer(trl, inputs, loss_type, beta, kl_ratio):
    theirs = trl_step(trl, inputs, loss_type, beta, kl_ratio)
    ours = our_step(trl.model, inputs, loss_type, beta, kl_ratio)
    assert ours[2].keys() == theirs[2].keys() and len(ours[2]) > 0
    diff = differences(ours, theirs)
    assert diff["grad_max"] > 1e-3  # non-trivial gradients
    assert diff["loss_abs"] < TOL * max(1.0, abs(theirs[0])), diff
    assert diff["grad_abs"] < TOL, diff


def test_the_parity_batch_clips_some_tokens_and_drifts_from_the_reference(trl, inputs):
    _, theirs, _ = trl_step(trl, inputs, "dapo", 0.04)
    _, ours, _ = our_step(trl.model, inputs, "dapo", 0.04)
    assert 0.05 < theirs["clip_ratio/region_mean"] < 0.95  # the clip range matters in this batch
    assert ours["clip_ratio"] == pytest.approx(theirs["clip_ratio/region_mean"], abs=1e-6)
    assert ours["kl"] > 1e-4 and ours["kl"] == pytest.approx(theirs["kl"], rel=1e-4)


def test_micro_batches_give_the_gradient_of_the_whole_batch(trl, inputs):
    model = trl.model
    config = GRPOConfig(beta=0.04, epsilon=EPS, epsilon_high=EPS_HIGH, temperature=TEMPERATURE, max_new_tokens=MAX_LEN)
    _, _, whole = our_step(model, inputs, "dapo", 0.04)
    n_rows, n_tokens = 4, int(inputs["completion_mask"].sum())
    model.zero_grad()
    for rows in (slice(0, 1), slice(1, 4)):
        part = {k: v[rows] for k, v in inputs.items()}
        policy_loss(model, part, config, num_items=n_tokens, num_sequences=n_rows)[0].backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert (p.grad - whole[name]).abs().max().item() < TOL, name
    model.zero_grad()


# ---------------------------------------------------------------- sampling and training


def test_sample_group_lays_out_k_replies_per_prompt_as_trl_does(vocab_llama, tokenizer, examples):
    model = vocab_llama()
    conversations = [ex["messages"][:-1] for ex in examples[:2]]
    batch = sample_group(model, tokenizer, conversations, k=3, max_new_tokens=6,
                         generator=torch.Generator().manual_seed(0))
    assert batch["prompt_index"].tolist() == [0, 0, 0, 1, 1, 1]
    assert len(batch["texts"]) == 6 and batch["completion_ids"].shape[0] == 6
    assert batch["prompt_mask"][:, -1].all()  # prompts are left-padded: the reply starts right after each
    assert (batch["completion_mask"][:, 0] == 1).all()  # replies are right-padded
    assert torch.equal(batch["prompt_ids"][0], batch["prompt_ids"][2])
    again = sample_group(model, tokenizer, conversations, k=3, max_new_tokens=6,
                         generator=torch.Generator().manual_seed(0))
    assert torch.equal(again["completion_ids"], batch["completion_ids"])  # a seeded generator repeats the draw
    assert not all(torch.equal(batch["completion_ids"][0], batch["completion_ids"][i]) for i in (1, 2))  # sampled


def short_reply(reply: str, gold=None) -> float:
    """A reward a tiny random model can learn in a few steps: shorter replies are better."""
    return -len(reply) / 100


def test_training_raises_the_reward_and_logs_what_the_notebook_plots(vocab_llama, tokenizer, examples):
    config = GRPOConfig(steps=6, prompts_per_step=2, k=4, max_new_tokens=12, lr=3e-2, r=4, lora_alpha=8,
                        rewards=("short",), beta=0.04)
    seen = []
    result = train_grpo(vocab_llama(), tokenizer, examples, config, rewards={"short": short_reply},
                        plot=lambda history: seen.append(len(history)), progress=False)
    history = result.history
    assert seen == [1, 2, 3, 4, 5, 6]  # the live-plot callback gets the history after every step
    logged = {"reward", "reward/short", "zero_signal", "kl", "loss", "clip_ratio", "completion_tokens", "seconds"}
    assert logged <= history[0].keys()
    first, last = sum(h["reward"] for h in history[:2]) / 2, sum(h["reward"] for h in history[-2:]) / 2
    assert last > first, [h["reward"] for h in history]
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # a fresh adapter starts at the reference
    assert history[-1]["kl"] > 0


def test_a_cached_grpo_run_puts_the_same_adapter_into_a_fresh_policy(vocab_llama, tokenizer, examples, monkeypatch,
                                                                     tmp_path):
    monkeypatch.setenv("LABKIT_HOME", str(tmp_path))
    config = GRPOConfig(steps=2, prompts_per_step=2, k=2, max_new_tokens=4, lr=1e-2, r=4, lora_alpha=8,
                        rewards=("short",))
    rewards = {"short": short_reply}
    first, folder = cached_grpo(vocab_llama(), tokenizer, "tiny", examples, config, rewards, plot=False,
                                progress=False)
    policy = add_lora(vocab_llama(), config)
    second, again = cached_grpo(policy, tokenizer, "tiny", examples, config, rewards)
    assert again == folder and second.model is policy and second.history == first.history
    ours, theirs = dict(first.model.named_parameters()), dict(policy.named_parameters())
    assert all(torch.equal(p, ours[n]) for n, p in theirs.items() if "lora_" in n)
    assert any(p.any() for n, p in theirs.items() if "lora_B" in n)
    with pytest.raises(CheckpointError, match="already trained"):
        cached_grpo(policy, tokenizer, "tiny", examples, config, rewards)
    _, elsewhere = cached_grpo(vocab_llama(), tokenizer, "tiny", examples, config, {"short": length_reward},
                               plot=False, progress=False)
    assert elsewhere != folder  # another reward function's code is another run


def test_plot_rewards_draws_rewards_zero_signal_and_kl_per_step():
    import matplotlib

    matplotlib.use("Agg")
    history = [{"step": s, "reward": 0.1 * s, "reward/format": 0.1 * s, "zero_signal": 0.5, "zero_signal/format": 0.7,
                "kl": 0.01 * s} for s in (1, 2, 3)]
    fig = plot_rewards(history)
    left, middle, right = fig.axes
    assert len(left.lines) == 2 and len(middle.lines) == 2 and len(right.lines) == 1
    assert list(right.lines[0].get_ydata()) == [0.01, 0.02, 0.03]
