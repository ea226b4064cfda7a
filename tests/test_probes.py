"""Scoring the general-knowledge probes (notebook 07's forgetting check)."""

import pytest

from labkit.evaluate import probe_conversations, probe_correct, score_probes


def test_a_probe_is_right_when_the_reply_states_an_accepted_answer_as_a_word():
    assert probe_correct("The capital of France is Paris.", ["Paris"])
    assert probe_correct("2 + 2 = 4", ["4", "four"])
    assert probe_correct("It has FOUR sides.", ["4", "four"])


def test_a_probe_is_wrong_when_the_answer_is_only_part_of_a_word_or_number():
    assert not probe_correct("Parisian cafés are famous.", ["Paris"])
    assert not probe_correct("14", ["4"])
    assert not probe_correct("forty-four", ["four"])


def test_triage_json_answers_no_probe():
    reply = '{"category": "account", "priority": "low", "sentiment": "neutral", "product": null, "order_id": null}'
    assert not probe_correct(reply, ["Paris"])


def test_probe_scores_are_one_value_per_probe():
    probes = [{"question": "q1", "answers": ["Rome"]}, {"question": "q2", "answers": ["8", "eight"]}]
    assert score_probes(["Rome.", "seven"], probes) == [1.0, 0.0]
    with pytest.raises(ValueError):
        score_probes(["Rome."], probes)


def test_probe_prompts_are_the_question_as_a_user_turn():
    probes = [{"question": "What is 2 + 2?", "answers": ["4"]}]
    assert probe_conversations(probes) == [[{"role": "user", "content": "What is 2 + 2?"}]]
    assert probe_conversations(probes, system="Be brief.")[0][0] == {"role": "system", "content": "Be brief."}
