"""The exercises' checkers: a blank answer (`...`) is reported without stopping the notebook, a wrong one
raises with how to fix it, and the reference solution (computed as the notebook's solution cell does) passes."""

import math

import pytest
import torch
from transformers import LlamaConfig

from labkit.checks import (NOT_ANSWERED, check_break_even, check_dpo_pair, check_early_stop, check_jaccard,
                           check_kappa, check_lora_count, check_nf4_indices, check_template_overhead)
from labkit.decide import GPU_TIERS
from labkit.metrics import cohen_kappa
from labkit.quant import nf4_code
from labkit.tickets import normalise


def says_not_answered(capsys) -> bool:
    """The checker printed exactly the one 'Not answered yet' line."""
    return capsys.readouterr().out == NOT_ANSWERED + "\n"


# ---------------------------------------------------------------- 00: the chat template's overhead

CONVERSATION = [{"role": "system", "content": "Triage the support ticket. Reply with JSON only."},
                {"role": "user", "content": "My order ORD-12345 has not arrived yet."}]


def test_template_overhead_blank_returns_false_and_says_not_answered(capsys):
    assert check_template_overhead(..., None, CONVERSATION) is False
    assert says_not_answered(capsys)


def test_template_overhead_rejects_the_rendered_length_alone(tokenizer):
    rendered = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, return_dict=True)["input_ids"]
    with pytest.raises(AssertionError, match="subtract the tokens of each message's content"):
        check_template_overhead(len(rendered), tokenizer, CONVERSATION)


def test_template_overhead_accepts_the_reference_solution(tokenizer):
    rendered_ids = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True,
                                                 return_dict=True)["input_ids"]
    content_ids = sum(len(tokenizer(m["content"])["input_ids"]) for m in CONVERSATION)
    assert check_template_overhead(len(rendered_ids) - content_ids, tokenizer, CONVERSATION) is True


# ---------------------------------------------------------------- 01: when the fine-tune pays for itself

BREAK_EVEN = dict(n_examples=2_000, saved_tokens=644, dollars_per_million=0.20)


def break_even_solution(n_examples: int, saved_tokens: int, dollars_per_million: float) -> tuple[float, int]:
    tier = next(t for t in GPU_TIERS if t.model_size == "7-8B" and t.method == "qlora")
    dollars = tier.hours_per_1k[1] * n_examples / 1000 * tier.dollars_per_hour
    return dollars, math.ceil(dollars / (saved_tokens * dollars_per_million / 1e6))


def test_break_even_blank_returns_false_and_says_not_answered(capsys):
    assert check_break_even(..., ..., **BREAK_EVEN) is False
    assert says_not_answered(capsys)


def test_break_even_with_one_of_two_answers_blank_returns_false(capsys):
    dollars, _ = break_even_solution(**BREAK_EVEN)
    assert check_break_even(dollars, ..., **BREAK_EVEN) is False
    assert says_not_answered(capsys)


def test_break_even_rejects_the_cost_of_1000_examples_and_says_to_scale_it():
    _, requests = break_even_solution(**BREAK_EVEN)
    with pytest.raises(AssertionError, match="scale the upper end"):
        check_break_even(3.0, requests, **BREAK_EVEN)


def test_break_even_rejects_a_count_rounded_down_and_says_to_round_up():
    dollars, requests = break_even_solution(**BREAK_EVEN)
    with pytest.raises(AssertionError, match="round up"):
        check_break_even(dollars, requests - 1, **BREAK_EVEN)


def test_break_even_accepts_the_reference_solution():
    assert check_break_even(*break_even_solution(**BREAK_EVEN), **BREAK_EVEN) is True


# ---------------------------------------------------------------- 02: Jaccard of word 3-gram shingles

TEXT_A = "Why is there a second payment for the kettle on my statement? It has to be sorted before Friday."
TEXT_B = "Hi team,\nwhy is there a second payment for the Kettle on my statement?! It has to be sorted before friday"


def word_shingles(text: str, n: int = 3) -> set[str]:
    words = normalise(text).split()
    return {" ".join(words[i : i + n]) for i in range(max(1, len(words) - n + 1))}


def test_jaccard_blank_returns_false_and_says_not_answered(capsys):
    assert check_jaccard(..., TEXT_A, TEXT_B) is False
    assert says_not_answered(capsys)


def test_jaccard_rejects_shingles_of_unnormalised_text_and_says_to_normalise():
    a, b = ({" ".join(w[i : i + 3]) for i in range(len(w) - 2)} for w in (TEXT_A.split(), TEXT_B.split()))
    with pytest.raises(AssertionError, match="Normalise each text first"):
        check_jaccard(len(a & b) / len(a | b), TEXT_A, TEXT_B)


def test_jaccard_accepts_the_reference_solution():
    a, b = word_shingles(TEXT_A), word_shingles(TEXT_B)
    assert check_jaccard(len(a & b) / len(a | b), TEXT_A, TEXT_B) is True


# ---------------------------------------------------------------- 03: count a LoRA adapter

CONFIG = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_lora_count_blank_returns_false_and_says_not_answered(capsys):
    assert check_lora_count(..., CONFIG, r=16, target_modules=ATTENTION) is False
    assert says_not_answered(capsys)


def test_lora_count_rejects_square_key_value_projections_and_gives_the_sizes():
    square = 16 * 4 * (64 + 64) * CONFIG.num_hidden_layers  # forgets that k and v have fewer heads
    with pytest.raises(AssertionError, match="k_proj: 64 -> 32"):
        check_lora_count(square, CONFIG, r=16, target_modules=ATTENTION)


def test_lora_count_accepts_the_reference_solution():
    cfg, r = CONFIG, 16
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    q_out, kv_out = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim
    per_layer = r * ((cfg.hidden_size + q_out) + 2 * (cfg.hidden_size + kv_out) + (q_out + cfg.hidden_size))
    assert check_lora_count(per_layer * cfg.num_hidden_layers, CONFIG, r=16, target_modules=ATTENTION) is True


# ---------------------------------------------------------------- 04: NF4 indices of one block

X = torch.randn(8, generator=torch.Generator().manual_seed(0))


def nf4_solution(x: torch.Tensor) -> torch.Tensor:
    code_values = nf4_code()
    return ((x / x.abs().max())[:, None] - code_values[None, :]).abs().argmin(dim=1)


def test_nf4_blank_returns_false_and_says_not_answered(capsys):
    assert check_nf4_indices(..., X) is False
    assert says_not_answered(capsys)


def test_nf4_rejects_indices_of_unscaled_values_and_says_to_divide_by_absmax():
    unscaled = (X[:, None] - nf4_code()[None, :]).abs().argmin(dim=1)
    assert not torch.equal(unscaled, nf4_solution(X))
    with pytest.raises(AssertionError, match="Divide by the block's absmax"):
        check_nf4_indices(unscaled, X)


def test_nf4_accepts_the_reference_solution():
    assert check_nf4_indices(nf4_solution(X), X) is True


# ---------------------------------------------------------------- 05: early stopping

EVALS = [{"step": 10, "val_loss": 1.0}, {"step": 20, "val_loss": 0.8}, {"step": 30, "val_loss": 0.85},
         {"step": 40, "val_loss": 0.9}, {"step": 50, "val_loss": 0.7}]


def early_stop_solution(evals: list[dict], patience: int) -> int | None:
    best, bad, stop_step = float("inf"), 0, None
    for h in evals:
        if h["val_loss"] < best:
            best, bad = h["val_loss"], 0
        else:
            bad += 1
            if bad == patience:
                stop_step = h["step"]
                break
    return stop_step


def test_early_stop_blank_returns_false_and_says_not_answered(capsys):
    assert check_early_stop(..., EVALS, patience=2) is False
    assert says_not_answered(capsys)


def test_early_stop_rejects_the_step_of_the_best_loss_and_explains_the_counter():
    with pytest.raises(AssertionError, match="reset the counter"):
        check_early_stop(20, EVALS, patience=2)


def test_early_stop_accepts_the_reference_solution():
    assert early_stop_solution(EVALS, 2) == 40
    assert check_early_stop(early_stop_solution(EVALS, 2), EVALS, patience=2) is True


# ---------------------------------------------------------------- 06: the DPO loss of one pair

LOGPS = {"policy_chosen": -12.0, "policy_rejected": -15.0, "ref_chosen": -13.0, "ref_rejected": -14.0}
BETA = 0.1


def dpo_solution(four: dict[str, float], beta: float) -> tuple[float, float]:
    margin = beta * ((four["policy_chosen"] - four["ref_chosen"]) - (four["policy_rejected"] - four["ref_rejected"]))
    return -math.log(1 / (1 + math.exp(-margin))), margin


def test_dpo_blank_returns_false_and_says_not_answered(capsys):
    assert check_dpo_pair(..., ..., LOGPS, beta=BETA) is False
    assert says_not_answered(capsys)


def test_dpo_rejects_a_margin_without_beta_and_explains_the_implicit_reward():
    loss, margin = dpo_solution(LOGPS, 1.0)
    with pytest.raises(AssertionError, match="implicit reward"):
        check_dpo_pair(loss, margin, LOGPS, beta=BETA)


def test_dpo_rejects_a_loss_of_minus_sigmoid_and_names_the_log():
    _, margin = dpo_solution(LOGPS, BETA)
    with pytest.raises(AssertionError, match="-log sigmoid"):
        check_dpo_pair(-1 / (1 + math.exp(-margin)), margin, LOGPS, beta=BETA)


def test_dpo_accepts_the_reference_solution():
    assert check_dpo_pair(*dpo_solution(LOGPS, BETA), LOGPS, beta=BETA) is True


# ---------------------------------------------------------------- 07: Cohen's kappa

JUDGE = ["yes", "yes", "no", "yes", "no", "yes"]
TRUTH = ["yes", "no", "no", "yes", "yes", "yes"]


def kappa_solution(judge_says: list[str], truth: list[str]) -> float:
    n = len(truth)
    p_o = sum(a == b for a, b in zip(judge_says, truth)) / n
    p_e = sum((judge_says.count(c) / n) * (truth.count(c) / n) for c in ["yes", "no"])
    return (p_o - p_e) / (1 - p_e)


def test_kappa_blank_returns_false_and_says_not_answered(capsys):
    assert check_kappa(..., JUDGE, TRUTH) is False
    assert says_not_answered(capsys)


def test_kappa_checker_rejects_raw_agreement_and_says_how_to_fix_it():
    with pytest.raises(AssertionError, match="p_e"):
        check_kappa(4 / 6, JUDGE, TRUTH)


def test_kappa_checker_accepts_cohens_kappa():
    assert check_kappa(cohen_kappa(JUDGE, TRUTH), JUDGE, TRUTH) is True


def test_kappa_accepts_the_reference_solution():
    assert check_kappa(kappa_solution(JUDGE, TRUTH), JUDGE, TRUTH) is True


# ---------------------------------------------------------------- 02: distinct-n of a list of tickets

from labkit.checks import check_distinct_n  # noqa: E402  (appended with its exercise)

TICKETS = ["My parcel is late. My parcel is lost!", "my parcel is LATE", "The kettle leaks."]


def distinct_n_solution(texts: list[str], n: int) -> float:
    grams = [tuple(words[i : i + n]) for words in (normalise(t).split() for t in texts)
             for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams)


def test_distinct_n_blank_returns_false_and_says_not_answered(capsys):
    assert check_distinct_n(..., TICKETS, 2) is False
    assert says_not_answered(capsys)


def test_distinct_n_rejects_n_grams_across_tickets_and_says_to_stay_inside_one():
    joined = distinct_n_solution([" ".join(TICKETS)], 2)  # one long text: n-grams that cross two tickets
    with pytest.raises(AssertionError, match="never across"):
        check_distinct_n(joined, TICKETS, 2)


def test_distinct_n_rejects_unnormalised_text():
    raw = [tuple(t.split()[i : i + 2]) for t in TICKETS for i in range(len(t.split()) - 1)]
    with pytest.raises(AssertionError, match="Normalise each ticket"):
        check_distinct_n(len(set(raw)) / len(raw), TICKETS, 2)


def test_distinct_n_accepts_the_reference_solution():
    assert check_distinct_n(distinct_n_solution(TICKETS, 2), TICKETS, 2) is True
