"""Automatic checkers for the notebooks' exercises: a clear message when an answer is off.

Every checker answers the same way: a blank answer (still `...`) prints one line and returns False, so
Run All goes on; a wrong answer raises AssertionError with how to fix it; a right one prints and returns True.
"""

from __future__ import annotations

import math
from numbers import Real

import torch

from labkit.coverage import distinct_n
from labkit.dataprep import jaccard, shingles
from labkit.decide import gpu_tier
from labkit.memory import linear_dims, lora_trainable_params, shape_from_config
from labkit.quant import nf4_code
from labkit.tickets import normalise

NOT_ANSWERED = ("Not answered yet: replace the ... in the cell above with your code "
                "(the solution is in the collapsed cell below).")


def _blank(*answers: object) -> bool:
    """True, after printing NOT_ANSWERED, when any answer is still the exercise's `...`."""
    if any(answer is ... for answer in answers):
        print(NOT_ANSWERED)
        return True
    return False


def _ok(message: str) -> bool:
    """Print the 'Correct' line and return True."""
    print(f"Correct: {message}")
    return True


def check_template_overhead(overhead: int, tokenizer, conversation: list[dict]) -> bool:
    """Check the exercise 'how many tokens does the chat template add?'."""
    if _blank(overhead):
        return False
    rendered = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_dict=True)["input_ids"]
    content = sum(len(tokenizer(m["content"])["input_ids"]) for m in conversation)
    expected = len(rendered) - content
    if overhead != expected:
        raise AssertionError(
            f"overhead = {overhead}, expected {expected}: count the tokens of the rendered conversation "
            f"(add_generation_prompt=True) and subtract the tokens of each message's content."
        )
    return _ok(f"{expected} tokens of wrapping for {len(conversation)} messages plus the generation prompt.")


def check_break_even(fine_tune_dollars: float, break_even_requests: int, n_examples: int, saved_tokens: int,
                     dollars_per_million: float) -> bool:
    """Check the exercise 'when does a 7-8B QLoRA fine-tune pay for itself in shorter prompts?'."""
    if _blank(fine_tune_dollars, break_even_requests):
        return False
    tier = gpu_tier("7-8B", "qlora")
    expected_dollars = tier.hours_per_1k[1] * n_examples / 1000 * tier.dollars_per_hour
    if not (isinstance(fine_tune_dollars, Real) and math.isclose(fine_tune_dollars, expected_dollars)):
        raise AssertionError(
            f"fine_tune_dollars = {fine_tune_dollars}, expected {expected_dollars:g}: take the 7-8B qlora row of "
            f"GPU_TIERS, scale the upper end of its hours for 1,000 examples ({tier.hours_per_1k[1]:g}) to "
            f"{n_examples:,} examples, and multiply by its dollars per hour ({tier.dollars_per_hour:g})."
        )
    saved_dollars = saved_tokens * dollars_per_million / 1e6
    expected_requests = math.ceil(expected_dollars / saved_dollars - 1e-9)
    if break_even_requests != expected_requests:
        raise AssertionError(
            f"break_even_requests = {break_even_requests}, expected {expected_requests:,}: each request saves "
            f"saved_tokens * dollars_per_million / 1e6 = ${saved_dollars:.6f}; divide the run's cost by that "
            f"and round up (math.ceil) to a whole request."
        )
    return _ok(f"${expected_dollars:g} for the run, paid back by the prompt tokens of {expected_requests:,} requests.")


def check_jaccard(similarity: float, text_a: str, text_b: str) -> bool:
    """Check the exercise 'the Jaccard similarity of two tickets' word 3-gram shingles'."""
    if _blank(similarity):
        return False
    a, b = shingles(text_a), shingles(text_b)
    expected = jaccard(a, b)
    if not isinstance(similarity, Real) or not math.isclose(similarity, expected, abs_tol=1e-9):
        raise AssertionError(
            f"similarity = {similarity}, expected {expected:.4f}: the tickets have {len(a)} and {len(b)} "
            f"shingles, {len(a & b)} shared and {len(a | b)} in all. Normalise each text first (normalise: lower "
            f"case, letters and digits only), split it into words, take every 3 consecutive words as one "
            f"shingle (a set), then divide the shared shingles by all of them."
        )
    return _ok(f"Jaccard {expected:.3f}: {len(a & b)} shared of {len(a | b)} distinct word 3-grams.")


def check_lora_count(answer: int, config, r: int, target_modules: list[str]) -> bool:
    """Check the exercise 'count the trainable parameters of a LoRA adapter from the model config'."""
    if _blank(answer):
        return False
    shape = shape_from_config(config)
    expected = lora_trainable_params(shape, r, target_modules)
    if answer != expected:
        dims = linear_dims(shape)
        hint = ", ".join(f"{t}: {dims[t][0]} -> {dims[t][1]}" for t in target_modules)
        raise AssertionError(
            f"got {answer:,}, expected {expected:,}. Each adapted matrix costs r * (d_in + d_out); "
            f"per layer the sizes are {hint}; multiply by the {shape.layers} layers."
        )
    return _ok(f"{expected:,} trainable parameters: r * (d_in + d_out) summed over {len(target_modules)} "
               f"matrices x {shape.layers} layers.")


def check_nf4_indices(indices, x) -> bool:
    """Check the exercise 'quantize one block to NF4 by hand': the index (0-15) of each value's code."""
    if _blank(indices):
        return False
    x = torch.as_tensor(x, dtype=torch.float32).reshape(-1)
    code = nf4_code()
    scaled = x / x.abs().max()
    expected = (scaled[:, None] - code[None, :]).abs().argmin(dim=1)
    got = torch.as_tensor(indices).reshape(-1).long()
    if got.shape != expected.shape:
        raise AssertionError(f"expected {expected.numel()} indices, one per value, got {got.numel()}.")
    wrong = (got != expected).nonzero().reshape(-1).tolist()
    if wrong:
        i = wrong[0]
        raise AssertionError(
            f"{len(wrong)} of {len(expected)} indices are off, e.g. value {i}: x = {x[i]:.4f}, x / absmax = "
            f"{scaled[i]:.4f}; the nearest NF4 value is code[{expected[i]}] = {code[expected[i]]:.4f}, "
            f"you gave {got[i].item()}. Divide by the block's absmax, then pick the nearest code value."
        )
    return _ok(f"all {len(expected)} indices match: x / absmax, then the nearest of the 16 NF4 values.")


def check_early_stop(stop_step: int | None, evals: list[dict], patience: int) -> bool:
    """Check the exercise 'when would early stopping with this patience have stopped?'."""
    if _blank(stop_step):
        return False
    best, bad, expected = float("inf"), 0, None
    for h in evals:
        if h["val_loss"] < best:
            best, bad = h["val_loss"], 0
        else:
            bad += 1
            if bad == patience:
                expected = h["step"]
                break
    if stop_step != expected:
        raise AssertionError(
            f"stop_step = {stop_step}, expected {expected}: walk the evaluations in order, reset the counter at "
            f"each new best validation loss, and stop at the evaluation where it reaches {patience}."
        )
    return _ok(f"with patience={patience} training stops at step {expected}, after its best at a lower step.")


def check_dpo_pair(loss: float, margin: float, logps: dict[str, float], beta: float) -> bool:
    """Check the exercise 'the DPO loss of one pair by hand': its reward margin and its sigmoid loss."""
    if _blank(loss, margin):
        return False
    chosen = logps["policy_chosen"] - logps["ref_chosen"]
    rejected = logps["policy_rejected"] - logps["ref_rejected"]
    expected_margin = beta * (chosen - rejected)
    expected_loss = math.log1p(math.exp(-expected_margin))  # -log sigmoid(m) = log(1 + e^-m)
    if abs(margin - expected_margin) > 1e-4 * max(1.0, abs(expected_margin)):
        raise AssertionError(
            f"margin = {margin:.5f}, expected {expected_margin:.5f}: each reply's implicit reward is "
            f"beta * (policy log-prob - reference log-prob); the margin is chosen's reward minus rejected's."
        )
    if abs(loss - expected_loss) > 1e-4:
        raise AssertionError(f"loss = {loss:.5f}, expected {expected_loss:.5f}: the loss is -log sigmoid(margin).")
    return _ok(f"margin {expected_margin:.3f}, loss {expected_loss:.4f} (ln 2 = 0.6931 when the margin is zero).")


def check_kappa(kappa: float, judge_says: list[str], truth: list[str]) -> bool:
    """Check the exercise 'compute Cohen's kappa of the judge against the truth by hand'."""
    if _blank(kappa):
        return False
    n = len(truth)
    observed = sum(a == b for a, b in zip(judge_says, truth)) / n
    labels = set(judge_says) | set(truth)
    expected_agreement = sum((judge_says.count(c) / n) * (truth.count(c) / n) for c in labels)
    expected = (observed - expected_agreement) / (1 - expected_agreement)
    if not isinstance(kappa, Real) or not math.isclose(kappa, expected, abs_tol=1e-9):
        raise AssertionError(
            f"kappa = {kappa}, expected {expected:.4f}: p_o is the share of items where the two agree "
            f"({observed:.4f} here); p_e sums, over every label, the product of how often each rater uses it "
            f"({expected_agreement:.4f} here); kappa = (p_o - p_e) / (1 - p_e)."
        )
    return _ok(f"kappa = {expected:.3f}: observed agreement {observed:.3f}, chance agreement {expected_agreement:.3f}.")


def check_distinct_n(ratio: float, texts: list[str], n: int) -> bool:
    """Check the exercise 'distinct-n of a list of tickets by hand': distinct word n-grams over all of them."""
    if _blank(ratio):
        return False
    expected = distinct_n(texts, n)
    grams = [tuple(w[i : i + n]) for w in (normalise(t).split() for t in texts) for i in range(len(w) - n + 1)]
    if not isinstance(ratio, Real) or not math.isclose(ratio, expected, abs_tol=1e-9):
        raise AssertionError(
            f"ratio = {ratio}, expected {expected:.4f}: the {len(texts)} tickets hold {len(grams)} word {n}-grams, "
            f"{len(set(grams))} of them different. Normalise each ticket (normalise: lower case, letters and digits "
            f"only), split it into words, take every run of {n} consecutive words inside one ticket (never across "
            f"two tickets), and divide the number of different n-grams by the number of all of them."
        )
    return _ok(f"distinct-{n} = {expected:.3f}: {len(set(grams))} different of {len(grams)} word {n}-grams.")
