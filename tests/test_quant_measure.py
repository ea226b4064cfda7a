"""labkit.quant, notebook 04 part: quantization error, code usage, answer metrics and the QLoRA run."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

pytest.importorskip("bitsandbytes")

from labkit import LabkitError  # noqa: E402
from labkit import quant as Q  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def gaussian(shape=(256, 256), seed: int = 0) -> torch.Tensor:
    """Weight-like values: N(0, 0.02)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02


def tiny_llama(vocab: int = 128, hidden: int = 64, intermediate: int = 128, layers: int = 3, tied: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()




@pytest.fixture(scope="module")
def tickets():
    from labkit.datagen import read_jsonl
    from labkit.paths import data_dir

    return read_jsonl(data_dir() / "validation.jsonl")[:8]


# ---------------------------------------------------------------- normalised blocks and errors


def test_blockwise_normalized_divides_each_block_by_its_absmax():
    w = gaussian((4, 128))
    blocks = w.reshape(-1, 64)
    scaled = Q.blockwise_normalized(w, 64).view(-1, 64)
    assert torch.equal(scaled.abs().amax(dim=1), torch.ones(8))
    assert torch.allclose(scaled, blocks / blocks.abs().amax(dim=1, keepdim=True))


def test_blockwise_normalized_leaves_out_a_trailing_partial_block():
    assert Q.blockwise_normalized(gaussian((1, 100)), 64).numel() == 64


def test_quantization_error_nf4_below_fp4_and_int4_on_gaussian_weights():
    w = gaussian((512, 256))
    error = {qt: Q.quantization_error(w, qt, 64)["relative_error"] for qt in ["nf4", "fp4", "int4"]}
    assert error["nf4"] < error["int4"] and error["nf4"] < error["fp4"], error


def test_quantization_error_grows_with_the_block_size():
    w = gaussian((256, 256))
    errors = [Q.quantization_error(w, "nf4", bs)["relative_error"] for bs in [32, 64, 256, 1024]]
    assert errors == sorted(errors) and errors[0] < errors[-1]


def test_quantization_error_matches_dequantizing_by_hand():
    w = gaussian((64, 96))
    report = Q.quantization_error(w, "fp4", 128, double_quant=True)
    back = Q.quantize_4bit(w, "fp4", 128, double_quant=True).dequantize()
    assert report["relative_error"] == pytest.approx(((back - w).norm() / w.norm()).item(), rel=1e-5)
    assert report["rmse"] == pytest.approx((back - w).pow(2).mean().sqrt().item(), rel=1e-5)
    assert report["bits"] == Q.bits_per_parameter(128, True) and report["n"] == w.numel()


def test_quantization_error_is_zero_for_values_on_the_code():
    w = Q.nf4_code().repeat(8) * 0.5  # every block of 64 holds the 16 code values times its absmax
    report = Q.quantization_error(w, "nf4", 64)
    assert report["sq_error"] == 0.0 and report["relative_error"] == 0.0


def test_quantization_error_of_all_zeros_is_zero():
    assert Q.quantization_error(torch.zeros(4, 64))["relative_error"] == 0.0


def test_model_quantization_error_pools_squared_errors_over_all_linear_weights():
    model = tiny_llama()
    report = Q.model_quantization_error(model, "nf4", 64)
    singles = [Q.quantization_error(m.weight, "nf4", 64) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name != "lm_head"]  # fmt: skip
    assert len(singles) == 3 * 7
    assert report["weights"] == sum(s["n"] for s in singles)
    pooled = math.sqrt(sum(s["sq_error"] for s in singles) / sum(s["sq_norm"] for s in singles))
    assert report["relative_error"] == pytest.approx(pooled, rel=1e-12)


def test_model_quantization_error_layers_picks_decoder_layers():
    model = tiny_llama()
    one_layer = sum(m.weight.numel() for m in model.model.layers[1].modules() if isinstance(m, nn.Linear))
    assert Q.model_quantization_error(model, layers=[1])["weights"] == one_layer
    assert Q.model_quantization_error(model, layers=range(0, 3, 2))["weights"] == 2 * one_layer


def test_model_quantization_error_refuses_a_model_without_linear_weights():
    model = Q.quantize_model(tiny_llama())  # only lm_head is left, and it is skipped
    with pytest.raises(LabkitError, match="no nn.Linear"):
        Q.model_quantization_error(model)


# ---------------------------------------------------------------- code usage


@pytest.mark.parametrize("quant_type, values", [("nf4", 16), ("fp4", 15), ("int4", 15)])
def test_code_usage_has_one_share_per_distinct_code_value(quant_type, values):
    """FP4 has +0 and -0, int4 has 0 twice: each counts as one value."""
    shares = Q.code_usage(gaussian(), quant_type, 64)
    assert shares.shape == (values,)
    assert shares.sum().item() == pytest.approx(1.0)


def test_code_usage_counts_where_each_value_was_quantized():
    code = Q.nf4_code()
    w = torch.cat([code, code[:-1].flip(0), code[-1:]]) * 0.25  # each value twice per block of 32
    assert torch.equal(Q.code_usage(w, "nf4", 32), torch.full((16,), 1 / 16, dtype=torch.float64))


def test_usage_entropy_of_uniform_is_four_bits():
    assert Q.usage_entropy(torch.full((16,), 1 / 16)) == pytest.approx(4.0)


def test_usage_entropy_of_a_single_value_is_zero():
    assert Q.usage_entropy(torch.tensor([0.0, 1.0, 0.0])) == 0.0


def test_nf4_uses_its_values_more_evenly_than_int4_and_fp4_on_gaussian_weights():
    entropy = {qt: Q.usage_entropy(Q.code_usage(gaussian((512, 256)), qt, 64)) for qt in ["nf4", "fp4", "int4"]}
    assert entropy["nf4"] > 3.8 and entropy["nf4"] > entropy["int4"] and entropy["nf4"] > entropy["fp4"]


# ---------------------------------------------------------------- answer metrics


def test_field_token_positions_spell_each_value_and_its_closing_character(tokenizer, tickets):
    import json

    from labkit.tickets import FIELDS

    for ticket in tickets:
        ids = tokenizer.apply_chat_template(ticket["messages"], return_dict=True)["input_ids"]
        positions = Q.field_token_positions(tokenizer, ticket["messages"])
        gold = json.loads(ticket["messages"][-1]["content"])
        assert list(positions) == FIELDS
        for field, where in positions.items():
            assert where == list(range(where[0], where[-1] + 1))  # contiguous
            text = tokenizer.decode([ids[t] for t in where])
            assert json.dumps(gold[field]) in text and text.rstrip()[-1] in ",}"


class NextTokenOracle(nn.Module):
    """A fake causal LM whose logits at each position are one-hot on the true next token, except
    for tokens in `blind`, which it never predicts."""

    def __init__(self, vocab: int, blind: set[int] = frozenset()) -> None:
        super().__init__()
        self.vocab, self.blind = vocab, blind
        self.dummy = nn.Parameter(torch.zeros(1))
        self.lm_head = nn.Identity()

    def model(self, input_ids, attention_mask):
        from types import SimpleNamespace

        following = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], dim=1)
        hidden = nn.functional.one_hot(following, self.vocab).float() * 30
        for token in self.blind:
            hidden[..., token] = -30.0
        return SimpleNamespace(last_hidden_state=hidden)


def test_answer_metrics_perfect_predictions_score_every_field(tokenizer, tickets):
    metrics = Q.answer_metrics(NextTokenOracle(len(tokenizer)), tokenizer, tickets, batch_size=3)
    assert metrics["field_acc"] == 1.0 and all(metrics[f"acc_{f}"] == 1.0 for f in ["category", "order_id"])
    assert metrics["loss"] < 1e-3


def test_answer_metrics_a_field_is_wrong_if_one_of_its_tokens_is(tokenizer, tickets):
    """Blind to 'ORD': order ids are all wrong, null order ids right; other fields untouched."""
    import json

    ord_token = tokenizer.convert_tokens_to_ids("ORD")
    metrics = Q.answer_metrics(NextTokenOracle(len(tokenizer), {ord_token}), tokenizer, tickets, batch_size=3)
    nulls = sum(json.loads(t["messages"][-1]["content"])["order_id"] is None for t in tickets)
    assert 0 < nulls < len(tickets)
    assert metrics["acc_order_id"] == nulls / len(tickets)
    assert metrics["acc_category"] == metrics["acc_product"] == 1.0


def test_answer_metrics_loss_equals_task_eval_loss(tokenizer, tickets):
    from labkit.lora import make_task_batches, task_eval_loss

    model = tiny_llama(vocab=len(tokenizer), hidden=32, intermediate=64, layers=1)
    expected = task_eval_loss(model, make_task_batches(model, tokenizer, tickets, 4, shuffle=False))
    assert Q.answer_metrics(model, tokenizer, tickets, batch_size=4)["loss"] == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------- the QLoRA run


def test_bnb_4bit_config_is_the_qlora_recipe():
    config = Q.bnb_4bit_config(torch.bfloat16)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.bfloat16


def test_materialize_copies_weights_out_of_the_mapped_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    from labkit.memory import allocated_bytes

    if allocated_bytes() is None:
        pytest.skip("needs glibc >= 2.33 (mallinfo2)")
    tiny_llama(vocab=4096, hidden=128, intermediate=256, layers=2).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    import gc

    gc.collect()  # garbage from earlier tests, freed mid-measurement, would make the count come out short
    gc.disable()
    start = allocated_bytes()
    Q._materialize(model)
    gc.enable()
    assert allocated_bytes() - start > 0.9 * n_bytes  # now in memory that malloc counts
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, tokenizer):
    """finetune_run on both bases of a tiny random Llama with the course tokenizer (2 steps)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_llama(vocab=len(tokenizer), hidden=128, intermediate=1024, layers=2, tied=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    options = dict(model_name=str(folder), steps=2, batch_size=2, micro_batch=1, r=4, alpha=8, lr=1e-2,
                   gradient_checkpointing=True, n_val=4, n_show=1, max_new_tokens=3, threads=1)
    return model.config, {q: Q.finetune_run(q, **options) for q in [False, True]}


def test_finetune_run_trains_the_same_adapter_on_either_base(tiny_runs):
    from labkit.memory import lora_trainable_params, shape_from_config

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
