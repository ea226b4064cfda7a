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
    return _ok(f"the rendered conversation minus each message's own tokens: the template's wrapping of "
               f"{len(conversation)} messages and the generation prompt.")


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
    return _ok("the run's cost from its GPU_TIERS row, paid back after the rounded-up number of requests.")


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
    return _ok("the shared word 3-grams of the normalised texts over all of their distinct ones.")


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
    return _ok(f"r * (d_in + d_out) summed over {len(target_modules)} matrices, times the model's layers.")


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
    return _ok(f"training stops at the evaluation where the count since the last best reaches {patience}.")


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
    return _ok("the reward margin and -log sigmoid(margin) both match (ln 2 when the margin is zero).")


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
    return _ok("(p_o - p_e) / (1 - p_e): the observed agreement, corrected for the agreement expected by chance.")


def check_ratings(mine: list, rule: list[str], judge_says: list[str]) -> bool:
    """Report the exercise 'label replies yourself': your kappa against the rule and against the judge."""
    from labkit.metrics import cohen_kappa

    if missing := sum(label is None for label in mine):
        print(f"Not finished yet: {missing} of {len(mine)} replies have no label. Click yes or no on every row "
              "above, then run this cell again.")
        return False
    you_rule, you_judge, judge_rule = cohen_kappa(mine, rule), cohen_kappa(mine, judge_says), cohen_kappa(judge_says, rule)
    print(f"Your kappa against the rule: {you_rule:.2f}; against the judge: {you_judge:.2f}; the judge against the "
          f"rule on the same {len(mine)} replies: {judge_rule:.2f}. Where you and the rule disagree, read the reply "
          "again: either you slipped, or the rule says something you would not (that is how rules get fixed).")
    return True

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
    return _ok(f"different word {n}-grams over all of them, counted inside each ticket.")


def check_group_advantages(advantages, rewards: list[float], scale: bool = True) -> bool:
    """Check the exercise 'the advantages of one group of k rewards by hand', by TRL's rule: each reward minus the
    group's mean, divided (scale=True) by the group's sample standard deviation (n - 1) plus 1e-4."""
    if _blank(advantages):
        return False
    r = [float(x) for x in rewards]
    k, mean = len(r), sum(r) / len(r)
    sample_std = math.sqrt(sum((x - mean) ** 2 for x in r) / (k - 1))
    population_std = math.sqrt(sum((x - mean) ** 2 for x in r) / k)
    got = [float(a) for a in (advantages.tolist() if hasattr(advantages, "tolist") else advantages)]
    if len(got) != k:
        raise AssertionError(f"{len(got)} advantages for {k} rewards: give one advantage per reply, in the rewards' order.")

    def matches(std: float | None) -> bool:
        want = [(x - mean) / (std + 1e-4) if std is not None else x - mean for x in r]
        return all(math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-3) for a, b in zip(got, want))

    if matches(sample_std if scale else None):
        how = "centred on the group's mean and divided by its sample std + 1e-4" if scale else "centred on the group's mean"
        return _ok(f"{k} advantages, {how}; they sum to zero, so a group's average reply is not pushed either way.")
    if scale and matches(population_std):
        raise AssertionError("divide by the sample standard deviation, which divides the squared deviations by k - 1 "
                             "(torch.std's default, and TRL's), not by k.")
    if scale and matches(None):
        raise AssertionError("scale=True: after subtracting the mean, divide by the group's std + 1e-4.")
    if not scale and matches(sample_std):
        raise AssertionError("scale=False (Dr. GRPO, TRL's scale_rewards='none'): subtract the mean and stop there.")
    if any(math.isnan(a) for a in got):
        raise AssertionError("an advantage is NaN: when all k rewards are equal the std is 0, which is why TRL adds "
                             "1e-4 to it; such a group's advantages are all 0.")
    raise AssertionError(f"the advantages do not match: subtract the group's mean reward ({mean:.4f}) from each "
                         "reward" + (", then divide by the group's sample std (k - 1) + 1e-4." if scale else "."))


def check_ties(merged, task_a: list[float], task_b: list[float], density: float = 0.5) -> bool:
    """Check the exercise 'TIES on two task vectors by hand': trim to `density`, elect signs, take the disjoint mean."""
    from labkit.merge import elect_sign, merge_tensors, trim  # peft is imported only when this exercise runs

    if _blank(merged):
        return False
    a, b = torch.tensor(task_a, dtype=torch.float64), torch.tensor(task_b, dtype=torch.float64)
    try:
        got = torch.as_tensor(merged, dtype=torch.float64).flatten()
    except (TypeError, ValueError, RuntimeError):
        raise AssertionError(f"merged = {merged!r}: give {a.numel()} numbers, a list or a tensor.") from None
    if got.numel() != a.numel():
        raise AssertionError(f"{got.numel()} numbers for task vectors of {a.numel()}: give one merged value per entry.")
    trimmed = torch.stack([trim(a, density), trim(b, density)])
    agree = trimmed.sign() == elect_sign(trimmed)
    expected = merge_tensors([a, b], [1.0, 1.0], "ties", density)
    if torch.allclose(got, expected, atol=1e-6):
        kept = int(density * a.numel())
        return _ok(f"each task vector kept its {kept} largest of {a.numel()} entries; {int(agree.sum())} kept entries "
                   "agreed with their elected sign and were averaged.")
    wrong_ways = [
        ((a + b) / 2, "that is the plain mean of the two vectors: TIES first trims each vector, then elects signs."),
        (merge_tensors([a, b], [1.0, 1.0], "ties", 1.0), f"trim first: in each vector keep only the "
         f"{int(density * a.numel())} entries largest in magnitude and set the others to 0, before electing signs."),
        ((trimmed * agree).sum(dim=0), "divide each entry's sum by how many trimmed values agree with its elected "
         "sign (the disjoint mean), not by nothing."),
        ((trimmed * agree).sum(dim=0) / 2, "divide by how many values agree with the elected sign, not always by 2: "
         "a trimmed (zero) or opposite-sign value does not count."),
        ((trimmed * (trimmed != 0)).sum(dim=0) / (trimmed != 0).sum(dim=0).clamp(min=1), "elect a sign per entry "
         "(the sign of the trimmed values' sum) and drop the values of the other sign before averaging."),
    ]
    for wrong, why in wrong_ways:
        if torch.allclose(got, wrong, atol=1e-6) and not torch.allclose(wrong, expected, atol=1e-6):
            raise AssertionError(why)
    off = [i for i in range(a.numel()) if abs(got[i] - expected[i]) > 1e-6]
    raise AssertionError(f"entries {off} are off. Per vector keep the {int(density * a.numel())} largest |values| "
                         "(others 0); per entry elect the sign of the trimmed values' sum (+ on 0); average the "
                         "trimmed values with that sign (0 if none).")


def check_allowed_tokens(allowed, prefix: str, vocabulary: list[str]) -> bool:
    """Check the exercise 'which tokens of a small vocabulary may come next after a prefix of the triage answer?'.

    `allowed` lists tokens of `vocabulary`, as strings or as their positions (ids) in it, in any order.
    """
    if _blank(allowed):
        return False
    from labkit.constrain import TokenAutomaton, triage_grammar  # here, not at the top: appended with its exercise

    automaton = TokenAutomaton(triage_grammar(), vocabulary, eos_id=None)
    state = automaton.grammar.walk(prefix)
    if state is None:
        raise AssertionError(f"the prefix {prefix!r} is not the start of any valid answer: ask for a prefix of "
                             "labkit.tickets.to_json's format.")
    expected = {vocabulary[token] for token in automaton.moves[state]}
    given = {vocabulary[a] if isinstance(a, int) and not isinstance(a, bool) else a for a in allowed}
    if unknown := sorted(given - set(vocabulary), key=str):
        raise AssertionError(f"{unknown[0]!r} is not in the vocabulary: list tokens of `vocabulary` (strings or ids).")
    if extra := sorted(given - expected):
        token = extra[0]
        kept = len(token)
        while kept and automaton.grammar.walk(token[:kept], state) is None:
            kept -= 1
        raise AssertionError(f"{token!r} is not allowed: after the prefix, its character {kept + 1} ({token[kept]!r}) "
                             "leaves every valid answer. A token is allowed only if all of its characters continue one.")
    if missing := sorted(expected - given):
        token = missing[0]
        why = ("it finishes the value and runs on into what follows" if '"' in token or "," in token
               else "a token may stop in the middle of a label")
        raise AssertionError(f"{len(missing)} allowed token(s) missing, e.g. {token!r}: {why}. Walk each token's "
                             "characters from the prefix; keep it if none of them falls off the grammar.")
    return _ok(f"{len(expected)} of the {len(vocabulary)} tokens keep the reply on a path to a valid answer; the "
               "rest would be set to -inf.")
