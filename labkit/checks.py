"""Automatic checkers for the notebooks' exercises: a clear message when an answer is off."""

from __future__ import annotations

import math

import torch

from labkit.memory import linear_dims, lora_trainable_params, shape_from_config
from labkit.quant import nf4_code


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


def check_early_stop(stop_step: int | None, evals: list[dict], patience: int) -> None:
    """Check the exercise 'when would early stopping with this patience have stopped?'."""
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
    _ok(f"with patience={patience} training stops at step {expected}, after its best at a lower step.")


def check_lora_count(answer: int, config, r: int, target_modules: list[str]) -> None:
    """Check the exercise 'count the trainable parameters of a LoRA adapter from the model config'."""
    shape = shape_from_config(config)
    expected = lora_trainable_params(shape, r, target_modules)
    if answer != expected:
        dims = linear_dims(shape)
        hint = ", ".join(f"{t}: {dims[t][0]} -> {dims[t][1]}" for t in target_modules)
        raise AssertionError(
            f"got {answer:,}, expected {expected:,}. Each adapted matrix costs r * (d_in + d_out); "
            f"per layer the sizes are {hint}; multiply by the {shape.layers} layers."
        )
    _ok(f"{expected:,} trainable parameters: r * (d_in + d_out) summed over {len(target_modules)} matrices x {shape.layers} layers.")


def check_nf4_indices(indices, x) -> None:
    """Check the exercise 'quantize one block to NF4 by hand': the index (0-15) of each value's code."""
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
    _ok(f"all {len(expected)} indices match: x / absmax, then the nearest of the 16 NF4 values.")


def check_dpo_pair(loss: float, margin: float, logps: dict[str, float], beta: float) -> None:
    """Check the exercise 'the DPO loss of one pair by hand': its reward margin and its sigmoid loss."""
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
    _ok(f"margin {expected_margin:.3f}, loss {expected_loss:.4f} (ln 2 = 0.6931 when the margin is zero).")


def check_kappa(kappa: float, judge_says: list[str], truth: list[str]) -> None:
    """Check the exercise 'compute Cohen's kappa of the judge against the truth by hand'."""
    n = len(truth)
    observed = sum(a == b for a, b in zip(judge_says, truth)) / n
    labels = set(judge_says) | set(truth)
    expected_agreement = sum((judge_says.count(c) / n) * (truth.count(c) / n) for c in labels)
    expected = (observed - expected_agreement) / (1 - expected_agreement)
    if not isinstance(kappa, (int, float)) or not math.isclose(kappa, expected, abs_tol=1e-9):
        raise AssertionError(
            f"kappa = {kappa}, expected {expected:.4f}: p_o is the share of items where the two agree "
            f"({observed:.4f} here); p_e sums, over every label, the product of how often each rater uses it "
            f"({expected_agreement:.4f} here); kappa = (p_o - p_e) / (1 - p_e)."
        )
    _ok(f"kappa = {expected:.3f}: observed agreement {observed:.3f}, chance agreement {expected_agreement:.3f}.")
