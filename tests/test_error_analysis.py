"""labkit.error_analysis: confusion per field, hallucinated values, accuracy by length, the golden regression check."""

import json

import pytest

from labkit import LabkitError
from labkit.data import load_split
from labkit.error_analysis import (
    INVALID,
    accuracy_by_length,
    check_golden,
    confusion,
    golden_failures,
    hallucinations,
    most_confused,
    plot_confusion,
)
from labkit.tickets import SYSTEM_PROMPT, label_of, to_json

pytestmark = pytest.mark.usefixtures("one_thread")


def label(category="billing", priority="medium", sentiment="neutral", product=None, order_id=None) -> dict:
    """A triage label with defaults for the fields a test does not care about."""
    return {"category": category, "priority": priority, "sentiment": sentiment, "product": product, "order_id": order_id}


def example(idx: str, text: str, gold: dict) -> dict:
    """A chat example as the data files hold them."""
    return {"id": idx, "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text},
                                    {"role": "assistant", "content": to_json(gold)}]}


# ---------------------------------------------------------------- confusion


def test_confusion_counts_gold_rows_against_predicted_columns():
    golds = [label(priority="high"), label(priority="high"), label(priority="low")]
    replies = [to_json(label(priority="high")), to_json(label(priority="medium")), to_json(label(priority="low"))]
    labels, matrix = confusion(replies, golds, "priority")
    assert labels == ["low", "medium", "high"]
    assert matrix.tolist() == [[1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 1, 0]]


def test_confusion_counts_unparsable_missing_and_unknown_values_as_invalid():
    replies = ["not json", '{"category": "billing"}', to_json(label(priority="urgent"))]
    _, matrix = confusion(replies, [label(priority="high")] * 3, "priority")
    assert matrix[2, -1] == 3 and matrix.sum() == 3


def test_confusion_of_product_has_a_null_label():
    labels, matrix = confusion([to_json(label(product=None))], [label(product="Zephyr Fan")], "product")
    assert labels[-1] == "null" and matrix[labels.index("Zephyr Fan"), labels.index("null")] == 1


def test_confusion_rejects_a_free_text_field():
    with pytest.raises(LabkitError, match="order_id"):
        confusion([], [], "order_id")


def test_most_confused_lists_the_largest_mistakes_first_across_fields():
    golds = [label(category="returns", sentiment="negative")] * 3
    replies = [to_json(label(category="shipping", sentiment="negative"))] * 2 + ["{}"]
    assert most_confused(replies, golds, k=2) == [("category", "returns", "shipping", 2),
                                                  ("category", "returns", INVALID, 1)]


def test_plot_confusion_draws_one_matrix_per_field():
    import matplotlib.pyplot as plt

    fig = plot_confusion([to_json(label())], [label()], fields=["category", "product"])
    assert [ax.get_title() for ax in fig.axes] == ["category", "product"]
    plt.close(fig)


# ---------------------------------------------------------------- hallucinations


def test_hallucinations_flag_values_outside_the_allowed_sets():
    reply = json.dumps(label(category="refund", product="Aurora Toaster"))
    found = hallucinations([reply], [example("t-1", "My toaster broke.", label())])
    assert [(h["id"], h["field"], h["problem"]) for h in found] == [
        ("t-1", "category", "not an allowed label"), ("t-1", "product", "not an allowed product")]


def test_hallucinations_flag_a_product_the_ticket_does_not_name():
    found = hallucinations([to_json(label(product="Nimbus Router"))], ["The kettle leaks."])
    assert found == [{"id": 0, "field": "product", "value": "Nimbus Router", "problem": "not in the ticket"}]


def test_hallucinations_accept_a_product_named_by_brand_type_or_in_any_case():
    tickets = ["the AURORA won't boil", "my new kettle leaks", "hi, the desk lamp flickers", "aurora ketlte broke"]
    products = ["Aurora Kettle", "Aurora Kettle", "Cedar Desk Lamp", "Aurora Kettle"]
    assert hallucinations([to_json(label(product=p)) for p in products], tickets) == []


def test_hallucinations_flag_an_invented_order_id_but_accept_any_written_form():
    tickets = ["order ord 12345 is late", "It was order #12345.", "order ORD12345", "my case number is 555"]
    replies = [to_json(label(order_id="ORD-12345"))] * 3 + [to_json(label(order_id="ORD-55555"))]
    assert [(h["id"], h["problem"]) for h in hallucinations(replies, tickets)] == [(3, "not in the ticket")]


def test_hallucinations_flag_an_order_id_in_the_wrong_format():
    found = hallucinations([to_json(label(order_id="12345"))], ["order 12345"])
    assert [h["problem"] for h in found] == ["not in the ORD-12345 format"]


def test_hallucinations_skip_replies_that_are_not_json():
    assert hallucinations(["I think it is billing"], ["text"]) == []


def test_gold_answers_of_the_data_files_are_never_hallucinated():
    examples = load_split("train")[:300] + load_split("test")[:100]
    assert hallucinations([to_json(label_of(ex)) for ex in examples], examples) == []


# ---------------------------------------------------------------- accuracy by length


def test_accuracy_by_length_scores_each_bin():
    golds = [label(), label(), label(), label()]
    replies = [to_json(label()), to_json(label()), to_json(label(priority="high")), "oops"]
    table = accuracy_by_length(replies, golds, [10, 20, 300, 400], bins=[0, 100, 1000])
    assert table["n"].tolist() == [2, 2]
    assert table["field_acc"].tolist() == pytest.approx([1.0, 0.4])  # (4/5 + 0) / 2
    assert table["json_valid"].tolist() == [1.0, 0.5]
    assert list(table.index) == ["[0, 100)", "[100, 1000]"]


def test_accuracy_by_length_rejects_a_length_outside_the_bins():
    with pytest.raises(LabkitError, match=r"length 5000 \(item 0\)"):
        accuracy_by_length([to_json(label())], [label()], [5000], bins=[0, 100])


# ---------------------------------------------------------------- golden regression suite

GOLDEN = [example("gold-01", "URGENT: my Nimbus router is down", label("technical", "high", product="Nimbus Router")),
          example("gold-02", "Where is order ORD-11111? No rush.", label("shipping", "low", order_id="ORD-11111"))]


def answer_key(conversations: list[list[dict]]) -> list[str]:
    """A fake generate function that knows the golden answers (looked up by ticket text)."""
    answers = {ex["messages"][1]["content"]: ex["messages"][2]["content"] for ex in GOLDEN}
    return [answers[c[-1]["content"]] for c in conversations]


def test_check_golden_passes_when_every_field_is_right():
    check_golden(answer_key, GOLDEN)
    assert golden_failures(answer_key, GOLDEN) == []


def test_check_golden_names_each_failing_ticket_and_field():
    def lazy(conversations):
        return [to_json(label("technical", "medium", product="Nimbus Router"))] * len(conversations)

    with pytest.raises(LabkitError) as error:
        check_golden(lazy, GOLDEN)
    message = str(error.value)
    assert message.startswith("2 of 2 golden tickets failed")
    assert "gold-01: priority is 'medium', expected 'high'" in message
    assert "gold-02: category is 'technical', expected 'shipping'" in message
    assert "gold-02: order_id is None, expected 'ORD-11111'" in message


def test_check_golden_reports_a_reply_that_is_not_json():
    failures = golden_failures(lambda convs: ["sorry, no idea"] * len(convs), GOLDEN[:1])
    assert failures == ["gold-01: reply is not a JSON object ('sorry, no idea')"]


def test_check_golden_can_check_only_some_fields():
    def wrong_sentiment(conversations):
        return [json.dumps({**json.loads(a), "sentiment": "positive"}) for a in answer_key(conversations)]

    check_golden(wrong_sentiment, GOLDEN, fields=["category", "priority", "product", "order_id"])


def test_check_golden_needs_the_tokenizer_of_a_model():
    import torch

    with pytest.raises(LabkitError, match="tokenizer"):
        check_golden(torch.nn.Linear(2, 2), GOLDEN)  # any torch module counts as a model
