"""Automatic checkers for the notebooks' exercises: a clear message when an answer is off."""

from __future__ import annotations


def _ok(message: str) -> None:
    print(f"Correct: {message}")


def check_template_overhead(overhead: int, tokenizer, conversation: list[dict]) -> None:
    """Check the exercise 'how many tokens does the chat template add?'."""
    rendered = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_dict=True)["input_ids"]
    content = sum(len(tokenizer(m["content"])["input_ids"]) for m in conversation)
    expected = len(rendered) - content
    if overhead != expected:
        raise AssertionError(
            f"overhead = {overhead}, expected {expected}: count the tokens of the rendered conversation "
            f"(add_generation_prompt=True) and subtract the tokens of each message's content."
        )
    _ok(f"{expected} tokens of wrapping for {len(conversation)} messages plus the generation prompt.")
