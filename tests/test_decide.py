"""The decision helpers encode the seed articles' questions, tables and cost figures."""

import pytest

from labkit import LabkitError
from labkit.decide import (
    COMPARISON,
    DATASET_SIZING,
    FINE_TUNE,
    GPU_TIERS,
    METHODS,
    PROMPT,
    QUESTIONS,
    RAG,
    RAG_AND_FINE_TUNE,
    SIGNALS,
    api_cost,
    approach_for_signal,
    instruction_share,
    pick_method,
    prompt_too_heavy,
    recommend,
    training_cost,
    wizard,
)
from labkit.memory import MemoryBreakdown

# --- the ordered questions ------------------------------------------------------------------------


def test_questions_come_in_the_articles_order():
    assert [q.text for q in QUESTIONS] == [
        "Can I solve this with a better prompt?",
        "Does the model need knowledge it does not have?",
        "Do I need the model to behave differently at a fundamental level?",
        "Do I need both new knowledge and new behavior?",
    ]


def test_a_prompt_that_works_wins_before_any_other_question():
    rec = recommend(prompt_works=True, lacks_knowledge=True, needs_behaviour_change=True)
    assert rec.approach == PROMPT and len(rec.reasons) == 2


def test_missing_knowledge_alone_leads_to_rag():
    assert recommend(False, True, False).approach == RAG


def test_behaviour_change_alone_leads_to_fine_tuning():
    assert recommend(False, False, True).approach == FINE_TUNE


def test_missing_knowledge_and_behaviour_lead_to_rag_plus_fine_tuning():
    assert recommend(False, True, True).approach == RAG_AND_FINE_TUNE


def test_no_need_for_knowledge_or_behaviour_stays_with_the_prompt():
    assert recommend(False, False, False).approach == PROMPT


def test_reasons_walk_the_questions_in_order():
    reasons = recommend(False, True, True).reasons
    assert [r.split("?")[0] + "?" for r in reasons[:4]] == [q.text for q in QUESTIONS]


def test_a_non_boolean_answer_is_rejected():
    with pytest.raises(LabkitError, match="True or False"):
        recommend("yes", False, False)


# --- signal -> approach (seed 003) ----------------------------------------------------------------

SIGNAL_CASES = [
    ("Model lacks domain-specific facts", "RAG"),
    ("Model has the knowledge but ignores your format requirements", "Fine-tuning"),
    ("Output is correct but too verbose or too casual", "Prompt engineering first; fine-tune if that fails"),
    ("You need sub-100ms latency and GPT-4 is too slow", "Fine-tune a smaller open-weight model"),
    ("You need strict JSON/structured output, consistently", "Fine-tuning"),
    ("Your use case involves documents that change weekly", "RAG (fine-tuning can't update knowledge cheaply)"),
    ("You need the model to follow a domain-specific reasoning chain", "Fine-tuning"),
]


@pytest.mark.parametrize("signal,approach", SIGNAL_CASES, ids=[row.key for row in SIGNALS])
def test_signal_table_row(signal, approach):
    assert approach_for_signal(signal) == approach


def test_signal_table_has_the_seven_rows_of_the_article():
    assert [(row.signal, row.approach) for row in SIGNALS] == SIGNAL_CASES


def test_a_signal_can_be_looked_up_by_its_short_key():
    assert approach_for_signal("weekly-docs").startswith("RAG")


def test_an_unknown_signal_lists_the_keys():
    with pytest.raises(LabkitError, match="lacks-facts"):
        approach_for_signal("model is slow on Mondays")


# --- five-dimension comparison, method table, sizing ----------------------------------------------

def test_comparison_covers_five_dimensions_for_three_approaches():
    assert list(COMPARISON) == ["setup cost", "inference latency", "knowledge freshness",
                                "output consistency", "ongoing maintenance"]
    assert all(set(row) == {PROMPT, RAG, FINE_TUNE} for row in COMPARISON.values())


def test_only_rag_keeps_knowledge_fresh_in_real_time():
    assert COMPARISON["knowledge freshness"][RAG] == "Real-time"


def test_method_table_has_full_lora_qlora_and_prompt_tuning():
    assert [m.name for m in METHODS] == ["Full FT", "LoRA", "QLoRA", "Prompt tuning"]


def test_pick_method_without_a_gpu_is_prompt_tuning():
    assert pick_method(1_000, 0, "7B").approach == "Prompt tuning"


def test_pick_method_with_under_50_examples_is_prompt_tuning():
    assert pick_method(30, 80, "7B").approach == "Prompt tuning"


def test_pick_method_large_dataset_and_room_is_full_fine_tuning():
    assert pick_method(100_000, 640, "7B").approach == "Full FT"


def test_pick_method_small_dataset_that_fits_in_16_bit_is_lora():
    assert pick_method(1_000, 24, 7e9).approach == "LoRA"


def test_pick_method_8b_on_a_16_gb_gpu_is_qlora():
    assert pick_method(1_000, 16, "8B").approach == "QLoRA"


def test_pick_method_says_when_nothing_fits():
    rec = pick_method(1_000, 8, "70B")
    assert rec.approach == "none fits" and "QLoRA needs" in " ".join(rec.reasons)


def test_dataset_sizing_heuristics_of_seed_002():
    assert [(r.task, r.min_examples, r.max_examples) for r in DATASET_SIZING] == [
        ("classification/extraction", 500, 2_000),
        ("style/format transfer", 1_000, 5_000),
        ("domain adaptation", 10_000, None),
        ("instruction following (general)", None, 50_000),
    ]


# --- the 40 % instruction-token rule ---------------------------------------------------------------

def test_instruction_share_is_instructions_over_all_prompt_tokens():
    assert instruction_share(300, 700) == pytest.approx(0.3)


def test_exactly_40_percent_instructions_is_not_too_heavy():
    assert not prompt_too_heavy(0.40)


def test_above_40_percent_instructions_is_too_heavy():
    assert prompt_too_heavy(instruction_share(410, 590))


def test_negative_token_count_is_rejected():
    with pytest.raises(LabkitError, match=">= 0"):
        instruction_share(-1, 10)


def test_share_outside_0_1_is_rejected():
    with pytest.raises(LabkitError, match="instruction_share"):
        prompt_too_heavy(40)


# --- costs (seed 004) -----------------------------------------------------------------------------

COST_ROWS = [
    ("7-8B", "lora", "1x A100 40GB", (1, 2), (2, 4)),
    ("7-8B", "qlora", "1x A10G 24GB", (2, 3), (2, 3)),
    ("7-8B", "full", "2x A100 80GB", (4, 8), (24, 48)),
    ("13B", "lora", "1x A100 80GB", (2, 4), (6, 12)),
    ("70B", "qlora", "1x A100 80GB", (8, 16), (24, 48)),
    ("70B", "lora", "4x A100 80GB", (4, 8), (48, 96)),
    ("70B", "full", "8x A100 80GB", (24, 48), (576, 1_152)),
]


@pytest.mark.parametrize("size,method,gpu,hours,dollars", COST_ROWS, ids=[f"{r[0]}-{r[1]}" for r in COST_ROWS])
def test_cost_table_row_for_1k_examples(size, method, gpu, hours, dollars):
    cost = training_cost(size, method, 1_000)
    assert (cost.tier.gpu, cost.hours, cost.dollars) == (gpu, hours, dollars)


def test_cost_table_has_the_seven_rows_of_the_article():
    assert len(GPU_TIERS) == 7


def test_cost_scales_linearly_with_examples_and_says_so():
    cost = training_cost("8B", "lora", 5_000)
    assert cost.hours == (5, 10) and cost.dollars == (10, 20) and "linearly" in cost.note


def test_cost_comes_with_a_memory_estimate_that_fits_the_tier():
    cost = training_cost("7B", "qlora", 1_000)
    assert isinstance(cost.memory, MemoryBreakdown) and cost.fits


def test_70b_full_fine_tuning_outgrows_the_tables_8_a100s_at_18_bytes_per_parameter():
    # 70.6B x 18 bytes is ~1.27 TB > 640 GB: the table's row needs offloading or a leaner optimizer.
    assert not training_cost("70B", "full", 1_000).fits


def test_a_combination_missing_from_the_table_lists_the_rows():
    with pytest.raises(LabkitError, match="70B/qlora"):
        training_cost("13B", "full", 1_000)


@pytest.mark.parametrize("provider,dollars", [
    ("bedrock", (8, 12)), ("vertex", (5, 10)), ("azure", (6, 15)), ("openai", (25, 25)),
])
def test_api_cost_per_million_training_tokens(provider, dollars):
    assert api_cost(1_000_000, provider) == dollars


def test_api_cost_scales_with_tokens():
    assert api_cost(3_000_000, "AWS") == (24, 36)


def test_unknown_api_provider_lists_the_known_ones():
    with pytest.raises(LabkitError, match="bedrock"):
        api_cost(1_000_000, "acme")


# --- the widget -----------------------------------------------------------------------------------

def test_wizard_starts_at_the_prompt_recommendation():
    assert wizard().result.approach == PROMPT


def test_wizard_recommends_what_recommend_does_when_boxes_are_ticked():
    ui = wizard()
    ui.children[1].value = True  # lacks knowledge
    ui.children[2].value = True  # needs behaviour change
    assert ui.result == recommend(False, True, True)


def test_wizard_boxes_are_the_first_three_questions_in_order():
    assert [box.description for box in wizard().children[:3]] == [q.text for q in QUESTIONS[:3]]
