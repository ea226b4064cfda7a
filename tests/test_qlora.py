"""labkit.qlora: answer metrics without generation, and the LoRA vs QLoRA run on a tiny random Llama (notebook 04)."""

from __future__ import annotations

import gc
import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

pytest.importorskip("bitsandbytes")

from labkit import qlora  # noqa: E402
from labkit.data import load_split  # noqa: E402
from labkit.layer_training import make_task_batches, task_eval_loss  # noqa: E402
from labkit.measure import allocated_bytes  # noqa: E402
from labkit.memory import lora_trainable_params, shape_from_config  # noqa: E402
from labkit.quant import bnb_4bit_config  # noqa: E402
from labkit.tickets import FIELDS  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tickets():
    return load_split("validation")[:8]


# ---------------------------------------------------------------- answer metrics


def test_field_token_positions_spell_each_value_and_its_closing_character(tokenizer, tickets):
    for ticket in tickets:
        ids = tokenizer.apply_chat_template(ticket["messages"], return_dict=True)["input_ids"]
        positions = qlora.field_token_positions(tokenizer, ticket["messages"])
        gold = json.loads(ticket["messages"][-1]["content"])
        assert list(positions) == FIELDS
        for field, where in positions.items():
            assert where == list(range(where[0], where[-1] + 1))  # contiguous
            text = tokenizer.decode([ids[t] for t in where])
            assert json.dumps(gold[field]) in text and text.rstrip()[-1] in ",}"


class IdentityHead(nn.Identity):
    """An output head that passes the hidden states through as logits (its weight only tells the device)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))


class NextTokenOracle(nn.Module):
    """A fake causal LM whose logits at each position are one-hot on the true next token, except
    for tokens in `blind`, which it never predicts."""

    def __init__(self, vocab: int, blind: set[int] = frozenset()) -> None:
        super().__init__()
        self.vocab, self.blind = vocab, blind
        self.lm_head = IdentityHead()

    def model(self, input_ids, attention_mask, **_):
        following = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], dim=1)
        hidden = nn.functional.one_hot(following, self.vocab).float() * 30
        for token in self.blind:
            hidden[..., token] = -30.0
        return SimpleNamespace(last_hidden_state=hidden)


def test_answer_metrics_perfect_predictions_score_every_field(tokenizer, tickets):
    metrics = qlora.answer_metrics(NextTokenOracle(len(tokenizer)), tokenizer, tickets, batch_size=3)
    assert metrics["field_acc"] == 1.0 and all(metrics[f"acc_{f}"] == 1.0 for f in ["category", "order_id"])
    assert metrics["loss"] < 1e-3


def test_answer_metrics_a_field_is_wrong_if_one_of_its_tokens_is(tokenizer, tickets):
    """Blind to 'ORD': order ids are all wrong, null order ids right; other fields untouched."""
    ord_token = tokenizer.convert_tokens_to_ids("ORD")
    metrics = qlora.answer_metrics(NextTokenOracle(len(tokenizer), {ord_token}), tokenizer, tickets, batch_size=3)
    nulls = sum(json.loads(t["messages"][-1]["content"])["order_id"] is None for t in tickets)
    assert 0 < nulls < len(tickets)
    assert metrics["acc_order_id"] == nulls / len(tickets)
    assert metrics["acc_category"] == metrics["acc_product"] == 1.0


def test_answer_metrics_loss_equals_task_eval_loss(tiny_llama, tokenizer, tickets):
    model = tiny_llama(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    expected = task_eval_loss(model, make_task_batches(model, tokenizer, tickets, 4, shuffle=False))
    assert qlora.answer_metrics(model, tokenizer, tickets, batch_size=4)["loss"] == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------- the QLoRA run


def test_bnb_4bit_config_is_the_qlora_recipe():
    config = bnb_4bit_config(torch.bfloat16)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.bfloat16


def test_materialize_copies_weights_out_of_the_mapped_checkpoint(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    if allocated_bytes() is None:
        pytest.skip("needs glibc >= 2.33 (mallinfo2)")
    tiny_llama(vocab_size=4096, hidden_size=128, intermediate_size=256).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    gc.collect()  # garbage from earlier tests, freed mid-measurement, would make the count come out short
    gc.disable()
    start = allocated_bytes()
    qlora._materialize(model)
    gc.enable()
    assert allocated_bytes() - start > 0.9 * n_bytes  # now in memory that malloc counts
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.fixture(scope="module")
def tiny_runs(tiny_llama, tmp_path_factory, tokenizer):
    """finetune_run on both bases of a tiny random Llama with the course tokenizer (2 steps)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_llama(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=1024, tie_word_embeddings=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    options = dict(model_name=str(folder), steps=2, batch_size=2, micro_batch=1, r=4, lora_alpha=8, lr=1e-2,
                   gradient_checkpointing=True, n_val=4, n_show=1, max_new_tokens=3, threads=1)
    return model.config, {q: qlora.finetune_run(q, **options) for q in [False, True]}


def test_finetune_run_trains_the_same_adapter_on_either_base(tiny_runs):
    config, runs = tiny_runs
    assert runs[False]["method"] == "lora" and runs[True]["method"] == "qlora"
    for run in runs.values():
        assert run["trainable"] == lora_trainable_params(shape_from_config(config), 4)
        assert [h["step"] for h in run["history"]] == [1, 2]
        assert run["micro_batch"] == 1 and len(run["replies"]) == 1
        assert 0 <= run["scores"]["field_acc"] <= 1 and run["val_loss"] > 0


def test_finetune_run_quantized_base_holds_fewer_weight_bytes(tiny_runs):
    _, runs = tiny_runs
    lora, qlora = runs[False], runs[True]
    linear = 2 * (128 * 128 * 2 + 128 * 64 * 2 + 3 * 128 * 1024)  # decoder linear weights
    saved = lora["weights_bytes"] - qlora["weights_bytes"]
    assert 0.8 * linear * (4 - 0.52) < saved < 1.2 * linear * (4 - 0.52)  # fp32 -> NF4 + scales
    assert qlora["peak_bytes"] > qlora["weights_bytes"] > 0
