import json
import random

import pytest

from labkit import LabkitError
from labkit.tickets import (
    CATEGORIES,
    FIELDS,
    PRIORITIES,
    PRODUCTS,
    SYSTEM_PROMPT,
    balanced_shots,
    field_matches,
    follows_schema,
    is_valid,
    make_ticket,
    parse_triage,
    product_reference,
    to_json,
    typo,
)

GOLD = {"category": "billing", "priority": "high", "sentiment": "negative", "product": None, "order_id": "ORD-12345"}


def test_canonical_json_has_fields_in_order():
    assert to_json(GOLD) == (
        '{"category": "billing", "priority": "high", "sentiment": "negative", "product": null, "order_id": "ORD-12345"}'
    )


def test_parse_takes_the_first_json_object_in_chatter():
    assert parse_triage("Sure! " + to_json(GOLD) + " Anything else?") == GOLD


def test_parse_returns_none_for_broken_json():
    assert parse_triage('{"category": "billing", "priority"') is None
    assert parse_triage("no json here") is None


def test_valid_requires_exact_fields_and_known_labels():
    assert is_valid(GOLD)
    assert not is_valid({**GOLD, "category": "delivery"})
    assert not is_valid({k: GOLD[k] for k in FIELDS[:-1]})
    assert not is_valid({**GOLD, "product": "Banana Phone"})


def test_schema_compliance_allows_unknown_labels_but_not_missing_fields():
    assert follows_schema({**GOLD, "category": "delivery"})
    assert not follows_schema({k: GOLD[k] for k in FIELDS[:-1]})
    assert not follows_schema({**GOLD, "priority": 3})


def test_field_matches_counts_each_field_and_missing_as_wrong():
    pred = {"category": "billing", "priority": "low"}
    assert field_matches(pred, GOLD) == {
        "category": True, "priority": False, "sentiment": False, "product": False, "order_id": False,
    }
    assert not any(field_matches(None, GOLD).values())


def test_generated_ticket_holds_its_order_number_and_a_catalogue_product():
    rng = random.Random(1)
    for _ in range(300):
        t = make_ticket(rng)
        assert is_valid(t.label)
        if t.label["order_id"]:
            assert t.label["order_id"].startswith("ORD-") and t.label["order_id"][4:] in t.text
        assert t.label["product"] is None or t.label["product"] in PRODUCTS


def test_generator_is_reproducible_from_its_seed():
    a, b = random.Random(7), random.Random(7)
    assert [make_ticket(a).text for _ in range(50)] == [make_ticket(b).text for _ in range(50)]


def test_product_references_vary_in_case_and_form():
    rng = random.Random(0)
    refs = {product_reference(rng, "Aurora Kettle").split(" ", 1)[1].removeprefix("new ") for _ in range(300)}
    assert {"Aurora Kettle", "aurora kettle", "AURORA KETTLE", "kettle"} <= refs
    assert {"Aurora", "aurora"} & refs  # the first word alone


def test_typo_changes_one_letter_and_keeps_the_ends():
    rng = random.Random(0)
    for _ in range(50):
        w = typo(rng, "delivery")
        assert w[0] == "d" and w[-1] == "y" and abs(len(w) - 8) <= 1


def _shot(i: int, category: str, priority: str, sentiment: str = "neutral") -> dict:
    label = {"category": category, "priority": priority, "sentiment": sentiment, "product": None, "order_id": None}
    return {"id": f"x-{i}", "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                                         {"role": "user", "content": f"ticket {i}"},
                                         {"role": "assistant", "content": json.dumps(label)}]}


def test_balanced_shots_cover_every_category_and_priority():
    pool = [_shot(i, c, p) for i, (c, p) in enumerate((c, p) for p in PRIORITIES for c in CATEGORIES for _ in range(2))]
    pool = [_shot(100 + i, "billing", "high") for i in range(20)] + pool  # the first rows are all billing/high
    shots = balanced_shots(pool, 6)
    labels = [json.loads(s["messages"][-1]["content"]) for s in shots]
    assert {l["category"] for l in labels} == set(CATEGORIES)
    assert {l["priority"] for l in labels} == set(PRIORITIES)
    assert len({s["id"] for s in shots}) == 6


def test_balanced_shots_rejects_k_larger_than_the_pool():
    with pytest.raises(LabkitError, match="k=4"):
        balanced_shots([_shot(0, "billing", "low")], 4)


def test_one_family_tickets_are_plain_emails_with_catalogue_names():
    from labkit.tickets import ISSUES, PRODUCTS, label_of, one_family_examples

    examples = one_family_examples(60, avoid=[])
    assert len({ex["messages"][1]["content"] for ex in examples}) == 60
    for ex in examples:
        text, label = ex["messages"][1]["content"], label_of(ex)
        assert not text.startswith(("Subject:", "hi ", "hey ")), text
        if label["product"]:
            assert label["product"] in text and label["product"] in PRODUCTS
        if label["order_id"]:
            assert label["order_id"] in text
    assert one_family_examples(60, avoid=[]) == examples  # seeded


def test_one_family_tickets_avoid_the_given_examples():
    from labkit.tickets import one_family_examples

    first = one_family_examples(5, avoid=[])
    assert not set(map(str, one_family_examples(5, avoid=first[:2]))) & set(map(str, first[:2]))
