"""The exercises' checkers: a blank answer (`...`) is reported without stopping the notebook, a wrong one
raises with how to fix it, and the reference solution (computed as the notebook's solution cell does) passes."""

import math

import pytest
import torch
from transformers import LlamaConfig

from labkit.course.checks import (NOT_ANSWERED, check_break_even, check_dpo_pair, check_early_stop, check_jaccard,
                           check_kappa, check_lora_count, check_nf4_indices, check_template_overhead)
from labkit.decide import GPU_TIERS
from labkit.metrics import cohen_kappa
from labkit.quant import nf4_code
from labkit.tickets import normalise


def says_not_answered(capsys) -> bool:
    """The checker printed exactly the one 'Not answered yet' line."""
    return capsys.readouterr().out == NOT_ANSWERED + "\n"


# ---------------------------------------------------------------- 00: the chat template's overhead

CONVERSATION = [{"role": "system", "content": "Triage the support ticket. Reply with JSON only."},
                {"role": "user", "content": "My order ORD-12345 has not arrived yet."}]


def test_template_overhead_blank_returns_false_and_says_not_answered(capsys):
    assert check_template_overhead(..., None, CONVERSATION) is False
    assert says_not_answered(capsys)


def test_template_overhead_rejects_the_rendered_length_alone(tokenizer):
    rendered = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, return_dict=True)["input_ids"]
    with pytest.raises(AssertionError, match="subtract the tokens of each message's content"):
        check_template_overhead(len(rendered), tokenizer, CONVERSATION)


def test_template_overhead_accepts_the_reference_solution(tokenizer):
    rendered_ids = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True,
                                                 return_dict=True)["input_ids"]
    content_ids = sum(len(tokenizer(m["content"])["input_ids"]) for m in CONVERSATION)
    assert check_template_overhead(len(rendered_ids) - content_ids, tokenizer, CONVERSATION) is True


# ---------------------------------------------------------------- 01: when the fine-tune pays for itself

BREAK_EVEN = dict(n_examples=2_000, saved_tokens=644, dollars_per_million=0.20)


def break_even_solution(n_examples: int, saved_tokens: int, dollars_per_million: float) -> tuple[float, int]:
    tier = next(t for t in GPU_TIERS if t.model_size == "7-8B" and t.method == "qlora")
    dollars = tier.hours_per_1k[1] * n_examples / 1000 * tier.dollars_per_hour
    return dollars, math.ceil(dollars / (saved_tokens * dollars_per_million / 1e6))


def test_break_even_blank_returns_false_and_says_not_answered(capsys):
    assert check_break_even(..., ..., **BREAK_EVEN) is False
    assert says_not_answered(capsys)


def test_break_even_with_one_of_two_answers_blank_returns_false(capsys):
    dollars, _ = break_even_solution(**BREAK_EVEN)
    assert check_break_even(dollars, ..., **BREAK_EVEN) is False
    assert says_not_answered(capsys)


def test_break_even_rejects_the_cost_of_1000_examples_and_says_to_scale_it():
    _, requests = break_even_solution(**BREAK_EVEN)
    with pytest.raises(AssertionError, match="scale the upper end"):
        check_break_even(3.0, requests, **BREAK_EVEN)


def test_break_even_rejects_a_count_rounded_down_and_says_to_round_up():
    dollars, requests = break_even_solution(**BREAK_EVEN)
    with pytest.raises(AssertionError, match="round up"):
        check_break_even(dollars, requests - 1, **BREAK_EVEN)


def test_break_even_accepts_the_reference_solution():
    assert check_break_even(*break_even_solution(**BREAK_EVEN), **BREAK_EVEN) is True


# ---------------------------------------------------------------- 02: Jaccard of word 3-gram shingles

TEXT_A = "Why is there a second payment for the kettle on my statement? It has to be sorted before Friday."
TEXT_B = "Hi team,\nwhy is there a second payment for the Kettle on my statement?! It has to be sorted before friday"


def word_shingles(text: str, n: int = 3) -> set[str]:
    words = normalise(text).split()
    return {" ".join(words[i : i + n]) for i in range(max(1, len(words) - n + 1))}


def test_jaccard_blank_returns_false_and_says_not_answered(capsys):
    assert check_jaccard(..., TEXT_A, TEXT_B) is False
    assert says_not_answered(capsys)


def test_jaccard_rejects_shingles_of_unnormalised_text_and_says_to_normalise():
    a, b = ({" ".join(w[i : i + 3]) for i in range(len(w) - 2)} for w in (TEXT_A.split(), TEXT_B.split()))
    with pytest.raises(AssertionError, match="Normalise each text first"):
        check_jaccard(len(a & b) / len(a | b), TEXT_A, TEXT_B)


def test_jaccard_accepts_the_reference_solution():
    a, b = word_shingles(TEXT_A), word_shingles(TEXT_B)
    assert check_jaccard(len(a & b) / len(a | b), TEXT_A, TEXT_B) is True


# ---------------------------------------------------------------- 03: count a LoRA adapter

CONFIG = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_lora_count_blank_returns_false_and_says_not_answered(capsys):
    assert check_lora_count(..., CONFIG, r=16, target_modules=ATTENTION) is False
    assert says_not_answered(capsys)


def test_lora_count_rejects_square_key_value_projections_and_gives_the_sizes():
    square = 16 * 4 * (64 + 64) * CONFIG.num_hidden_layers  # forgets that k and v have fewer heads
    with pytest.raises(AssertionError, match="k_proj: 64 -> 32"):
        check_lora_count(square, CONFIG, r=16, target_modules=ATTENTION)


def test_lora_count_accepts_the_reference_solution():
    cfg, r = CONFIG, 16
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    q_out, kv_out = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim
    per_layer = r * ((cfg.hidden_size + q_out) + 2 * (cfg.hidden_size + kv_out) + (q_out + cfg.hidden_size))
    assert check_lora_count(per_layer * cfg.num_hidden_layers, CONFIG, r=16, target_modules=ATTENTION) is True


# ---------------------------------------------------------------- 04: NF4 indices of one block

X = torch.randn(8, generator=torch.Generator().manual_seed(0))


def nf4_solution(x: torch.Tensor) -> torch.Tensor:
    code_values = nf4_code()
    return ((x / x.abs().max())[:, None] - code_values[None, :]).abs().argmin(dim=1)


def test_nf4_blank_returns_false_and_says_not_answered(capsys):
    assert check_nf4_indices(..., X) is False
    assert says_not_answered(capsys)


def test_nf4_rejects_indices_of_unscaled_values_and_says_to_divide_by_absmax():
    unscaled = (X[:, None] - nf4_code()[None, :]).abs().argmin(dim=1)
    assert not torch.equal(unscaled, nf4_solution(X))
    with pytest.raises(AssertionError, match="Divide by the block's absmax"):
        check_nf4_indices(unscaled, X)


def test_nf4_accepts_the_reference_solution():
    assert check_nf4_indices(nf4_solution(X), X) is True


# ---------------------------------------------------------------- 05: early stopping

EVALS = [{"step": 10, "val_loss": 1.0}, {"step": 20, "val_loss": 0.8}, {"step": 30, "val_loss": 0.85},
         {"step": 40, "val_loss": 0.9}, {"step": 50, "val_loss": 0.7}]


def early_stop_solution(evals: list[dict], patience: int) -> int | None:
    best, bad, stop_step = float("inf"), 0, None
    for h in evals:
        if h["val_loss"] < best:
            best, bad = h["val_loss"], 0
        else:
            bad += 1
            if bad == patience:
                stop_step = h["step"]
                break
    return stop_step


def test_early_stop_blank_returns_false_and_says_not_answered(capsys):
    assert check_early_stop(..., EVALS, patience=2) is False
    assert says_not_answered(capsys)


def test_early_stop_rejects_the_step_of_the_best_loss_and_explains_the_counter():
    with pytest.raises(AssertionError, match="reset the counter"):
        check_early_stop(20, EVALS, patience=2)


def test_early_stop_accepts_the_reference_solution():
    assert early_stop_solution(EVALS, 2) == 40
    assert check_early_stop(early_stop_solution(EVALS, 2), EVALS, patience=2) is True


# ---------------------------------------------------------------- 06: the DPO loss of one pair

LOGPS = {"policy_chosen": -12.0, "policy_rejected": -15.0, "ref_chosen": -13.0, "ref_rejected": -14.0}
BETA = 0.1


def dpo_solution(four: dict[str, float], beta: float) -> tuple[float, float]:
    margin = beta * ((four["policy_chosen"] - four["ref_chosen"]) - (four["policy_rejected"] - four["ref_rejected"]))
    return -math.log(1 / (1 + math.exp(-margin))), margin


def test_dpo_blank_returns_false_and_says_not_answered(capsys):
    assert check_dpo_pair(..., ..., LOGPS, beta=BETA) is False
    assert says_not_answered(capsys)


def test_dpo_rejects_a_margin_without_beta_and_explains_the_implicit_reward():
    loss, margin = dpo_solution(LOGPS, 1.0)
    with pytest.raises(AssertionError, match="implicit reward"):
        check_dpo_pair(loss, margin, LOGPS, beta=BETA)


def test_dpo_rejects_a_loss_of_minus_sigmoid_and_names_the_log():
    _, margin = dpo_solution(LOGPS, BETA)
    with pytest.raises(AssertionError, match="-log sigmoid"):
        check_dpo_pair(-1 / (1 + math.exp(-margin)), margin, LOGPS, beta=BETA)


def test_dpo_accepts_the_reference_solution():
    assert check_dpo_pair(*dpo_solution(LOGPS, BETA), LOGPS, beta=BETA) is True


# ---------------------------------------------------------------- 07: Cohen's kappa

JUDGE = ["yes", "yes", "no", "yes", "no", "yes"]
TRUTH = ["yes", "no", "no", "yes", "yes", "yes"]


def kappa_solution(judge_says: list[str], truth: list[str]) -> float:
    n = len(truth)
    p_o = sum(a == b for a, b in zip(judge_says, truth)) / n
    p_e = sum((judge_says.count(c) / n) * (truth.count(c) / n) for c in ["yes", "no"])
    return (p_o - p_e) / (1 - p_e)


def test_kappa_blank_returns_false_and_says_not_answered(capsys):
    assert check_kappa(..., JUDGE, TRUTH) is False
    assert says_not_answered(capsys)


def test_kappa_checker_rejects_raw_agreement_and_says_how_to_fix_it():
    with pytest.raises(AssertionError, match="p_e"):
        check_kappa(4 / 6, JUDGE, TRUTH)


def test_kappa_checker_accepts_cohens_kappa():
    assert check_kappa(cohen_kappa(JUDGE, TRUTH), JUDGE, TRUTH) is True


def test_kappa_accepts_the_reference_solution():
    assert check_kappa(kappa_solution(JUDGE, TRUTH), JUDGE, TRUTH) is True


# ---------------------------------------------------------------- 02: distinct-n of a list of tickets

from labkit.course.checks import check_distinct_n  # noqa: E402  (appended with its exercise)

TICKETS = ["My parcel is late. My parcel is lost!", "my parcel is LATE", "The kettle leaks."]


def distinct_n_solution(texts: list[str], n: int) -> float:
    grams = [tuple(words[i : i + n]) for words in (normalise(t).split() for t in texts)
             for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams)


def test_distinct_n_blank_returns_false_and_says_not_answered(capsys):
    assert check_distinct_n(..., TICKETS, 2) is False
    assert says_not_answered(capsys)


def test_distinct_n_rejects_n_grams_across_tickets_and_says_to_stay_inside_one():
    joined = distinct_n_solution([" ".join(TICKETS)], 2)  # one long text: n-grams that cross two tickets
    with pytest.raises(AssertionError, match="never across"):
        check_distinct_n(joined, TICKETS, 2)


def test_distinct_n_rejects_unnormalised_text():
    raw = [tuple(t.split()[i : i + 2]) for t in TICKETS for i in range(len(t.split()) - 1)]
    with pytest.raises(AssertionError, match="Normalise each ticket"):
        check_distinct_n(len(set(raw)) / len(raw), TICKETS, 2)


def test_distinct_n_accepts_the_reference_solution():
    assert check_distinct_n(distinct_n_solution(TICKETS, 2), TICKETS, 2) is True


# ---------------------------------------------------------------- 10: the advantages of one GRPO group by hand

from labkit.course.checks import check_group_advantages  # noqa: E402  (appended with its exercise)

GROUP_REWARDS = [1.0, 0.4, 0.4, 0.0]  # one prompt's k = 4 replies, scored


def advantages_solution(rewards: list[float], scale: bool = True) -> torch.Tensor:
    r = torch.tensor(rewards)
    centred = r - r.mean()
    return centred / (r.std() + 1e-4) if scale else centred


def test_group_advantages_blank_returns_false_and_says_not_answered(capsys):
    assert check_group_advantages(..., GROUP_REWARDS) is False
    assert says_not_answered(capsys)


def test_group_advantages_accept_the_reference_solution_without_printing_it(capsys):
    answer = advantages_solution(GROUP_REWARDS)
    assert check_group_advantages(answer, GROUP_REWARDS) is True
    out = capsys.readouterr().out
    assert out.startswith("Correct: ") and f"{answer[0].item():.2f}" not in out and f"{answer[0].item():.3f}" not in out
    assert check_group_advantages(advantages_solution(GROUP_REWARDS, scale=False), GROUP_REWARDS, scale=False) is True
    assert check_group_advantages(advantages_solution(GROUP_REWARDS).tolist(), GROUP_REWARDS) is True  # a list too


def test_group_advantages_reject_the_population_std_and_say_k_minus_1():
    r = torch.tensor(GROUP_REWARDS)
    with pytest.raises(AssertionError, match="k - 1"):
        check_group_advantages((r - r.mean()) / (r.std(correction=0) + 1e-4), GROUP_REWARDS)


def test_group_advantages_reject_a_missing_or_extra_scaling():
    with pytest.raises(AssertionError, match="divide by the group's std"):
        check_group_advantages(advantages_solution(GROUP_REWARDS, scale=False), GROUP_REWARDS)
    with pytest.raises(AssertionError, match="subtract the mean and stop there"):
        check_group_advantages(advantages_solution(GROUP_REWARDS), GROUP_REWARDS, scale=False)


def test_group_advantages_reject_uncentred_rewards_and_explain_an_all_equal_group():
    r = torch.tensor(GROUP_REWARDS)
    with pytest.raises(AssertionError, match="subtract the group's mean reward"):
        check_group_advantages(r / (r.std() + 1e-4), GROUP_REWARDS)
    with pytest.raises(AssertionError, match="std is 0"):
        check_group_advantages([math.nan] * 4, [0.5] * 4)  # (r - mean) / std without the 1e-4: 0 / 0
    assert check_group_advantages([0.0] * 4, [0.5] * 4) is True


# ---------------------------------------------------------------- 08: TIES on four numbers by hand

from labkit.course.checks import check_ties  # noqa: E402  (appended with its exercise)

TASK_A, TASK_B = [0.5, -0.1, 0.2, -0.4], [-0.3, 0.1, 0.2, -0.6]


def ties_solution(task_a: list[float], task_b: list[float], density: float) -> torch.Tensor:
    """TIES by hand, as the solution cell does it: trim, elect sign, disjoint mean."""
    vectors = torch.tensor([task_a, task_b])
    trimmed = torch.zeros_like(vectors)
    for i, vector in enumerate(vectors):
        keep = vector.abs().topk(int(density * len(vector))).indices
        trimmed[i, keep] = vector[keep]
    sign = torch.where(trimmed.sum(dim=0) >= 0, 1.0, -1.0)
    agree = trimmed.sign() == sign
    return (trimmed * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)


def test_ties_blank_returns_false_and_says_not_answered(capsys):
    assert check_ties(..., TASK_A, TASK_B) is False
    assert says_not_answered(capsys)


def test_ties_accepts_the_reference_solution_without_printing_it(capsys):
    assert check_ties(ties_solution(TASK_A, TASK_B, 0.5), TASK_A, TASK_B) is True
    out = capsys.readouterr().out
    assert out.startswith("Correct: ") and "0.5" not in out and "-0.5" not in out
    assert check_ties([0.5, 0.0, 0.0, -0.5], TASK_A, TASK_B) is True  # a list too


@pytest.mark.parametrize("wrong, hint", [
    ([0.1, 0.0, 0.2, -0.5], "plain mean"),                        # (a + b) / 2
    ([0.5, 0.1, 0.2, -0.5], "trim first"),                        # TIES without trimming
    ([0.5, 0.0, 0.0, -1.0], "not by nothing"),                    # agreeing values summed, never divided
    ([0.25, 0.0, 0.0, -0.5], "not always by 2"),                  # divided by the number of vectors
    ([0.1, 0.0, 0.0, -0.5], "elect a sign per entry"),            # trimmed values averaged whatever their sign
    ([0.5, 0.0, 0.1, -0.5], r"entries \[2\] are off"),            # anything else: which entries
])
def test_ties_rejects_a_wrong_answer_and_says_which_step(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        check_ties(wrong, TASK_A, TASK_B)


def test_ties_rejects_a_wrong_number_of_values():
    with pytest.raises(AssertionError, match="one merged value per entry"):
        check_ties([0.5, -0.5], TASK_A, TASK_B)


# ---------------------------------------------------------------- 07: which tokens the automaton allows next

from labkit.course.checks import check_allowed_tokens  # noqa: E402  (appended with its exercise)
from labkit.constrain import triage_grammar  # noqa: E402

PREFIX = '{"category": "'
SMALL_VOCAB = ['{"', "bill", "billing", 'billing", "', "Billing", " billing", "tech", 'technical",', "null", '"', "x",
               'shipping"']


def allowed_tokens_solution(prefix: str, vocabulary: list[str]) -> list[str]:
    grammar = triage_grammar()
    return [token for token in vocabulary if grammar.walk(prefix + token) is not None]


def test_allowed_tokens_blank_returns_false_and_says_not_answered(capsys):
    assert check_allowed_tokens(..., PREFIX, SMALL_VOCAB) is False
    assert says_not_answered(capsys)


def test_allowed_tokens_accepts_the_reference_solution_without_printing_it(capsys):
    solution = allowed_tokens_solution(PREFIX, SMALL_VOCAB)
    assert check_allowed_tokens(solution, PREFIX, SMALL_VOCAB) is True
    out = capsys.readouterr().out
    assert out.startswith("Correct: ") and not any(token in out for token in solution)


def test_allowed_tokens_accepts_ids_in_any_order():
    ids = [SMALL_VOCAB.index(t) for t in reversed(allowed_tokens_solution(PREFIX, SMALL_VOCAB))]
    assert check_allowed_tokens(ids, PREFIX, SMALL_VOCAB) is True


def test_allowed_tokens_rejects_whole_labels_only_and_says_tokens_may_cross_into_the_next_key():
    with pytest.raises(AssertionError, match="runs on into what follows"):
        check_allowed_tokens(["billing", "bill", "tech"], PREFIX, SMALL_VOCAB)


def test_allowed_tokens_rejects_a_token_that_leaves_the_grammar_and_says_where():
    wrong = allowed_tokens_solution(PREFIX, SMALL_VOCAB) + [" billing"]
    with pytest.raises(AssertionError, match=r"character 1 \(' '\) leaves every valid answer"):
        check_allowed_tokens(wrong, PREFIX, SMALL_VOCAB)


def test_allowed_tokens_rejects_a_token_outside_the_vocabulary():
    with pytest.raises(AssertionError, match="not in the vocabulary"):
        check_allowed_tokens(["billings"], PREFIX, SMALL_VOCAB)


# ---------------------------------------------------------------- every exercise: the solution does not give it away

import ast  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

from IPython.core.displayhook import DisplayHook  # noqa: E402  (the rule Jupyter applies to a trailing ;)

SOLVED = {}


def solved(fn):
    """Register a reference solution: fn(request) -> (checker, args, kwargs, the answers it must not print)."""
    SOLVED[fn.__name__] = fn
    return fn


@solved
def template_overhead(request):
    tokenizer = request.getfixturevalue("tokenizer")
    rendered = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, return_dict=True)["input_ids"]
    answer = len(rendered) - sum(len(tokenizer(m["content"])["input_ids"]) for m in CONVERSATION)
    return check_template_overhead, (answer, tokenizer, CONVERSATION), {}, [answer]


@solved
def break_even(request):
    dollars, requests = break_even_solution(**BREAK_EVEN)
    return check_break_even, (dollars, requests), BREAK_EVEN, [dollars, requests]


@solved
def jaccard(request):
    a, b = word_shingles(TEXT_A), word_shingles(TEXT_B)
    return check_jaccard, (len(a & b) / len(a | b), TEXT_A, TEXT_B), {}, [len(a & b) / len(a | b), len(a & b)]


@solved
def lora_count(request):
    answer = 16 * (2 * (64 + 64) + 2 * (64 + 32)) * CONFIG.num_hidden_layers
    return check_lora_count, (answer, CONFIG), dict(r=16, target_modules=ATTENTION), [answer]


@solved
def nf4_indices(request):
    return check_nf4_indices, (nf4_solution(X), X), {}, [nf4_solution(X)]


@solved
def early_stop(request):
    return check_early_stop, (early_stop_solution(EVALS, 2), EVALS), dict(patience=2), [early_stop_solution(EVALS, 2)]


@solved
def dpo_pair(request):
    loss, margin = dpo_solution(LOGPS, BETA)
    return check_dpo_pair, (loss, margin, LOGPS), dict(beta=BETA), [loss, margin]


@solved
def kappa(request):
    return check_kappa, (kappa_solution(JUDGE, TRUTH), JUDGE, TRUTH), {}, [kappa_solution(JUDGE, TRUTH)]


@solved
def distinct_n(request):
    answer = distinct_n_solution(TICKETS, 2)
    return check_distinct_n, (answer, TICKETS, 2), {}, [answer]


def printed_forms(answers: list) -> set[str]:
    """The ways a message could show an answer: as written, with thousands separators, rounded."""
    forms = set()
    for a in answers:
        if isinstance(a, torch.Tensor):
            forms.add(str(a.tolist())[1:-1])
        elif isinstance(a, float):
            forms |= {f"{a:.2f}", f"{a:.3f}", f"{a:.4f}", f"{a:g}"}
        else:
            forms |= {str(a), f"{a:,}"}
    return forms


@pytest.mark.parametrize("exercise", list(SOLVED))
def test_the_correct_line_says_the_solution_checks_out_without_printing_the_answer(exercise, request, capsys):
    check, args, kwargs, answers = SOLVED[exercise](request)
    assert check(*args, **kwargs) is True
    out = capsys.readouterr().out
    assert out.startswith("Correct: ") and not {form for form in printed_forms(answers) if form in out}, out


NOTEBOOK_FILES = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def exercise_cells(path: Path) -> list[tuple[str, str, str]]:
    """(answer, checker, solution) code cells of each exercise: the answer cell says '# Your turn'."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    return [tuple(code[i : i + 3]) for i, source in enumerate(code) if "# Your turn:" in source]


EXERCISES = {f"{p.stem[:2]}-{k}": cells for p in NOTEBOOK_FILES for k, cells in enumerate(exercise_cells(p))}


def blank_names(answer_cell: str) -> set[str]:
    """The names an answer cell sets to `...`: the learner's answers."""
    return {target.id for node in ast.parse(answer_cell).body if isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Constant) and node.value.value is Ellipsis
            for target in node.targets if isinstance(target, ast.Name)}


def bound_names(cell: str) -> set[str]:
    """The names a cell binds at its top level (assignments, loops, definitions, imports)."""
    names = set()
    for node in ast.parse(cell).body:
        targets = {ast.Assign: lambda n: n.targets, ast.AugAssign: lambda n: [n.target],
                   ast.AnnAssign: lambda n: [n.target], ast.For: lambda n: [n.target]}.get(type(node), lambda n: [])
        names |= {leaf.id for target in targets(node) for leaf in ast.walk(target) if isinstance(leaf, ast.Name)}
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    return names


def test_every_exercise_of_notebooks_00_to_08_and_10_is_found():
    assert {f"0{n}" for n in range(9)} | {"10"} <= {name[:2] for name in EXERCISES}
    assert all(blank_names(answer) for answer, _, _ in EXERCISES.values())


@pytest.mark.parametrize("exercise", EXERCISES)
def test_a_solution_cell_leaves_the_learners_answer_alone(exercise):
    answer, _, solution = EXERCISES[exercise]
    assert not blank_names(answer) & bound_names(solution), "rerunning the checker would check the solution"


@pytest.mark.parametrize("exercise", EXERCISES)
def test_a_checker_cell_echoes_no_true_or_false(exercise):
    _, checker, _ = EXERCISES[exercise]
    last = ast.parse(checker).body[-1]
    ends_in_a_check = (isinstance(last, ast.Expr) and isinstance(last.value, ast.Call)
                       and getattr(last.value.func, "id", "").startswith("check_"))
    assert not ends_in_a_check or DisplayHook.semicolon_at_end_of_expression(checker), "end the call with ;"


def test_ratings_with_a_missing_label_are_not_finished(capsys):
    from labkit.course.checks import check_ratings

    assert check_ratings(["yes", None], ["yes", "no"], ["yes", "yes"]) is False
    assert "1 of 2 replies have no label" in capsys.readouterr().out


def test_ratings_report_kappa_against_the_rule_and_the_judge(capsys):
    from labkit.course.checks import check_ratings

    assert check_ratings(["yes", "no", "yes", "no"], ["yes", "no", "yes", "no"], ["yes", "yes", "no", "no"]) is True
    out = capsys.readouterr().out
    assert "against the rule: 1.00" in out and "against the judge: 0.00" in out
