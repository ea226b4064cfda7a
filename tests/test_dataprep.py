"""Specifications of labkit.dataprep: validation, cleaning, decontamination and splits."""

import json

import pytest

from labkit import LabkitError
from labkit.data import read_jsonl
from labkit.dataprep import (
    DataError, careless_records, clean, compare_with_manifest, detect_format, find_test_leaks, load_jsonl,
    nearest_jaccard, nested_subsets, stratified_split, to_instruction, to_messages, validate_lines,
)
from labkit.paths import data_dir

GOOD = {"messages": [{"role": "system", "content": "Triage the support ticket. Reply with JSON only."},
                     {"role": "user", "content": "My invoice shows the wrong amount."},
                     {"role": "assistant", "content": json.dumps({"category": "billing", "priority": "low", "sentiment": "neutral", "product": None, "order_id": None})}]}


@pytest.fixture(scope="module")
def cleaned():
    test = read_jsonl(data_dir() / "test.jsonl")
    return clean(data_dir() / "raw_tickets.jsonl", test), test


def write(tmp_path, lines, name="f.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_validator_finds_every_planted_problem_per_category(cleaned):
    (_, report), _ = cleaned
    manifest = json.loads((data_dir() / "raw_manifest.json").read_text())
    for kind, row in compare_with_manifest(report.problems, manifest).items():
        assert row["matched"] == row["planted"] and row["extra"] == 0, (kind, row)


def test_malformed_line_reported_with_its_line_number_and_scan_continues(tmp_path):
    path = write(tmp_path, [json.dumps(GOOD), '{"messages": [', json.dumps(GOOD), '{"messages": "x"}'])
    good, problems = validate_lines(path)
    assert [n for n, _ in good] == [1, 3]
    assert [p.line for p in problems] == [2, 4]


@pytest.mark.parametrize("record, field", [
    ({"messages": [{"role": "user", "content": 42}, GOOD["messages"][2]]}, "messages[0].content"),
    ({"messages": [{"content": "hi"}, GOOD["messages"][2]]}, "messages[0].role"),
    ({"messages": [GOOD["messages"][1], {"role": "assistant", "content": " "}]}, "messages[1].content"),
    ({"text": "hello"}, "format"),
])
def test_bad_record_gives_one_problem_naming_its_field(tmp_path, record, field):
    _, problems = validate_lines(write(tmp_path, [json.dumps(record)]))
    assert len(problems) == 1 and problems[0].field == field and problems[0].fix


def test_zero_byte_file_gives_one_clear_problem(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    _, problems = validate_lines(path)
    assert len(problems) == 1 and "empty" in problems[0].message


def test_non_utf8_file_reports_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + '{"messages": "caf\xe9"}'.encode("latin-1") + b"\n")
    _, problems = validate_lines(path)
    assert [(p.line, p.field) for p in problems] == [(2, "encoding")]


def test_load_raises_one_labkit_error_listing_file_line_and_fix(tmp_path):
    path = write(tmp_path, ['{"messages": [', json.dumps(GOOD), "[1, 2]"], name="bad.jsonl")
    with pytest.raises(DataError) as err:
        load_jsonl(path)
    assert isinstance(err.value, LabkitError)
    lines = str(err.value).splitlines()
    assert lines[1].startswith("bad.jsonl:1:json:") and "Fix:" in lines[1]
    assert lines[2].startswith("bad.jsonl:3:format:")


def test_formats_are_detected_and_converted_both_ways():
    alpaca = to_instruction(GOOD)
    assert detect_format(alpaca) == "instruction" and detect_format(GOOD) == "messages"
    back = to_messages(alpaca)
    assert back["messages"][-1] == GOOD["messages"][-1]
    assert detect_format({"prompt": "a", "chosen": "b", "rejected": "c"}) == "preference"
    assert detect_format({"prompt": "a", "completion": "b"}) == "completion"


def test_decontamination_removes_every_planted_leak(cleaned):
    (kept, report), test = cleaned
    manifest = json.loads((data_dir() / "raw_manifest.json").read_text())
    assert {p.line for p in report.problems if p.kind == "test_leak"} == {e["line"] for e in manifest["test_leak"]}
    assert find_test_leaks(list(enumerate(kept, 1)), test) == []


def test_leak_check_skips_a_record_without_a_user_turn(cleaned):
    _, test = cleaned
    no_user = {"messages": [{"role": "customer", "content": test[0]["messages"][1]["content"]}, test[0]["messages"][2]]}
    assert [p.line for p in find_test_leaks([(1, no_user), (2, test[0])], test)] == [2]


def test_clean_set_has_no_duplicate_prompts(cleaned):
    (kept, report), _ = cleaned
    from labkit.dataprep import prompt_key
    keys = [prompt_key(r) for r in kept]
    assert len(keys) == len(set(keys)) == report.kept


def test_stratified_split_keeps_label_mix_and_shares_no_prompt(cleaned):
    (kept, _), _ = cleaned
    from labkit.dataprep import prompt_key
    train, val, test = stratified_split(kept, (0.8, 0.1, 0.1))
    assert len(train) + len(val) + len(test) == len(kept)
    assert not {prompt_key(r) for r in train} & {prompt_key(r) for r in test}
    cats = {json.loads(r["messages"][-1]["content"])["category"] for r in test}
    assert len(cats) == 5 and 0.07 < len(test) / len(kept) < 0.13


def contradict(record, category="shipping"):
    answer = {**json.loads(record["messages"][-1]["content"]), "category": category}
    return {"messages": record["messages"][:-1] + [{"role": "assistant", "content": json.dumps(answer)}]}


def test_careless_reader_keeps_duplicates_contradictions_and_broken_answers(tmp_path):
    broken = {"messages": GOOD["messages"][:-1] + [{"role": "assistant", "content": '{"category": "bil'}]}
    lines = [json.dumps(r) for r in (GOOD, GOOD, contradict(GOOD), broken)]
    assert careless_records(write(tmp_path, lines)) == [GOOD, GOOD, contradict(GOOD), broken]


def test_careless_reader_skips_only_lines_the_chat_template_cannot_render(tmp_path):
    unrenderable = ['{"messages": [', '{"messages": "hi"}', '{"messages": []}',
                    json.dumps({"messages": [{"role": "user", "content": 42}]}),
                    json.dumps({"messages": [{"content": "no role"}]})]
    assert careless_records(write(tmp_path, [*unrenderable, json.dumps(GOOD)])) == [GOOD]


def test_careless_reader_keeps_470_of_the_476_raw_lines():
    # only the truncated line, `messages` as a string, content 42, a missing role and two empty lists go
    assert len(careless_records(data_dir() / "raw_tickets.jsonl")) == 470


def labelled(category, i):
    answer = {"category": category, "priority": "low", "sentiment": "neutral", "product": None, "order_id": None}
    return {"messages": [{"role": "user", "content": f"ticket {i}"}, {"role": "assistant", "content": json.dumps(answer)}]}


RECORDS = [labelled(c, i) for i in range(20) for c in ("billing", "billing", "billing", "account", "returns")]


def test_nested_subsets_each_larger_set_contains_the_smaller_one():
    subsets = nested_subsets(RECORDS, [5, 10, 40])
    assert [len(s) for s in subsets.values()] == [5, 10, 40]
    assert subsets[10][:5] == subsets[5] and subsets[40][:10] == subsets[10]


def test_nested_subsets_let_every_label_take_turns():
    category = lambda r: json.loads(r["messages"][-1]["content"])["category"]
    assert sorted(map(category, nested_subsets(RECORDS, [6])[6])) == ["account", "account", "billing", "billing", "returns", "returns"]


def test_nested_subsets_refuse_more_records_than_there_are():
    with pytest.raises(DataError, match="only 100"):
        nested_subsets(RECORDS, [10, 101])


def _ticket(text: str) -> dict:
    return {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": text},
                         {"role": "assistant", "content": "{}"}]}


def test_nearest_jaccard_is_one_for_a_copy_and_zero_for_no_shared_trigram():
    reference = [_ticket("my order never arrived at all"), _ticket("please reset my password now")]
    copy_, unrelated = _ticket("My order never arrived at all!"), _ticket("the lamp flickers when dimmed")
    assert nearest_jaccard([copy_, unrelated], reference) == [1.0, 0.0]


def test_nearest_jaccard_equals_brute_force_over_all_references():
    from labkit.dataprep import jaccard, shingles

    reference = [_ticket(t) for t in ["a b c d e", "c d e f g", "x y z a b c"]]
    query = _ticket("a b c d e f g")
    brute = max(jaccard(shingles("a b c d e f g"), shingles(r["messages"][1]["content"])) for r in reference)
    assert nearest_jaccard([query], reference) == [brute]


def test_mixing_in_general_rows_makes_up_the_requested_share():
    from labkit.dataprep import chat_rows, mix_in

    task = [{"messages": [{"role": "user", "content": f"t{i}"}]} for i in range(85)]
    general = chat_rows(["g1", "g2"], ["r1", "r2"])
    mixed = mix_in(task, general, share=0.15, seed=0)
    n_general = sum(row in general for row in mixed)
    assert n_general == 15 and len(mixed) == 100
    assert mix_in(task, general, share=0.15, seed=0) == mixed  # seeded


def test_mixing_in_refuses_a_share_outside_zero_and_one():
    from labkit.dataprep import chat_rows, mix_in

    with pytest.raises(ValueError, match="share"):
        mix_in([], chat_rows(["g"], ["r"]), share=1.5)


def test_chat_rows_pair_each_prompt_with_its_reply():
    from labkit.dataprep import chat_rows

    assert chat_rows(["hi"], ["hello"]) == [{"messages": [{"role": "user", "content": "hi"},
                                                          {"role": "assistant", "content": "hello"}]}]


def test_preference_pairs_are_validated_too(tmp_path):
    pair = read_jsonl(data_dir() / "preferences_train.jsonl")[0]
    bad = [{**pair, "chosen": "Hi"}, {**pair, "rejected": pair["chosen"]}, {**pair, "prompt": pair["prompt"][:1]}]
    good, problems = validate_lines(write(tmp_path, [json.dumps(r) for r in [pair, *bad]]))
    assert [n for n, _ in good] == [1]
    assert [(p.line, p.field) for p in problems] == [(2, "chosen"), (3, "rejected"), (4, "prompt[0].role")]


def test_max_length_refuses_text_that_cannot_fit(tmp_path):
    long = {"messages": GOOD["messages"][:1] + [{"role": "user", "content": "word " * 10_000}, GOOD["messages"][2]]}
    path = write(tmp_path, [json.dumps(GOOD), json.dumps(long)])
    assert [p.kind for p in validate_lines(path, max_length=512)[1]] == ["too_long"]
    assert validate_lines(path)[1] == []
