"""Constrained decoding from scratch: an automaton over tokens that lets only a valid triage answer through.

Three layers, each small enough to read on its own:

1. `Grammar`, a character automaton: `edges[state]` maps the next character to the next state. `triage_grammar()`
   builds the one for the triage answer in exactly the format `labkit.tickets.to_json` writes and the SFT model
   is trained on: `{"category": "billing", "priority": "high", "sentiment": "neutral", "product": null,
   "order_id": "ORD-12345"}`. The keys come in that order; each enum field takes one of its labels, `product`
   one of the catalogue names or `null`, `order_id` `"ORD-"` and five digits or `null`. Whitespace is pinned to
   json.dumps' defaults: one space after each `:` and `,`, none anywhere else (none before `{`, none after `}`),
   so a model that already answers in the canonical format is never pushed off it.
2. `TokenAutomaton`, the grammar lifted to a vocabulary: a token is allowed in a state when walking its characters
   through the grammar never falls off it. A token may end mid-word (`"bill`) or cross from a value into the next
   key (`", "`); walking its characters handles both. Every state's allowed tokens and where each one leads are
   computed once, so a decoding step is a dictionary look-up per token generated so far. End of turn (EOS) is
   allowed only once the closing brace is written. Every spelling of a valid answer is allowed, including ones
   the tokenizer would never produce: the base model under the constraint often writes "technical" as `t`, `ech`,
   `n`, `ica`, `l`, about 65-80 tokens per answer instead of the canonical ~38, so give it room (128 new tokens).
3. `GrammarLogitsProcessor`, a transformers `LogitsProcessor` that sets every disallowed token's score to -inf,
   for `model.generate` and for labkit's batched greedy generation (`labkit.evaluate.generate(...,
   logits_processor=...)`).
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor

from labkit import LabkitError
from labkit.tickets import FIELDS, LABEL_SETS, PRODUCTS

DIGITS = "0123456789"
DONE = -1  # the state after end of turn: nothing more is constrained


@dataclass
class Grammar:
    """A character automaton: `edges[state]` maps a character to the next state; an answer ends in `final`."""

    edges: list[dict[str, int]]
    final: int
    start: int = 0

    def walk(self, text: str, state: int | None = None) -> int | None:
        """The state after reading `text` from `state` (default: the start), or None if it leaves the grammar."""
        state = self.start if state is None else state
        for char in text:
            state = self.edges[state].get(char)
            if state is None:
                return None
        return state

    def accepts(self, text: str) -> bool:
        """Whether `text` is a whole answer."""
        return self.walk(text) == self.final

    @property
    def key(self) -> str:
        """A short fingerprint of the automaton (for cache keys): changes whenever any allowed string changes."""
        blob = json.dumps([sorted(out.items()) for out in self.edges] + [self.final, self.start])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def sequence_grammar(pieces: list[list[list[str]]]) -> Grammar:
    """The automaton of a sequence of pieces, each a choice among alternatives.

    An alternative is a list of character sets (one per position: "a" for a literal, DIGITS for any digit). The
    alternatives of one piece must be prefix-free (none may be the start of another, e.g. a closing quote ends
    every string), so that every alternative can end in the same state, where the next piece starts.
    """
    edges: list[dict[str, int]] = [{}]
    state = 0
    for alternatives in pieces:
        end = len(edges)
        edges.append({})
        for alternative in alternatives:
            at = state
            for position, chars in enumerate(alternative):
                last = position == len(alternative) - 1
                nxt = end if last else edges[at].get(chars[0])
                if nxt is None or nxt == end and not last:
                    nxt = len(edges)
                    edges.append({})
                for char in chars:
                    if edges[at].setdefault(char, nxt) != nxt:
                        raise LabkitError(f"sequence_grammar: one of {[''.join(c[0] for c in a) for a in alternatives]} "
                                          "is the start of another. Fix: end each with a character that cannot "
                                          "continue another (e.g. a closing quote)")
                at = nxt
        state = end
    return Grammar(edges=edges, final=state)


def triage_grammar() -> Grammar:
    """The triage answer in `tickets.to_json`'s format (keys in order, one space after `:` and `,`)."""
    literal = lambda text: [list(text)]  # noqa: E731  (a piece with one alternative: the text itself)
    values = {field: [json.dumps(label) for label in labels] for field, labels in LABEL_SETS.items()}
    values["product"] = [json.dumps(p) for p in PRODUCTS] + ["null"]
    pieces = [literal("{")]
    for i, field in enumerate(FIELDS):
        pieces.append(literal((", " if i else "") + json.dumps(field) + ": "))
        if field == "order_id":
            pieces.append([list('"ORD-') + [DIGITS] * 5 + ['"'], list("null")])
        else:
            pieces.append([list(value) for value in values[field]])
    pieces.append(literal("}"))
    return sequence_grammar(pieces)


def triage_json_schema() -> dict:
    """The same answer as a JSON schema (for libraries and servers that take one: llguidance, llama.cpp).

    A schema does not say where whitespace goes: pin it with the library's options (llguidance:
    `SEPARATORS`) or the schema allows other spacings too.
    """
    properties = {field: {"enum": labels} for field, labels in LABEL_SETS.items()}
    properties["product"] = {"enum": [*PRODUCTS, None]}
    properties["order_id"] = {"anyOf": [{"type": "string", "pattern": "^ORD-[0-9]{5}$"}, {"type": "null"}]}
    return {"type": "object", "properties": {f: properties[f] for f in FIELDS}, "required": list(FIELDS),
            "additionalProperties": False}


# llguidance's JSON options for exactly json.dumps' spacing: ", " between items, ": " after keys, nothing else.
SEPARATORS = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}


def token_texts(tokenizer) -> list[str | None]:
    """Each token id's text, or None for special tokens (they are not characters of an answer).

    A token that is part of a multi-byte character decodes to U+FFFD; the triage grammar is ASCII, so such a
    token can never be allowed and its exact bytes do not matter.
    """
    added = getattr(tokenizer, "added_tokens_decoder", {})
    special = set(tokenizer.all_special_ids) | {token for token, added_token in added.items() if added_token.special}
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], clean_up_tokenization_spaces=False)
    return [None if i in special else text for i, text in enumerate(texts)]


class TokenAutomaton:
    """A grammar lifted to a vocabulary: in every state, the allowed tokens and the state each one leads to."""

    def __init__(self, grammar: Grammar, texts: list[str | None], eos_id: int | None):
        self.grammar, self.texts, self.eos_id = grammar, texts, eos_id
        by_first: dict[str, list[int]] = defaultdict(list)  # only tokens that start with an allowed character
        for token, text in enumerate(texts):
            if text:
                by_first[text[0]].append(token)
        self.moves: list[dict[int, int]] = []
        for state, out in enumerate(grammar.edges):
            moves = {}
            for char in out:
                for token in by_first[char]:
                    nxt = grammar.walk(texts[token], state)
                    if nxt is not None:
                        moves[token] = nxt
            if state == grammar.final and eos_id is not None:
                moves[eos_id] = DONE
            self.moves.append(moves)
        self.allowed = [torch.tensor(sorted(moves), dtype=torch.long) for moves in self.moves]

    def state_after(self, tokens: list[int]) -> int | None:
        """The state after these tokens from the start, DONE after end of turn, or None if one is not allowed."""
        state = self.grammar.start
        for token in tokens:
            if state == DONE:
                return DONE
            state = self.moves[state].get(token)
            if state is None:
                return None
        return state

    def allowed_after(self, tokens: list[int]) -> list[int]:
        """The token ids allowed next after these tokens (sorted)."""
        state = self.state_after(tokens)
        if state is None or state == DONE:
            return []
        return self.allowed[state].tolist()

    @property
    def key(self) -> str:
        """A fingerprint of the grammar and the vocabulary (for cache keys)."""
        blob = json.dumps([self.grammar.key, self.eos_id, self.texts])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def triage_automaton(tokenizer) -> TokenAutomaton:
    """The triage grammar over a tokenizer's vocabulary, EOS (end of turn) allowed after the closing brace."""
    return TokenAutomaton(triage_grammar(), token_texts(tokenizer), tokenizer.eos_token_id)


class GrammarLogitsProcessor(LogitsProcessor):
    """Masks every token the automaton does not allow next to -inf.

    It reads the tokens generated so far from `input_ids[:, prompt_width:]`: leave `prompt_width=0` for labkit's
    `generate` (which passes only the generated tokens), and set it to the padded prompt's width for
    `model.generate` (which passes prompt and reply). It keeps no state between calls, so rows may leave the
    batch and one processor serves any number of batches.
    """

    def __init__(self, automaton: TokenAutomaton, prompt_width: int = 0):
        self.automaton, self.prompt_width = automaton, prompt_width

    @property
    def cache_key(self) -> str:
        """What `labkit.evaluate.cached_generate` adds to its key: which automaton constrained the replies."""
        return f"grammar {self.automaton.key}"

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        masked = torch.full_like(scores, float("-inf"))
        for row, tokens in enumerate(input_ids[:, self.prompt_width :].tolist()):
            state = self.automaton.state_after(tokens)
            if state is None:
                raise LabkitError(f"GrammarLogitsProcessor: row {row}'s reply so far {tokens} leaves the grammar. "
                                  "Fix: set prompt_width to the prompt's width (model.generate) or leave it 0 "
                                  "(labkit's generate)")
            allowed = slice(None) if state == DONE else self.automaton.allowed[state].to(scores.device)
            masked[row, allowed] = scores[row, allowed]
        return masked
