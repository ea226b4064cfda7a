"""Specifications of the knowledge experiment's pieces (labkit/knowledge.py): notebook 01 section 6."""

import pytest

from labkit.knowledge import (ATTRIBUTES, card, catalogue, change_policy, conversations, correct, questions, retrieve,
                              states, training_rows)


def test_the_catalogue_is_the_same_for_the_same_seed_and_differs_for_another():
    assert catalogue(12, seed=0) == catalogue(12, seed=0)
    assert catalogue(12, seed=0) != catalogue(12, seed=1)


def test_every_product_has_a_unique_name_and_one_allowed_value_per_attribute():
    items = catalogue(16)
    assert len({i["product"] for i in items}) == 16
    assert all(i[a] in spec["values"] for i in items for a, spec in ATTRIBUTES.items())


def test_a_catalogue_larger_than_the_name_list_is_refused():
    with pytest.raises(ValueError, match="n_products"):
        catalogue(17)


def test_attribute_values_are_disjoint_so_an_answer_names_the_fact_it_states():
    pools = [set(spec["values"]) for spec in ATTRIBUTES.values()]
    assert sum(len(p) for p in pools) == len(set().union(*pools))


def test_a_card_states_every_fact_of_its_product():
    item = catalogue(1)[0]
    assert card(item).startswith(item["product"] + ":")
    assert all(states(card(item), item[a]) for a in ATTRIBUTES)


def test_paraphrases_never_reuse_the_training_question():
    items = catalogue(4)
    seen = {q["question"] for q in questions(items, "train")}
    new = questions(items, "paraphrase")
    assert len(new) == 2 * len(seen) and not seen & {q["question"] for q in new}


def test_training_rows_answer_every_fact_in_the_training_words_and_recite_every_card():
    items = catalogue(3)
    rows = training_rows(items)
    assert len(rows) == 3 * len(ATTRIBUTES) + 3
    answers = [r["messages"][-1]["content"] for r in rows]
    assert all(r["messages"][-1]["role"] == "assistant" for r in rows)
    assert all(any(states(a, i[attr]) and i["product"] in a for a in answers) for i in items for attr in ATTRIBUTES)


@pytest.mark.parametrize("phrasing", ["train", "paraphrase"])
def test_the_retriever_finds_the_asked_products_card_for_every_question(phrasing):
    items = catalogue(16)
    cards = [card(i) for i in items]
    assert all(retrieve(q["question"], cards).startswith(q["product"] + ":") for q in questions(items, phrasing))


def test_a_rag_prompt_carries_the_retrieved_card_and_a_closed_book_prompt_does_not():
    items = catalogue(2)
    rows = questions(items, "paraphrase")[:1]
    cards = [card(i) for i in items]
    assert cards[0] in conversations(rows, cards)[0][-1]["content"]
    assert cards[0] not in conversations(rows)[0][-1]["content"]


def test_a_number_is_stated_only_as_a_whole_number():
    assert states("a 7-year warranty.", "7") and states("Within 45 days.", "45")
    assert not states("17 years", "7") and not states("7.5 years", "7") and not states("1.7", "7")


def test_an_answer_is_right_with_the_asked_value_and_wrong_with_another_value_or_a_recited_card():
    item = catalogue(1)[0]
    row = {"product": item["product"], "attribute": "warranty", "value": item["warranty"]}
    assert correct(f"It has a {item['warranty']}-year warranty.", row)
    other = next(v for v in ATTRIBUTES["warranty"]["values"] if v != item["warranty"])
    assert not correct(f"It has a {other}-year warranty.", row)
    assert not correct(card(item), row)  # states every fact: not an answer to one question


def test_a_policy_change_moves_every_value_of_that_attribute_and_nothing_else():
    items = catalogue(8)
    changed = change_policy(items, "returns")
    assert all(a["returns"] != b["returns"] for a, b in zip(items, changed))
    assert all({k: v for k, v in a.items() if k != "returns"} == {k: v for k, v in b.items() if k != "returns"}
               for a, b in zip(items, changed))
