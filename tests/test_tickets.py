import random

from labkit.tickets import FIELDS, field_matches, follows_schema, is_valid, make_ticket, parse_triage, to_json

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


def test_generated_ticket_mentions_its_order_id_and_product():
    rng = random.Random(1)
    for _ in range(200):
        t = make_ticket(rng)
        assert is_valid(t.label)
        if t.label["order_id"]:
            assert t.label["order_id"] in t.text
        if t.label["product"]:
            assert t.label["product"] in t.text
