"""Constrained decoding from scratch: the triage grammar accepts exactly the canonical answers, its token masks
equal llguidance's (a maintained library, from the same JSON schema) on many prefixes, and greedy decoding under
it gives the same replies as under llguidance, in labkit's batched generation and in `model.generate`."""

import hashlib
import json
import random

import numpy as np
import pytest
import torch

from labkit import LabkitError
from labkit.constrain import (DIGITS, DONE, SEPARATORS, GrammarLogitsProcessor, TokenAutomaton, sequence_grammar,
                              triage_automaton, triage_grammar, triage_json_schema)
from labkit.data import load_split
from labkit.evaluate import greedy_batch
from labkit.runtime import pick_amp_dtype
from labkit.tickets import PRODUCTS, to_json

pytestmark = pytest.mark.usefixtures("one_thread")

ANSWER = {"category": "billing", "priority": "high", "sentiment": "neutral", "product": "Pulse Earbuds",
          "order_id": "ORD-19665"}
NULLS = {**ANSWER, "product": None, "order_id": None}


def labels(split: str = "test") -> list[dict]:
    return [json.loads(ex["messages"][-1]["content"]) for ex in load_split(split)]


@pytest.fixture(scope="module")
def automaton(tokenizer):
    return triage_automaton(tokenizer)


# ---------------------------------------------------------------- the character grammar


def test_grammar_accepts_every_canonical_answer_of_the_test_split():
    grammar = triage_grammar()
    assert all(grammar.accepts(to_json(label)) for label in labels())


def test_grammar_accepts_null_product_and_order_id():
    assert triage_grammar().accepts(to_json(NULLS))


@pytest.mark.parametrize("text", [
    json.dumps(ANSWER, separators=(",", ":")),                 # compact spacing
    json.dumps(ANSWER, indent=1),                              # newlines
    " " + to_json(ANSWER),                                     # leading space
    to_json(ANSWER) + "\n",                                    # anything after the closing brace
    to_json({**ANSWER, "category": "refund"}),                 # a label outside the set
    to_json({**ANSWER, "product": "pulse earbuds"}),           # not the catalogue spelling
    to_json({**ANSWER, "order_id": "ORD-1966"}),               # four digits
    to_json({**ANSWER, "order_id": "ORD-19665a"}),
    to_json({**ANSWER, "category": None}),                     # null only where allowed
    json.dumps({k: ANSWER[k] for k in reversed(ANSWER)}),      # keys out of order
])
def test_grammar_rejects_anything_but_the_canonical_format(text):
    assert not triage_grammar().accepts(text)


def test_grammar_matches_the_json_schema_it_is_documented_by():
    schema = triage_json_schema()
    assert list(schema["properties"]) == list(ANSWER) and schema["required"] == list(ANSWER)
    assert schema["properties"]["product"]["enum"] == [*PRODUCTS, None]


def test_alternatives_that_are_prefixes_of_each_other_are_refused():
    with pytest.raises(LabkitError, match="is the start of another"):
        sequence_grammar([[list("ab"), list("abc")]])


def test_a_digit_class_takes_any_digit_at_its_position():
    grammar = sequence_grammar([[list("x") + [DIGITS] * 2]])
    assert grammar.accepts("x07") and not grammar.accepts("x7") and not grammar.accepts("x0a")


# ---------------------------------------------------------------- the token automaton on a small vocabulary

VOCAB = ['{"', 'category', '": "', '"', 'bill', 'billing', 'ing', 'billing", "', '", "', 'tech', 'b', 'x', 'null',
         ' "', 'shipping"']


def allowed_strings(prefix: str) -> set[str]:
    small = TokenAutomaton(triage_grammar(), VOCAB, eos_id=None)
    state = small.grammar.walk(prefix)
    return {VOCAB[token] for token in small.moves[state]}


def test_tokens_may_end_mid_value_or_cross_into_the_next_key():
    assert allowed_strings('{"category": "') == {"bill", "billing", "billing\", \"", "tech", "b", "shipping\""}


def test_after_the_opening_brace_only_the_first_key_may_start():
    assert allowed_strings("{") == {'"'}
    assert allowed_strings('{"') == {"category"}


def test_eos_is_allowed_only_after_the_closing_brace(tokenizer, automaton):
    tokens = tokenizer(to_json(ANSWER), add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    assert [eos in automaton.allowed_after(tokens[:k]) for k in range(len(tokens) + 1)] == [False] * len(tokens) + [True]
    assert automaton.allowed_after(tokens) == [eos]
    assert automaton.state_after(tokens + [eos]) == DONE


def test_every_canonical_answer_is_allowed_token_by_token(tokenizer, automaton):
    for label in labels():
        tokens = tokenizer(to_json(label), add_special_tokens=False)["input_ids"]
        assert automaton.state_after(tokens) == automaton.grammar.final, to_json(label)


def test_special_tokens_are_never_allowed(tokenizer, automaton):
    specials = set(tokenizer.all_special_ids) - {tokenizer.eos_token_id}
    assert not any(specials & set(moves) for moves in automaton.moves)


# ---------------------------------------------------------------- masks equal llguidance's


def llguidance_grammar() -> str:
    """The same JSON schema for llguidance, its spacing pinned to json.dumps' defaults.

    `no_forcing`: by default llguidance lets through only the canonical tokenization of text the grammar fixes
    (after `{` comes `"category"`, so it offers `{"` but not `{`); without that its mask is every token that
    keeps the reply valid, which is what labkit's automaton computes.
    """
    schema = {**triage_json_schema(), "x-guidance": SEPARATORS}
    return '%llguidance {"no_forcing": true}\nstart: %json ' + json.dumps(schema)


@pytest.fixture(scope="module")
def llguidance_matcher(tokenizer):
    """llguidance's matcher for `llguidance_grammar()` over SmolLM2's vocabulary."""
    llguidance = pytest.importorskip("llguidance")
    from llguidance.hf import from_tokenizer

    grammar = llguidance.LLMatcher.grammar_from_lark(llguidance_grammar())
    matcher = llguidance.LLMatcher(from_tokenizer(tokenizer), grammar)
    assert not matcher.is_error(), matcher.get_error()
    return matcher


def library_allowed(matcher, tokens: list[int], vocab_size: int) -> list[int]:
    """The token ids llguidance allows after `tokens` (from its one-bit-per-token mask)."""
    matcher.reset()
    assert matcher.consume_tokens(tokens), matcher.get_error()
    bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
    return np.flatnonzero(bits[:vocab_size]).tolist()


def random_prefixes(automaton, n_walks: int, seed: int) -> list[list[int]]:
    """Every prefix of random walks through the automaton: half pick any allowed token, half the longest one
    (long tokens are the ones that cross from a value into the next key)."""
    rng = random.Random(seed)
    prefixes = []
    for walk in range(n_walks):
        tokens = []
        while True:
            prefixes.append(list(tokens))
            allowed = [t for t in automaton.allowed_after(tokens) if t != automaton.eos_id]
            if not allowed:
                break
            longest = max(len(automaton.texts[t]) for t in allowed)
            pool = allowed if walk % 2 else [t for t in allowed if len(automaton.texts[t]) == longest]
            tokens.append(rng.choice(pool))
    return prefixes


def cut_prefixes(tokenizer, answers: list[str]) -> list[list[int]]:
    """The tokenizer's own tokens of every cut of each answer: mid-key, mid-label, mid-digits, right after `:` or
    `,`, before the closing brace."""
    return [tokenizer(text[:cut], add_special_tokens=False)["input_ids"] for text in answers
            for cut in range(len(text) + 1)]


def test_masks_equal_llguidance_on_random_and_adversarial_prefixes(tokenizer, automaton, llguidance_matcher):
    answers = [to_json(label) for label in labels()[:8]] + [to_json(NULLS), to_json({**ANSWER, "product": None})]
    prefixes = random_prefixes(automaton, n_walks=40, seed=0) + cut_prefixes(tokenizer, answers)
    mismatches = [p for p in prefixes
                  if automaton.allowed_after(p) != library_allowed(llguidance_matcher, p, len(tokenizer))]
    assert len(prefixes) > 1500 and mismatches == []


# ---------------------------------------------------------------- greedy decoding under the constraint


class LLGuidanceProcessor:
    """llguidance as a logits processor in labkit's convention: it sees only the generated tokens."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher, self.vocab_size = matcher, vocab_size

    def __call__(self, input_ids, scores):
        masked = torch.full_like(scores, float("-inf"))
        for row, tokens in enumerate(input_ids.tolist()):
            allowed = library_allowed(self.matcher, tokens, self.vocab_size)
            masked[row, allowed] = scores[row, allowed]
        return masked


def ticket_prompts(tokenizer, n: int) -> list[list[int]]:
    from labkit.tickets import prompt_conversations

    conversations = prompt_conversations(load_split("test")[:n])
    return [tokenizer.apply_chat_template(c, add_generation_prompt=True, return_dict=True)["input_ids"]
            for c in conversations]


def test_greedy_replies_equal_llguidances_on_a_small_model(tokenizer, vocab_llama, automaton, llguidance_matcher):
    model, prompts = vocab_llama(seed=1), ticket_prompts(tokenizer, 4)
    run = lambda processor: greedy_batch(model, prompts, 128, tokenizer.eos_token_id, tokenizer.pad_token_id,
                                         logits_processor=processor)  # noqa: E731
    ours = run(GrammarLogitsProcessor(automaton))
    assert ours == run(LLGuidanceProcessor(llguidance_matcher, len(tokenizer)))
    assert all(row[-1] == tokenizer.eos_token_id and triage_grammar().accepts(tokenizer.decode(row[:-1]))
               for row in ours)  # random weights, yet every reply is a whole valid answer


def test_model_generate_with_the_processor_gives_labkits_replies(tokenizer, vocab_llama, automaton):
    model, prompts = vocab_llama(seed=2), ticket_prompts(tokenizer, 2)
    ours = greedy_batch(model, prompts, 48, tokenizer.eos_token_id, tokenizer.pad_token_id,
                        logits_processor=GrammarLogitsProcessor(automaton))
    for prompt, row in zip(prompts, ours):
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=48, do_sample=False,
                             logits_processor=[GrammarLogitsProcessor(automaton, prompt_width=len(prompt))],
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        assert out[0, len(prompt):].tolist() == row


def test_a_reply_that_left_the_grammar_is_reported(automaton):
    with pytest.raises(LabkitError, match="leaves the grammar"):
        GrammarLogitsProcessor(automaton)(torch.tensor([[automaton.eos_id]]), torch.zeros(1, len(automaton.texts)))


def test_cached_generate_keys_constrained_replies_apart_and_free_ones_as_before(automaton, tmp_path, monkeypatch):
    import labkit.evaluate as evaluate

    monkeypatch.setenv("LABKIT_HOME", str(tmp_path))
    calls = []
    monkeypatch.setattr(evaluate, "generate", lambda m, t, c, max_new_tokens, **kw: calls.append(kw) or ["x"])
    model, conversations = torch.nn.Linear(1, 1), [[{"role": "user", "content": "Say hi."}]]
    for processor in [None, GrammarLogitsProcessor(automaton), None, GrammarLogitsProcessor(automaton)]:
        evaluate.cached_generate(model, None, conversations, 4, model_key="m", progress=False,
                                 logits_processor=processor)
    assert [c["logits_processor"] is None for c in calls] == [True, False]
    precision = f"torch.float32, cpu, autocast {pick_amp_dtype('cpu')}"  # the key as it was before constraints
    free = json.dumps({"model": "m", "conversations": conversations, "max_new_tokens": 4, "precision": precision},
                      sort_keys=True)
    assert (tmp_path / "replies" / f"{hashlib.sha256(free.encode()).hexdigest()[:24]}.json").exists()


def test_cached_generate_refuses_a_processor_without_a_cache_key(tmp_path, monkeypatch):
    import labkit.evaluate as evaluate

    monkeypatch.setenv("LABKIT_HOME", str(tmp_path))
    with pytest.raises(LabkitError, match="cache_key"):
        evaluate.cached_generate(torch.nn.Linear(1, 1), None, [], 4, model_key="m",
                                 logits_processor=lambda ids, scores: scores)
