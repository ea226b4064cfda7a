"""labkit's constrained decoder (labkit/constrain.py) against llguidance, and what the constraint costs.

1. Masks: the allowed next tokens after many prefixes, labkit's automaton vs llguidance's matcher for the same JSON
   schema (spacing pinned to json.dumps' defaults, `no_forcing` so that its mask is every token that keeps the
   reply valid). Prefixes: every prefix of random walks through the automaton (any allowed token, or the longest
   one, which crosses from a value into the next key) and the tokenizer's tokens of every cut of every canonical
   answer of the test split (mid-key, mid-label, mid-digits, after `:` or `,`, before `}`).
2. Greedy replies of SmolLM2 (no adapter) on the test tickets (05's prompts), constrained by labkit's processor and
   by llguidance's (no_forcing, and its default, which forces the canonical tokenization of fixed text): how
   many are identical token for token.
3. Tokens/s of labkit's batched greedy generation with and without the constraint on the first --speed tickets,
   and the seconds spent in the constraint itself.

Under the constraint the base model often spells the answer in short, non-canonical tokens (`"t", "ech", "n",
"ica", "l"` for "technical"): about 65-80 tokens instead of the canonical ~38, so --max-new-tokens defaults to 128.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/constrained_decoding.py [--limit 200] [--speed 48] [--walks 200]
        [--batch 32] [--max-new-tokens 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import random
import time

import numpy as np
import torch


def llguidance_matcher(tokenizer, forcing: bool):
    """llguidance's matcher for labkit's triage JSON schema over the tokenizer's vocabulary."""
    import llguidance
    from llguidance.hf import from_tokenizer

    from labkit.constrain import SEPARATORS, triage_json_schema

    options = "" if forcing else '%llguidance {"no_forcing": true}\n'
    lark = options + "start: %json " + json.dumps({**triage_json_schema(), "x-guidance": SEPARATORS})
    matcher = llguidance.LLMatcher(from_tokenizer(tokenizer), llguidance.LLMatcher.grammar_from_lark(lark))
    assert not matcher.is_error(), matcher.get_error()
    return matcher


def library_allowed(matcher, tokens: list[int], vocab_size: int) -> list[int]:
    """The token ids llguidance allows after `tokens`."""
    matcher.reset()
    if not matcher.consume_tokens(tokens):
        return []
    bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
    return np.flatnonzero(bits[:vocab_size]).tolist()


class LLGuidanceProcessor:
    """llguidance as a logits processor in labkit's convention (it sees only the generated tokens)."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher, self.vocab_size = matcher, vocab_size

    def __call__(self, input_ids, scores):
        masked = torch.full_like(scores, float("-inf"))
        for row, tokens in enumerate(input_ids.tolist()):
            allowed = library_allowed(self.matcher, tokens, self.vocab_size)
            masked[row, allowed] = scores[row, allowed]
        return masked


def prefixes(automaton, tokenizer, answers: list[str], walks: int) -> tuple[list[list[int]], int]:
    """Random-walk and cut prefixes, and how many of them end in a token that crosses a value/key boundary."""
    rng = random.Random(0)
    out = []
    for walk in range(walks):
        tokens: list[int] = []
        while True:
            out.append(list(tokens))
            allowed = [t for t in automaton.allowed_after(tokens) if t != automaton.eos_id]
            if not allowed:
                break
            longest = max(len(automaton.texts[t]) for t in allowed)
            tokens.append(rng.choice(allowed if walk % 2 else
                                     [t for t in allowed if len(automaton.texts[t]) == longest]))
    out += [tokenizer(text[:cut], add_special_tokens=False)["input_ids"] for text in answers
            for cut in range(len(text) + 1)]
    crossing = sum(1 for p in out if p and any(s in automaton.texts[p[-1]] for s in ('",', '":', ', "', ': "')))
    return out, crossing


def run(model, tokenizer, prompts: list[list[int]], processor, batch: int, max_new_tokens: int):
    """Greedy token ids (prompt order), generated-token count and wall seconds."""
    from labkit.evaluate import greedy_batch
    from labkit.runtime import model_autocast

    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    start = time.perf_counter()
    with torch.no_grad(), model_autocast(model):
        for b in range(0, len(order), batch):
            idx = order[b : b + batch]
            rows = greedy_batch(model, [prompts[i] for i in idx], max_new_tokens, tokenizer.eos_token_id,
                                tokenizer.pad_token_id, logits_processor=processor)
            for i, row in zip(idx, rows):
                out[i] = row
    return out, sum(map(len, out)), time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--speed", type=int, default=48)
    ap.add_argument("--walks", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from labkit.constrain import GrammarLogitsProcessor, triage_automaton, triage_grammar
    from labkit.data import load_split
    from labkit.models import load_model
    from labkit.tickets import prompt_conversations

    model, tokenizer = load_model()
    start = time.perf_counter()
    automaton = triage_automaton(tokenizer)
    print(f"automaton: {len(automaton.moves)} states, built in {time.perf_counter() - start:.2f} s")
    test = load_split("test")
    answers = [ex["messages"][-1]["content"] for ex in test]

    exact = llguidance_matcher(tokenizer, forcing=False)
    compared, crossing = prefixes(automaton, tokenizer, answers, args.walks)
    mismatches = sum(automaton.allowed_after(p) != library_allowed(exact, p, len(tokenizer)) for p in compared)
    print(f"masks: {len(compared)} prefixes compared ({crossing} ending in a token that crosses a value/key "
          f"boundary), {mismatches} mismatches")

    prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, return_dict=True)["input_ids"]
               for c in prompt_conversations(test[: args.limit])]
    ours, n_ours, s_ours = run(model, tokenizer, prompts, GrammarLogitsProcessor(automaton), args.batch,
                               args.max_new_tokens)
    grammar = triage_grammar()
    whole = sum(r[-1:] == [tokenizer.eos_token_id] and grammar.accepts(tokenizer.decode(r[:-1])) for r in ours)
    print(f"labkit constrained: {whole}/{len(ours)} replies are whole valid answers ending in EOS")
    for name, forcing in [("llguidance no_forcing", False), ("llguidance default (forcing)", True)]:
        processor = LLGuidanceProcessor(llguidance_matcher(tokenizer, forcing), len(tokenizer))
        theirs, n, s = run(model, tokenizer, prompts, processor, args.batch, args.max_new_tokens)
        print(f"greedy replies identical to {name}: {sum(a == b for a, b in zip(ours, theirs))}/{len(ours)} "
              f"({n / s:.1f} tokens/s through the Python adapter)")

    few, timed = prompts[: args.speed], Timed(GrammarLogitsProcessor(automaton))
    for label, processor in [("free", None), ("constrained", timed)]:
        _, n, s = run(model, tokenizer, few, processor, args.batch, args.max_new_tokens)
        print(f"labkit generate, {label:11s} on {len(few)} tickets: {n} tokens in {s:.2f} s = {n / s:.1f} tokens/s "
              f"({s / n * 1000:.2f} ms/token)")
    print(f"the constraint itself: {timed.seconds / timed.rows * 1000:.3f} ms per row and step "
          f"({timed.seconds:.2f} s of the constrained run's {s:.2f} s)")


class Timed:
    """A logits processor that also adds up the seconds it takes and the rows it masks."""

    def __init__(self, processor):
        self.processor, self.seconds, self.rows = processor, 0.0, 0

    def __call__(self, input_ids, scores):
        start = time.perf_counter()
        out = self.processor(input_ids, scores)
        self.seconds += time.perf_counter() - start
        self.rows += len(scores)
        return out


if __name__ == "__main__":
    main()
