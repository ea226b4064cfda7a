import json
import re
from pathlib import Path

import pytest

from labkit.data import read_jsonl
from labkit.datagen import SPLIT_SIZES, generate_all
from labkit.paths import data_dir
from labkit.tickets import PRODUCTS, is_valid, label_of, normalise

DATA = data_dir()  # the committed data/, or $LABKIT_DATA (e.g. freshly generated files before they are committed)
CARD = Path(__file__).resolve().parent.parent / "data" / "README.md"


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    return generate_all(tmp_path_factory.mktemp("data"))


def test_generator_reproduces_committed_files_byte_for_byte(regenerated):
    for path in regenerated.values():
        assert path.read_bytes() == (DATA / path.name).read_bytes(), path.name


@pytest.mark.parametrize("split", list(SPLIT_SIZES))
def test_split_sizes_are_80_10_10(split):
    assert len(read_jsonl(DATA / f"{split}.jsonl")) == SPLIT_SIZES[split]


@pytest.mark.parametrize("split", list(SPLIT_SIZES))
def test_every_example_is_system_user_assistant_with_a_valid_label(split):
    for ex in read_jsonl(DATA / f"{split}.jsonl"):
        assert [m["role"] for m in ex["messages"]] == ["system", "user", "assistant"]
        assert is_valid(label_of(ex))


def test_no_test_ticket_appears_in_train_or_validation():
    def texts(split):
        return [ex["messages"][1]["content"] for ex in read_jsonl(DATA / f"{split}.jsonl")]

    test = texts("test")
    others = texts("train") + texts("validation")
    assert not set(test) & set(others)
    assert not {normalise(t) for t in test} & {normalise(t) for t in others}


def test_raw_manifest_lists_every_planted_problem():
    manifest = json.loads((DATA / "raw_manifest.json").read_text())
    counts = {kind: len(entries) for kind, entries in manifest.items()}
    assert counts == {
        "exact_duplicate": 20, "near_duplicate_surface": 10, "near_duplicate_word": 10,
        "contradiction": 10, "empty": 6, "malformed": 8, "test_leak": 12,
    }
    n_lines = len((DATA / "raw_tickets.jsonl").read_text(encoding="utf-8").splitlines())
    assert n_lines == 400 + sum(counts.values())


def test_preference_pairs_differ_only_in_greeting_the_customer_by_name():
    for pair in read_jsonl(DATA / "preferences_train.jsonl") + read_jsonl(DATA / "preferences_test.jsonl"):
        name = pair["customer_name"]
        chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        assert name in pair["prompt"][-1]["content"]
        assert name in chosen.split(",")[0] and name not in rejected
        assert chosen.split(",", 1)[1] == rejected.split(",", 1)[1]


def test_probe_set_has_questions_with_answers():
    probes = read_jsonl(DATA / "probes.jsonl")
    assert len(probes) == 120
    assert all(p["question"].strip() and p["answers"] for p in probes)
    assert len({p["question"] for p in probes}) == len(probes)


def test_general_prompts_ask_nothing_a_probe_asks():
    from labkit.datagen import GENERAL_PROMPTS

    general = [r["prompt"] for r in read_jsonl(DATA / "general_prompts.jsonl")]
    assert general == GENERAL_PROMPTS and len(set(general)) == 80
    probe_kinds = ["capital", "+", "minus", "times", "divided", "opposite", "color", "colour", "translate", "how many"]
    assert not [g for g in general if any(k in g.lower() for k in probe_kinds)]


def test_data_card_states_the_current_label_distribution():
    from labkit.datagen import distribution_table

    assert distribution_table(DATA) in CARD.read_text(encoding="utf-8")


def test_training_tickets_write_products_and_order_ids_in_many_forms():
    texts = [ex["messages"][1]["content"] for ex in read_jsonl(DATA / "train.jsonl")]
    assert any(p.lower() in t for p in PRODUCTS for t in texts)  # lower case
    assert any(p.upper() in t for p in PRODUCTS for t in texts)  # ALL CAPS
    assert any(re.search(r"order (#|no\. )?\d{5}", t) for t in texts)  # order number without the ORD- prefix
    assert any(re.search(r"\bORD\d{5}|\bord-\d{5}", t) for t in texts)


# ---------------------------------------------------------------- the hand-written out-of-distribution set


def ood_tickets() -> list[dict]:
    return read_jsonl(DATA / "ood_tickets.jsonl")


def test_ood_set_has_at_least_60_chat_records():
    ood = ood_tickets()
    assert len(ood) >= 60
    assert all([m["role"] for m in ex["messages"]] == ["system", "user", "assistant"] for ex in ood)


def test_no_ood_ticket_appears_in_any_split():
    seen = {normalise(ex["messages"][1]["content"]) for s in SPLIT_SIZES for ex in read_jsonl(DATA / f"{s}.jsonl")}
    assert not {normalise(ex["messages"][1]["content"]) for ex in ood_tickets()} & seen


def test_every_ood_label_follows_the_data_card_rules():
    for ex in ood_tickets():
        answer, text = ex["messages"][2]["content"], ex["messages"][1]["content"]
        label = json.loads(answer)  # valid JSON
        assert is_valid(label), ex["id"]  # labels in their sets, product in the catalogue or null
        if label["order_id"] is not None:  # ORD- and 5 digits, and those digits are in the ticket
            assert re.fullmatch(r"ORD-\d{5}", label["order_id"]) and label["order_id"][4:] in text, ex["id"]


@pytest.mark.parametrize("name, kind", [("train", "chat"), ("validation", "chat"), ("test", "chat"),
                                        ("ood_tickets", "chat"), ("preferences_train", "pairs"),
                                        ("preferences_test", "pairs")])
def test_every_committed_training_file_passes_the_validator_training_runs(name, kind):
    from labkit.data import read_examples

    assert len(read_examples(DATA / f"{name}.jsonl", kind, max_length=256)) == len(read_jsonl(DATA / f"{name}.jsonl"))
