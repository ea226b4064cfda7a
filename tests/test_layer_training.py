"""labkit.layer_training: fixed task batches, the cached layer input, train_task, one-matrix updates and sweeps.

Everything runs on a tiny random Llama and a toy chat tokenizer, so the file takes seconds.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from labkit import LabkitError
from labkit import layer_training as T
from labkit.lora import LoRALinear, inject_lora, lora_layers, randomize_adapters
from labkit.rank import lora_parameter_count
from labkit.sft import IGNORE

# ---------------------------------------------------------------- fixtures and helpers

VOCAB = 64


pytestmark = pytest.mark.usefixtures("one_thread")


class ToyChatTokenizer:
    """A chat tokenizer small enough for a 64-token vocabulary: a role token, the text's bytes
    folded into 8..63, and an end-of-turn token per message (a prefix of the conversation always
    tokenizes to a prefix, as with a real chat template)."""

    pad_token_id = 0
    END = 1
    ROLES = {"system": 2, "user": 3, "assistant": 4}

    def apply_chat_template(self, messages, add_generation_prompt=False, return_dict=False, **_):
        ids = []
        for message in messages:
            ids += [self.ROLES[message["role"]], *(8 + b % (VOCAB - 8) for b in message["content"].encode()), self.END]
        if add_generation_prompt:
            ids.append(self.ROLES["assistant"])
        return {"input_ids": ids} if return_dict else ids


def example(i: int) -> dict:
    """A short chat of varying length whose answer follows from the question."""
    word = "abcdefgh"[i % 8]
    return {"messages": [
        {"role": "system", "content": "Reply."},
        {"role": "user", "content": f"say {word * (1 + i % 5)}"},
        {"role": "assistant", "content": f"{word}{word}!"},
    ]}  # fmt: skip


EXAMPLES = [example(i) for i in range(12)]


# Weights ~ N(0, 0.2) rather than the default 0.02: after the final RMSNorm, logits are bounded by the head's
# row norms, and with 0.02 no adapter below the head could move the loss much.
TOY_LLAMA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, pad_token_id=0,
                 initializer_range=0.2)


@pytest.fixture()
def model(tiny_llama) -> nn.Module:
    return tiny_llama(**TOY_LLAMA)


@pytest.fixture(scope="module")
def toy_tokenizer() -> ToyChatTokenizer:
    return ToyChatTokenizer()


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# ---------------------------------------------------------------- injecting into some layers


def test_inject_lora_layers_adapts_only_the_chosen_layers(model):
    T.inject_lora_layers(model, [1, 2], target_modules=["q_proj", "down_proj"], r=2, lora_alpha=4)
    adapted = {name for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert adapted == {f"model.layers.{i}.{part}" for i in [1, 2] for part in ["self_attn.q_proj", "mlp.down_proj"]}
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_inject_lora_layers_all_linear_wraps_seven_projections_per_layer_and_never_the_head(model):
    T.inject_lora_layers(model, [2], r=2, lora_alpha=4)
    assert len(lora_layers(model)) == 7
    assert not isinstance(model.lm_head, LoRALinear)


# ---------------------------------------------------------------- batches and the cached layer


def test_hidden_at_layer_equals_the_models_hidden_states(model, toy_tokenizer):
    batch = T.make_task_batches(model, toy_tokenizer, EXAMPLES[:4], batch_size=4, shuffle=False).batches[0]
    with torch.no_grad():
        states = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       output_hidden_states=True).hidden_states
    for layer in [1, 2]:
        assert torch.allclose(T.hidden_at_layer(model, batch, layer), states[layer], atol=1e-6)


def test_eval_batches_hold_every_example_once_sorted_by_length(model, toy_tokenizer):
    data = T.make_task_batches(model, toy_tokenizer, EXAMPLES, batch_size=5, shuffle=False)
    assert [b["input_ids"].shape[0] for b in data.batches] == [5, 5, 2]
    lengths = [int(n) for b in data.batches for n in b["attention_mask"].sum(1)]
    assert lengths == sorted(lengths) and len(lengths) == len(EXAMPLES)
    assert data.tokens == sum(lengths) and data.steps == 3 and data.hidden is None


def test_training_batches_are_seeded_and_as_many_as_asked(model, toy_tokenizer):
    first = T.make_task_batches(model, toy_tokenizer, EXAMPLES, batch_size=4, n_batches=7, seed=3)
    again = T.make_task_batches(model, toy_tokenizer, EXAMPLES, batch_size=4, n_batches=7, seed=3)
    assert first.steps == 7
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first.batches, again.batches))


def test_labels_cover_only_the_answer(model, toy_tokenizer):
    batch = T.make_task_batches(model, toy_tokenizer, EXAMPLES[:1], batch_size=1, shuffle=False).batches[0]
    labelled = batch["labels"][batch["labels"] != IGNORE].tolist()
    answer = [8 + b % (VOCAB - 8) for b in EXAMPLES[0]["messages"][2]["content"].encode()]
    assert labelled == answer + [ToyChatTokenizer.END]


def test_micro_batches_split_each_batch_into_an_accumulation_step(model, toy_tokenizer):
    data = T.make_task_batches(model, toy_tokenizer, EXAMPLES, batch_size=4, n_batches=3, micro_batch=2)
    assert data.grad_accum == 2 and data.steps == 3 and len(data.batches) == 6
    assert all(b["input_ids"].shape[0] == 2 for b in data.batches)


def test_micro_batches_of_a_short_batch_are_never_empty(model, toy_tokenizer):
    """10 examples in batches of 4 give a last batch of 2: it becomes one micro-batch, not one and an empty one."""
    data = T.make_task_batches(model, toy_tokenizer, EXAMPLES[:10], batch_size=4, n_batches=3, micro_batch=2, seed=0)
    assert data.steps == 3
    assert all(b["input_ids"].shape[0] > 0 for b in data.batches)
    assert sum(b["input_ids"].shape[0] for b in data.batches) == 10
    assert [len(r) for r in data.step_ranges()] in ([2, 2, 1], [2, 1, 2], [1, 2, 2])


def test_micro_batch_that_does_not_divide_the_batch_raises(model, toy_tokenizer):
    with pytest.raises(LabkitError, match="multiple of micro_batch"):
        T.make_task_batches(model, toy_tokenizer, EXAMPLES, batch_size=4, micro_batch=3)


def test_task_loss_from_cached_layer_equals_full_forward(model, toy_tokenizer):
    full = T.make_task_batches(model, toy_tokenizer, EXAMPLES, batch_size=4, shuffle=False)
    cached = T.make_task_batches(model, toy_tokenizer, EXAMPLES, batch_size=4, shuffle=False, start_layer=2)
    assert cached.hidden is not None and len(cached.hidden) == len(cached.batches)
    with torch.no_grad():
        for i in range(len(full.batches)):
            (loss_full, n_full), (loss_cached, n_cached) = T.task_loss(model, full, i), T.task_loss(model, cached, i)
            assert n_full == n_cached > 0
            assert loss_cached.item() == pytest.approx(loss_full.item(), rel=1e-5)
    assert len(T._decoder(model).layers) == 3  # every layer is back after the shortened forward


def test_task_loss_from_cached_layer_gives_the_full_models_gradients(model, toy_tokenizer):
    T.inject_lora_layers(model, [2], target_modules=["v_proj"], r=2, lora_alpha=4)
    randomize_adapters(model, std=0.1)
    adapter = model.model.layers[2].self_attn.v_proj.lora_A
    grads = []
    for start_layer in [0, 2]:
        data = T.make_task_batches(model, toy_tokenizer, EXAMPLES[:4], batch_size=4, shuffle=False, start_layer=start_layer)
        T.task_loss(model, data, 0)[0].backward()
        grads.append(adapter.grad.clone())
        adapter.grad = None
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_task_eval_loss_is_the_mean_over_answer_tokens_and_keeps_the_mode(model, toy_tokenizer):
    data = T.make_task_batches(model, toy_tokenizer, EXAMPLES, batch_size=5, shuffle=False)
    with torch.no_grad():
        parts = [T.task_loss(model, data, i) for i in range(len(data.batches))]
    expected = sum(loss.item() for loss, _ in parts) / sum(n for _, n in parts)
    model.train()
    assert T.task_eval_loss(model, data) == pytest.approx(expected, rel=1e-6)
    assert model.training
    assert math.log(VOCAB) / 2 < expected < 2 * math.log(VOCAB)  # a random model: about log(vocab)


# ---------------------------------------------------------------- training


def test_train_task_lowers_loss(model, toy_tokenizer):
    inject_lora(model, r=4, lora_alpha=8, target_modules="all-linear")
    train = T.make_task_batches(model, toy_tokenizer, EXAMPLES, batch_size=4, n_batches=30, seed=0)
    val = T.make_task_batches(model, toy_tokenizer, EXAMPLES, batch_size=12, shuffle=False)
    before = T.task_eval_loss(model, val)
    history = T.train_task(model, train, lr=1e-2)
    after = T.task_eval_loss(model, val)
    assert [h["step"] for h in history] == list(range(1, 31))
    assert after < 0.5 * before, (before, after)


def test_train_task_moves_only_trainable_parameters(model, toy_tokenizer):
    inject_lora(model, r=2, lora_alpha=4, target_modules=["q_proj"])
    before = weights(model)
    T.train_task(model, T.make_task_batches(model, toy_tokenizer, EXAMPLES, batch_size=4, n_batches=2), lr=1e-2)
    after = weights(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all("lora_" in n for n in changed)


def test_train_task_without_trainable_parameters_raises(model, toy_tokenizer):
    for p in model.parameters():
        p.requires_grad = False
    data = T.make_task_batches(model, toy_tokenizer, EXAMPLES[:4], batch_size=4, n_batches=1)
    with pytest.raises(LabkitError, match="Nothing to train"):
        T.train_task(model, data)


def test_train_task_with_the_same_seed_repeats_its_losses(tiny_llama, toy_tokenizer):
    runs = []
    for _ in range(2):
        model = inject_lora(tiny_llama(**TOY_LLAMA), r=2, lora_alpha=4, target_modules="all-linear", lora_dropout=0.1)
        data = T.make_task_batches(model, toy_tokenizer, EXAMPLES, batch_size=4, n_batches=3, seed=1)
        runs.append([h["loss"] for h in T.train_task(model, data, lr=1e-2, seed=5)])
    assert runs[0] == runs[1]


def test_micro_batches_accumulate_to_the_same_step_as_the_whole_batch(tiny_llama, toy_tokenizer):
    """One step on a batch of 4 equals one step on two micro-batches of 2 (SGD, no clipping)."""
    results = []
    for micro in [None, 2]:
        model = inject_lora(tiny_llama(**TOY_LLAMA), r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
        randomize_adapters(model, std=0.1)
        data = T.make_task_batches(model, toy_tokenizer, EXAMPLES[:4], batch_size=4, n_batches=1, micro_batch=micro)
        history = T.train_task(model, data, lr=0.1, optimizer="sgd", max_grad_norm=0.0, warmup_ratio=0.0)
        results.append((history[0]["loss"], weights(model)))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for name, value in results[0][1].items():
        assert torch.allclose(value, results[1][1][name], atol=1e-6), name


def test_unknown_optimizer_raises(model, toy_tokenizer):
    inject_lora(model, r=2, lora_alpha=4)
    data = T.make_task_batches(model, toy_tokenizer, EXAMPLES[:4], batch_size=4, n_batches=1)
    with pytest.raises(LabkitError, match="optimizer"):
        T.train_task(model, data, optimizer="lion")


# ---------------------------------------------------------------- full fine-tuning of one matrix


def test_full_finetune_update_leaves_model_unchanged(model, toy_tokenizer):
    model.train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = weights(model)
    data = T.make_task_batches(model, toy_tokenizer, EXAMPLES, batch_size=4, n_batches=3)
    delta = T.full_finetune_update(model, "model.layers.1.self_attn.q_proj", data, lr=1e-2)
    assert delta.shape == (32, 32) and delta.abs().max() > 0
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.training and all(p.grad is None for p in model.parameters())


def test_full_finetune_update_is_what_training_that_matrix_alone_does(tiny_llama, toy_tokenizer):
    name = "model.layers.2.mlp.up_proj"
    data_args = dict(batch_size=4, n_batches=2, seed=0)
    model = tiny_llama(**TOY_LLAMA)
    data = T.make_task_batches(model, toy_tokenizer, EXAMPLES, **data_args)
    delta = T.full_finetune_update(model, name, data, lr=1e-2, optimizer="sgd")
    reference = tiny_llama(**TOY_LLAMA)
    for p in reference.parameters():
        p.requires_grad = False
    weight = reference.get_submodule(name).weight
    start = weight.detach().clone()
    weight.requires_grad = True
    T.train_task(reference, T.make_task_batches(reference, toy_tokenizer, EXAMPLES, **data_args), lr=1e-2,
                 optimizer="sgd", max_grad_norm=0.0)
    assert torch.allclose(delta, weight.detach() - start, atol=1e-7)


def test_full_finetune_update_from_the_cached_layer_equals_the_full_forward(model, toy_tokenizer):
    name = "model.layers.2.self_attn.o_proj"
    deltas = [
        T.full_finetune_update(model, name, T.make_task_batches(model, toy_tokenizer, EXAMPLES, 4, 2, start_layer=k),
                               lr=1e-2, optimizer="sgd")
        for k in [0, 2]
    ]  # fmt: skip
    assert torch.allclose(deltas[0], deltas[1], rtol=1e-4, atol=1e-7)


def test_full_finetune_update_below_the_cached_layer_raises(model, toy_tokenizer):
    data = T.make_task_batches(model, toy_tokenizer, EXAMPLES[:4], batch_size=4, n_batches=1, start_layer=2)
    with pytest.raises(LabkitError, match="below the cached layer"):
        T.full_finetune_update(model, "model.layers.1.self_attn.q_proj", data)


# ---------------------------------------------------------------- sweeps


def test_compare_configs_trains_one_fresh_adapter_per_config_and_leaves_the_model_alone(model, toy_tokenizer):
    train = T.make_task_batches(model, toy_tokenizer, EXAMPLES, batch_size=4, n_batches=4, seed=0, start_layer=2)
    val = T.make_task_batches(model, toy_tokenizer, EXAMPLES, batch_size=12, shuffle=False, start_layer=2)
    before, base_val = weights(model), T.task_eval_loss(model, val)
    configs = {
        "q r=2": dict(target_modules=["q_proj"], r=2, lora_alpha=4, lr=1e-2),
        "all r=4": dict(r=4, lora_alpha=8, lr=1e-2),
    }
    rows = T.compare_configs(model, train, val, configs)
    assert [row["config"] for row in rows] == list(configs)
    assert [row["trainable"] for row in rows] == [2 * (32 + 32), lora_parameter_count(32, 32, 4) * 2
                                                  + lora_parameter_count(32, 16, 4) * 2 + 4 * (32 + 64) * 3]
    assert all(row["val loss"] < base_val for row in rows)
    assert all(torch.equal(before[n], p) and p.requires_grad for n, p in model.named_parameters())
    assert not lora_layers(model)
