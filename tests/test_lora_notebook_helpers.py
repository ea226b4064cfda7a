"""labkit.lora's notebook-03 helpers: counting, ranks, cached-layer training, copies and sweeps.

Everything runs on a tiny random Llama and a toy chat tokenizer, so the file takes seconds.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from labkit import LabkitError
from labkit import lora as L

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


def tiny_llama(seed: int = 0, layers: int = 3, tied: bool = False) -> nn.Module:
    """A random Llama (hidden 32) with `layers` decoder layers, in eval mode.

    Weights ~ N(0, 0.2) rather than the default 0.02: after the final RMSNorm, logits are bounded by
    the head's row norms, and with 0.02 no adapter below the head could move the loss much.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, initializer_range=0.2,
        tie_word_embeddings=tied,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


@pytest.fixture()
def model() -> nn.Module:
    return tiny_llama()


@pytest.fixture(scope="module")
def tokenizer() -> ToyChatTokenizer:
    return ToyChatTokenizer()


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# ---------------------------------------------------------------- counting


def test_lora_parameter_count_equals_the_layers_trainable_parameters():
    layer = L.LoRALinear(nn.Linear(48, 20), r=6, alpha=12)
    trainable = sum(p.numel() for name, p in layer.named_parameters() if name.startswith("lora_"))
    assert L.lora_parameter_count(48, 20, 6) == trainable == 6 * (48 + 20)


def test_adapter_megabytes_counts_bytes_per_parameter():
    assert L.adapter_megabytes(1_000_000) == 4.0  # fp32
    assert L.adapter_megabytes(41_943_040, bytes_per_param=2) == pytest.approx(83.886, abs=1e-3)  # bf16


# ---------------------------------------------------------------- ranks


def random_low_rank(seed: int = 0, shape=(40, 30), rank: int = 5, noise: float = 0.01) -> torch.Tensor:
    """A rank-`rank` matrix plus a little full-rank noise."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    low_rank = torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g)
    return low_rank + noise * torch.randn(m, n, generator=g)


def test_energy_in_top_is_the_share_of_squared_singular_values():
    s = torch.tensor([3.0, 2.0, 1.0])
    assert L.energy_in_top(s, 1) == pytest.approx(9 / 14)
    assert L.energy_in_top(s, 2) == pytest.approx(13 / 14)
    assert L.energy_in_top(s, 3) == pytest.approx(1.0)


def test_low_rank_approximation_has_rank_r_and_the_eckart_young_error():
    matrix = random_low_rank(noise=0.5)
    s = torch.linalg.svdvals(matrix.double())
    approx = L.low_rank_approximation(matrix, 4)
    assert approx.dtype == matrix.dtype and approx.shape == matrix.shape
    assert torch.linalg.matrix_rank(approx.double(), rtol=1e-6) == 4
    assert (matrix - approx).double().norm() == pytest.approx(s[4:].norm().item(), rel=1e-5)
    assert torch.allclose(L.low_rank_approximation(matrix, 30), matrix, atol=1e-5)  # full rank: exact


def test_rank_report_error_follows_from_singular_values():
    matrix = random_low_rank(noise=0.3)
    report = L.rank_report(matrix, 3)
    measured = (matrix - L.low_rank_approximation(matrix, 3)).double().norm() / matrix.double().norm()
    assert report["relative_error"] == pytest.approx(measured.item(), rel=1e-6)
    assert report["relative_error"] == pytest.approx(math.sqrt(1 - report["energy"]))
    assert report["lora_params"] == 3 * (30 + 40) and report["full_params"] == 1200
    assert report["param_share"] == pytest.approx(210 / 1200)


def test_rank_report_accepts_precomputed_singular_values_and_clamps_the_rank():
    matrix = random_low_rank()
    s = torch.linalg.svdvals(matrix.double())
    assert L.rank_report(matrix, 4, singular_values=s) == L.rank_report(matrix, 4)
    assert L.rank_report(matrix, 1000)["r"] == 30 and L.rank_report(matrix, 1000)["relative_error"] == 0.0
    assert L.rank_report(matrix, 0)["r"] == 1


def test_rank_for_energy_is_the_smallest_rank_that_reaches_it():
    s = torch.tensor([3.0, 2.0, 1.0])  # cumulative energy 9/14, 13/14, 1
    assert L.rank_for_energy(s, 0.5) == 1
    assert L.rank_for_energy(s, 9 / 14) == 1
    assert L.rank_for_energy(s, 0.7) == 2
    assert L.rank_for_energy(s, 0.95) == 3
    assert L.rank_for_energy(torch.linalg.svdvals(random_low_rank(noise=1e-3)), 0.99) == 5  # a rank-5 matrix


def test_rank_for_all_the_energy_is_the_number_of_singular_values_despite_rounding():
    # With this seed the cumulative energy ends at 1 - 1e-16, not 1: rounding must not give rank 38.
    s = torch.linalg.svdvals(torch.randn(50, 37, generator=torch.Generator().manual_seed(1)))
    assert L.rank_for_energy(s, 1.0) == 37


# ---------------------------------------------------------------- injecting into some layers


def test_inject_lora_layers_adapts_only_the_chosen_layers(model):
    L.inject_lora_layers(model, [1, 2], targets=["q_proj", "down_proj"], r=2, alpha=4)
    adapted = {name for name, m in model.named_modules() if isinstance(m, L.LoRALinear)}
    assert adapted == {f"model.layers.{i}.{part}" for i in [1, 2] for part in ["self_attn.q_proj", "mlp.down_proj"]}
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_inject_lora_layers_all_linear_wraps_seven_projections_per_layer_and_never_the_head(model):
    L.inject_lora_layers(model, [2], r=2, alpha=4)
    assert len(L.lora_layers(model)) == 7
    assert not isinstance(model.lm_head, L.LoRALinear)


# ---------------------------------------------------------------- batches and the cached layer


def test_hidden_at_layer_equals_the_models_hidden_states(model, tokenizer):
    batch = L.make_task_batches(model, tokenizer, EXAMPLES[:4], batch_size=4, shuffle=False).batches[0]
    with torch.no_grad():
        states = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       output_hidden_states=True).hidden_states
    for layer in [1, 2]:
        assert torch.allclose(L.hidden_at_layer(model, batch, layer), states[layer], atol=1e-6)


def test_eval_batches_hold_every_example_once_sorted_by_length(model, tokenizer):
    data = L.make_task_batches(model, tokenizer, EXAMPLES, batch_size=5, shuffle=False)
    assert [b["input_ids"].shape[0] for b in data.batches] == [5, 5, 2]
    lengths = [int(n) for b in data.batches for n in b["attention_mask"].sum(1)]
    assert lengths == sorted(lengths) and len(lengths) == len(EXAMPLES)
    assert data.tokens == sum(lengths) and data.steps == 3 and data.hidden is None


def test_training_batches_are_seeded_and_as_many_as_asked(model, tokenizer):
    first = L.make_task_batches(model, tokenizer, EXAMPLES, batch_size=4, n_batches=7, seed=3)
    again = L.make_task_batches(model, tokenizer, EXAMPLES, batch_size=4, n_batches=7, seed=3)
    assert first.steps == 7
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first.batches, again.batches))


def test_labels_cover_only_the_answer(model, tokenizer):
    batch = L.make_task_batches(model, tokenizer, EXAMPLES[:1], batch_size=1, shuffle=False).batches[0]
    labelled = batch["labels"][batch["labels"] != -100].tolist()
    answer = [8 + b % (VOCAB - 8) for b in EXAMPLES[0]["messages"][2]["content"].encode()]
    assert labelled == answer + [ToyChatTokenizer.END]


def test_micro_batches_split_each_batch_into_an_accumulation_step(model, tokenizer):
    data = L.make_task_batches(model, tokenizer, EXAMPLES, batch_size=4, n_batches=3, micro_batch=2)
    assert data.grad_accum == 2 and data.steps == 3 and len(data.batches) == 6
    assert all(b["input_ids"].shape[0] == 2 for b in data.batches)


def test_micro_batches_of_a_short_batch_are_never_empty(model, tokenizer):
    """10 examples in batches of 4 give a last batch of 2: it becomes one micro-batch, not one and an empty one."""
    data = L.make_task_batches(model, tokenizer, EXAMPLES[:10], batch_size=4, n_batches=3, micro_batch=2, seed=0)
    assert data.steps == 3
    assert all(b["input_ids"].shape[0] > 0 for b in data.batches)
    assert sum(b["input_ids"].shape[0] for b in data.batches) == 10
    assert [len(r) for r in data.step_ranges()] in ([2, 2, 1], [2, 1, 2], [1, 2, 2])


def test_micro_batch_that_does_not_divide_the_batch_raises(model, tokenizer):
    with pytest.raises(LabkitError, match="multiple of micro_batch"):
        L.make_task_batches(model, tokenizer, EXAMPLES, batch_size=4, micro_batch=3)


def test_task_loss_from_cached_layer_equals_full_forward(model, tokenizer):
    full = L.make_task_batches(model, tokenizer, EXAMPLES, batch_size=4, shuffle=False)
    cached = L.make_task_batches(model, tokenizer, EXAMPLES, batch_size=4, shuffle=False, start_layer=2)
    assert cached.hidden is not None and len(cached.hidden) == len(cached.batches)
    with torch.no_grad():
        for i in range(len(full.batches)):
            (loss_full, n_full), (loss_cached, n_cached) = L.task_loss(model, full, i), L.task_loss(model, cached, i)
            assert n_full == n_cached > 0
            assert loss_cached.item() == pytest.approx(loss_full.item(), rel=1e-5)
    assert len(L._decoder(model).layers) == 3  # every layer is back after the shortened forward


def test_task_loss_from_cached_layer_gives_the_full_models_gradients(model, tokenizer):
    L.inject_lora_layers(model, [2], targets=["v_proj"], r=2, alpha=4)
    L.randomize_adapters(model, std=0.1)
    adapter = model.model.layers[2].self_attn.v_proj.lora_A
    grads = []
    for start_layer in [0, 2]:
        data = L.make_task_batches(model, tokenizer, EXAMPLES[:4], batch_size=4, shuffle=False, start_layer=start_layer)
        L.task_loss(model, data, 0)[0].backward()
        grads.append(adapter.grad.clone())
        adapter.grad = None
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_task_eval_loss_is_the_mean_over_answer_tokens_and_keeps_the_mode(model, tokenizer):
    data = L.make_task_batches(model, tokenizer, EXAMPLES, batch_size=5, shuffle=False)
    with torch.no_grad():
        parts = [L.task_loss(model, data, i) for i in range(len(data.batches))]
    expected = sum(loss.item() for loss, _ in parts) / sum(n for _, n in parts)
    model.train()
    assert L.task_eval_loss(model, data) == pytest.approx(expected, rel=1e-6)
    assert model.training
    assert math.log(VOCAB) / 2 < expected < 2 * math.log(VOCAB)  # a random model: about log(vocab)


# ---------------------------------------------------------------- training


def test_train_task_lowers_loss(model, tokenizer):
    L.inject_lora(model, r=4, alpha=8, target_modules="all-linear")
    train = L.make_task_batches(model, tokenizer, EXAMPLES, batch_size=4, n_batches=30, seed=0)
    val = L.make_task_batches(model, tokenizer, EXAMPLES, batch_size=12, shuffle=False)
    before = L.task_eval_loss(model, val)
    history = L.train_task(model, train, lr=1e-2)
    after = L.task_eval_loss(model, val)
    assert [h["step"] for h in history] == list(range(1, 31))
    assert after < 0.5 * before, (before, after)


def test_train_task_moves_only_trainable_parameters(model, tokenizer):
    L.inject_lora(model, r=2, alpha=4, target_modules=["q_proj"])
    before = weights(model)
    L.train_task(model, L.make_task_batches(model, tokenizer, EXAMPLES, batch_size=4, n_batches=2), lr=1e-2)
    after = weights(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all("lora_" in n for n in changed)


def test_train_task_without_trainable_parameters_raises(model, tokenizer):
    for p in model.parameters():
        p.requires_grad = False
    data = L.make_task_batches(model, tokenizer, EXAMPLES[:4], batch_size=4, n_batches=1)
    with pytest.raises(LabkitError, match="Nothing to train"):
        L.train_task(model, data)


def test_train_task_with_the_same_seed_repeats_its_losses(tokenizer):
    runs = []
    for _ in range(2):
        model = L.inject_lora(tiny_llama(), r=2, alpha=4, target_modules="all-linear", dropout=0.1)
        data = L.make_task_batches(model, tokenizer, EXAMPLES, batch_size=4, n_batches=3, seed=1)
        runs.append([h["loss"] for h in L.train_task(model, data, lr=1e-2, seed=5)])
    assert runs[0] == runs[1]


def test_micro_batches_accumulate_to_the_same_step_as_the_whole_batch(tokenizer):
    """One step on a batch of 4 equals one step on two micro-batches of 2 (SGD, no clipping)."""
    results = []
    for micro in [None, 2]:
        model = L.inject_lora(tiny_llama(), r=2, alpha=4, target_modules=["q_proj", "v_proj"])
        L.randomize_adapters(model, std=0.1)
        data = L.make_task_batches(model, tokenizer, EXAMPLES[:4], batch_size=4, n_batches=1, micro_batch=micro)
        history = L.train_task(model, data, lr=0.1, optimizer="sgd", max_grad_norm=0.0, warmup_ratio=0.0)
        results.append((history[0]["loss"], weights(model)))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for name, value in results[0][1].items():
        assert torch.allclose(value, results[1][1][name], atol=1e-6), name


def test_unknown_optimizer_raises(model, tokenizer):
    L.inject_lora(model, r=2, alpha=4)
    data = L.make_task_batches(model, tokenizer, EXAMPLES[:4], batch_size=4, n_batches=1)
    with pytest.raises(LabkitError, match="optimizer"):
        L.train_task(model, data, optimizer="lion")


# ---------------------------------------------------------------- full fine-tuning of one matrix


def test_full_finetune_update_leaves_model_unchanged(model, tokenizer):
    model.train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = weights(model)
    data = L.make_task_batches(model, tokenizer, EXAMPLES, batch_size=4, n_batches=3)
    delta = L.full_finetune_update(model, "model.layers.1.self_attn.q_proj", data, lr=1e-2)
    assert delta.shape == (32, 32) and delta.abs().max() > 0
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.training and all(p.grad is None for p in model.parameters())


def test_full_finetune_update_is_what_training_that_matrix_alone_does(tokenizer):
    name = "model.layers.2.mlp.up_proj"
    data_args = dict(batch_size=4, n_batches=2, seed=0)
    model = tiny_llama()
    data = L.make_task_batches(model, tokenizer, EXAMPLES, **data_args)
    delta = L.full_finetune_update(model, name, data, lr=1e-2, optimizer="sgd")
    reference = tiny_llama()
    for p in reference.parameters():
        p.requires_grad = False
    weight = reference.get_submodule(name).weight
    start = weight.detach().clone()
    weight.requires_grad = True
    L.train_task(reference, L.make_task_batches(reference, tokenizer, EXAMPLES, **data_args), lr=1e-2,
                 optimizer="sgd", max_grad_norm=0.0)
    assert torch.allclose(delta, weight.detach() - start, atol=1e-7)


def test_full_finetune_update_from_the_cached_layer_equals_the_full_forward(model, tokenizer):
    name = "model.layers.2.self_attn.o_proj"
    deltas = [
        L.full_finetune_update(model, name, L.make_task_batches(model, tokenizer, EXAMPLES, 4, 2, start_layer=k),
                               lr=1e-2, optimizer="sgd")
        for k in [0, 2]
    ]  # fmt: skip
    assert torch.allclose(deltas[0], deltas[1], rtol=1e-4, atol=1e-7)


def test_full_finetune_update_below_the_cached_layer_raises(model, tokenizer):
    data = L.make_task_batches(model, tokenizer, EXAMPLES[:4], batch_size=4, n_batches=1, start_layer=2)
    with pytest.raises(LabkitError, match="below the cached layer"):
        L.full_finetune_update(model, "model.layers.1.self_attn.q_proj", data)


# ---------------------------------------------------------------- copies, random adapters, sweeps


def test_shared_copy_shares_frozen_weights(model):
    copy = L.shared_copy(model)
    for (name, original), (_, shared) in zip(model.named_parameters(), copy.named_parameters()):
        assert shared.data_ptr() == original.data_ptr(), name
    assert copy.lm_head is not model.lm_head  # a new module tree over the same tensors


def test_shared_copy_keeps_tied_weights_tied():
    model = tiny_llama(tied=True)
    copy = L.shared_copy(model)
    assert copy.lm_head.weight is copy.model.embed_tokens.weight
    assert copy.lm_head.weight.data_ptr() == model.lm_head.weight.data_ptr()


def test_shared_copy_owns_the_weights_it_is_told_to(model, tokenizer):
    own = ("q_proj.weight",)
    copy = L.shared_copy(model, own=own)
    for (name, original), (_, param) in zip(model.named_parameters(), copy.named_parameters()):
        assert (param.data_ptr() == original.data_ptr()) == (not name.endswith(own)), name
    before = weights(model)
    adapted = L.randomize_adapters(L.inject_lora(copy, r=2, alpha=4, target_modules=["q_proj"]), std=0.1)
    L.merge_lora(adapted)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_injecting_into_a_shared_copy_leaves_the_original_trainable(model):
    L.inject_lora(L.shared_copy(model), r=2, alpha=4, target_modules="all-linear")
    assert all(p.requires_grad for p in model.parameters())
    assert not L.lora_layers(model)


def test_randomize_adapters_sets_nonzero_B_from_the_seed(model):
    adapted = L.inject_lora(model, r=2, alpha=4, target_modules=["q_proj"], use_dora=True)
    magnitudes = [layer.lora_magnitude_vector.detach().clone() for layer in L.lora_layers(adapted)]
    L.randomize_adapters(adapted, seed=7, std=0.05)
    first = weights(adapted)
    assert all(layer.lora_B.abs().max() > 0 for layer in L.lora_layers(adapted))
    assert all(not torch.equal(m, layer.lora_magnitude_vector) for m, layer in zip(magnitudes, L.lora_layers(adapted)))
    again = L.inject_lora(tiny_llama(), r=2, alpha=4, target_modules=["q_proj"], use_dora=True)
    L.randomize_adapters(again, seed=7, std=0.05)
    assert all(torch.equal(first[n], p) for n, p in again.named_parameters() if "lora_" in n)


def test_compare_configs_trains_one_fresh_adapter_per_config_and_leaves_the_model_alone(model, tokenizer):
    train = L.make_task_batches(model, tokenizer, EXAMPLES, batch_size=4, n_batches=4, seed=0, start_layer=2)
    val = L.make_task_batches(model, tokenizer, EXAMPLES, batch_size=12, shuffle=False, start_layer=2)
    before, base_val = weights(model), L.task_eval_loss(model, val)
    configs = {
        "q r=2": dict(targets=["q_proj"], r=2, alpha=4, lr=1e-2),
        "all r=4": dict(r=4, alpha=8, lr=1e-2),
    }
    rows = L.compare_configs(model, train, val, configs)
    assert [row["config"] for row in rows] == list(configs)
    assert [row["trainable"] for row in rows] == [2 * (32 + 32), L.lora_parameter_count(32, 32, 4) * 2
                                                  + L.lora_parameter_count(32, 16, 4) * 2 + 4 * (32 + 64) * 3]
    assert all(row["val loss"] < base_val for row in rows)
    assert all(torch.equal(before[n], p) and p.requires_grad for n, p in model.named_parameters())
    assert not L.lora_layers(model)
