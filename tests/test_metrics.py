"""labkit.metrics: each metric equals the ecosystem's implementation (transformers, rouge-score, sacrebleu) or a hand count."""

import math
import random

import pytest
import torch

from labkit import LabkitError
from labkit.data import load_split
from labkit.metrics import (
    bleu,
    cohen_kappa,
    exact_match,
    kappa_ci,
    normalize_answer,
    perplexity,
    position_flip_rate,
    rouge_l,
    sentence_bleu,
    token_f1,
    tokenize_13a,
    win_rate,
)
from labkit.sft import collate, tokenize_chat
from labkit.tickets import SYSTEM_PROMPT

pytestmark = pytest.mark.usefixtures("one_thread")

CONVERSATIONS = [
    [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "My kettle broke, order ORD-12345."},
     {"role": "assistant", "content": '{"category": "returns", "priority": "medium"}'}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [{"role": "system", "content": SYSTEM_PROMPT},
     {"role": "user", "content": "The router keeps dropping wifi, please help, it is urgent and I work from home."},
     {"role": "assistant", "content": '{"category": "technical", "priority": "high", "sentiment": "negative"}'}],
]


@pytest.fixture(scope="module")
def small_lm(tiny_llama):
    """A tiny random Llama with SmolLM2's vocabulary, so real chat tokens fit."""
    return tiny_llama(vocab_size=49152)


def transformers_ppl(model, rows: list[dict], pad_id: int) -> float:
    """exp of transformers' own loss on one right-padded batch of rows (its mean over every labelled token)."""
    batch = collate(rows, pad_id)
    with torch.no_grad():
        return math.exp(model(**batch).loss.item())


# ---------------------------------------------------------------- perplexity


def test_answer_perplexity_equals_exp_of_transformers_loss_on_one_sequence(small_lm, tokenizer):
    row = tokenize_chat(tokenizer, CONVERSATIONS[0])
    ours = perplexity(small_lm, tokenizer, [CONVERSATIONS[0]], answer_only=True)
    assert ours == pytest.approx(transformers_ppl(small_lm, [row], tokenizer.pad_token_id), rel=1e-5)


def test_whole_sequence_perplexity_equals_exp_of_transformers_loss_with_every_token_labelled(small_lm, tokenizer):
    ids = tokenize_chat(tokenizer, CONVERSATIONS[0])["input_ids"]
    ours = perplexity(small_lm, tokenizer, [{"messages": CONVERSATIONS[0]}], answer_only=False)
    assert ours == pytest.approx(transformers_ppl(small_lm, [{"input_ids": ids, "labels": ids}], 0), rel=1e-5)


@pytest.mark.parametrize("answer_only", [True, False])
def test_perplexity_of_several_batches_equals_transformers_loss_over_all_labelled_tokens(small_lm, tokenizer, answer_only):
    rows = [tokenize_chat(tokenizer, c) for c in CONVERSATIONS]
    if not answer_only:
        rows = [{"input_ids": r["input_ids"], "labels": r["input_ids"]} for r in rows]
    ours = perplexity(small_lm, tokenizer, CONVERSATIONS, answer_only=answer_only, batch_size=2)
    assert ours == pytest.approx(transformers_ppl(small_lm, rows, tokenizer.pad_token_id), rel=1e-5)


def test_perplexity_accepts_tokenized_rows(small_lm, tokenizer):
    rows = [tokenize_chat(tokenizer, c) for c in CONVERSATIONS]
    assert perplexity(small_lm, tokenizer, rows) == pytest.approx(perplexity(small_lm, tokenizer, CONVERSATIONS), rel=1e-6)


def test_answer_perplexity_without_an_assistant_turn_raises(small_lm, tokenizer):
    with pytest.raises(LabkitError, match="answer_only=False"):
        perplexity(small_lm, tokenizer, [CONVERSATIONS[0][:2]], answer_only=True)


# ---------------------------------------------------------------- SQuAD F1 and exact match (values by hand)


def test_normalize_answer_drops_case_punctuation_articles_and_extra_spaces():
    assert normalize_answer("The  Quick, Brown-Fox!") == "quick brownfox"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theater") == "theater"  # articles only as whole words


def test_exact_match_ignores_articles_case_and_punctuation():
    assert exact_match("the Denver Broncos", "Denver Broncos.") == 1.0
    assert exact_match("Denver", "Denver Broncos") == 0.0


def test_token_f1_on_squad_answers():
    assert token_f1("Denver Broncos won", "Denver Broncos") == pytest.approx(0.8)  # P 2/3, R 1
    # SQuAD v1.1 dev (Super Bowl 50): gold normalises to 11 tokens (levis stadium in san francisco bay area at santa
    # clara california); 3 shared: P 3/3, R 3/11 -> F1 = 2 * (3/11) / (14/11) = 3/7
    gold = "Levi's Stadium in the San Francisco Bay Area at Santa Clara, California."
    assert token_f1("Santa Clara, California", gold) == pytest.approx(3 / 7)
    assert token_f1("Broncos Broncos", "Broncos") == pytest.approx(2 * 0.5 * 1 / 1.5)  # shared counts are clipped


def test_token_f1_is_one_for_two_empty_answers_and_zero_for_disjoint_ones():
    assert token_f1("the", "") == 1.0  # both normalise to nothing
    assert token_f1("Paris", "London") == 0.0


# ---------------------------------------------------------------- ROUGE-L and BLEU against rouge-score and sacrebleu

WORDS = ["the", "The", "cat", "cats", "running", "ran", "runs", "order", "ORD-12345", "12,345", "3.5", "don't",
         "e-mail", "kettle", "Kettle!", "(refund)", "price:", "$19.99", "a", "on", "mat.", "Müller", "café", "&amp;",
         "is", "was", "quickly", "router", "wifi", "drops", "connection", "it's", "1990s", "x", "\"quoted\""]


@pytest.fixture(scope="module")
def pairs() -> list[tuple[str, str]]:
    """200 (prediction, reference) pairs: 150 random word sequences and 50 from real ticket texts."""
    rng = random.Random(0)
    out = []
    for _ in range(150):
        ref = [rng.choice(WORDS) for _ in range(rng.randint(1, 25))]
        pred = [w if rng.random() < 0.6 else rng.choice(WORDS) for w in ref if rng.random() < 0.85]
        pred += [rng.choice(WORDS) for _ in range(rng.randint(0, 4))]
        out.append((" ".join(pred), " ".join(ref)))
    out[0] = ("", "the cat sat")  # empty prediction
    texts = [ex["messages"][1]["content"] for ex in load_split("train")[:50]]
    for i, text in enumerate(texts[:25]):
        out.append((texts[i + 25], text))  # two different tickets
    for text in texts[25:]:
        words = text.split(" ")
        out.append((" ".join(w for w in words if rng.random() < 0.8), text))  # a ticket and a cut copy
    return out


def test_rouge_l_equals_rouge_score_on_200_pairs(pairs):
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rougeL"])
    diffs = [abs(rouge_l(p, r) - scorer.score(r, p)["rougeL"].fmeasure) for p, r in pairs]
    assert len(pairs) == 200 and max(diffs) <= 1e-12


def test_rouge_l_with_porter_stemmer_equals_rouge_score_use_stemmer(pairs):
    from nltk.stem import porter
    from rouge_score.rouge_scorer import RougeScorer

    scorer, stem = RougeScorer(["rougeL"], use_stemmer=True), porter.PorterStemmer("ORIGINAL_ALGORITHM").stem
    assert max(abs(rouge_l(p, r, stem) - scorer.score(r, p)["rougeL"].fmeasure) for p, r in pairs) <= 1e-12


def test_rouge_l_is_one_for_identical_token_sequences_and_zero_for_an_empty_one():
    assert rouge_l("The cat, sat!", "the cat sat") == 1.0
    assert rouge_l("", "the cat sat") == 0.0 and rouge_l("...", "the cat sat") == 0.0


def test_tokenize_13a_equals_sacrebleu_tokenizer(pairs):
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    theirs = Tokenizer13a()
    assert all(tokenize_13a(t) == theirs(t.rstrip()).split() for pair in pairs for t in pair)


def test_corpus_bleu_equals_sacrebleu_corpus_bleu(pairs):
    import sacrebleu

    preds, refs = [p for p, _ in pairs], [r for _, r in pairs]
    corpora = [(preds, refs)] + [(preds[i : i + 10], refs[i : i + 10]) for i in range(0, 200, 10)]
    diffs = [abs(bleu(p, r) - sacrebleu.corpus_bleu(p, [r]).score) for p, r in corpora]
    assert max(diffs) <= 1e-9


def test_sentence_bleu_equals_sacrebleu_sentence_bleu(pairs):
    import sacrebleu

    assert max(abs(sentence_bleu(p, r) - sacrebleu.sentence_bleu(p, [r]).score) for p, r in pairs) <= 1e-9


def test_bleu_needs_one_reference_per_prediction():
    with pytest.raises(LabkitError, match="one reference per prediction"):
        bleu(["a b c"], ["a b c", "d e f"])


# ---------------------------------------------------------------- agreement (Cohen's kappa)

# 50 items rated yes/no: both yes 20, A yes B no 5, A no B yes 10, both no 15.
# observed 35/50 = 0.7; chance 0.5 * 0.6 + 0.5 * 0.4 = 0.5; kappa = (0.7 - 0.5) / (1 - 0.5) = 0.4
RATER_A = ["yes"] * 25 + ["no"] * 25
RATER_B = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15


def test_cohen_kappa_on_a_hand_computed_table():
    assert cohen_kappa(RATER_A, RATER_B) == pytest.approx(0.4)


def test_cohen_kappa_is_one_for_full_agreement_and_zero_at_chance():
    assert cohen_kappa(RATER_A, RATER_A) == pytest.approx(1.0)
    assert cohen_kappa([1, 1, 0, 0], [1, 0, 1, 0]) == pytest.approx(0.0)


def test_kappa_ci_brackets_the_estimate_and_repeats_with_its_seed():
    kappa, lo, hi = kappa_ci(RATER_A, RATER_B, n_boot=500, seed=1)
    assert kappa == pytest.approx(0.4) and lo < kappa < hi
    assert kappa_ci(RATER_A, RATER_B, n_boot=500, seed=1) == (kappa, lo, hi)


def test_cohen_kappa_rejects_lists_of_different_lengths():
    with pytest.raises(LabkitError, match="equally long"):
        cohen_kappa(["yes"], ["yes", "no"])


# ---------------------------------------------------------------- pairwise A/B


def test_win_rate_counts_a_tie_as_half_a_win():
    rate, lo, hi = win_rate(["A", "A", "B", "tie"])
    assert rate == pytest.approx(0.625) and lo <= rate <= hi


def test_win_rate_rejects_an_unknown_verdict():
    with pytest.raises(LabkitError, match="outcome 1 is 'a'"):
        win_rate(["A", "a"])


def test_position_flip_rate_is_the_share_of_pairs_whose_winner_changes_when_swapped():
    rate, lo, hi = position_flip_rate(["A", "A", "B", "tie"], ["A", "B", "B", "A"])
    assert rate == pytest.approx(0.5) and 0 <= lo <= rate <= hi <= 1
