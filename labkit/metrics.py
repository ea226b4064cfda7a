"""Evaluation metrics beyond the triage harness: perplexity, SQuAD F1/EM, ROUGE-L, BLEU, agreement and A/B rates.

Each one is computed here from its definition and checked in tests/test_metrics.py against the ecosystem's
implementation (transformers' loss, rouge-score, sacrebleu).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Callable, Hashable, Sequence

from labkit import LabkitError
from labkit.evaluate import bootstrap_ci
from labkit.sft import IGNORE, tokenize_chat, validation_loss
from labkit.tickets import normalise

# ---------------------------------------------------------------- perplexity


def lm_rows(tokenizer, items: Sequence, answer_only: bool) -> list[dict[str, list[int]]]:
    """Tokenized rows from conversations, chat examples or rows; every token labelled unless answer_only."""
    rows = []
    for i, item in enumerate(items):
        if isinstance(item, dict) and "input_ids" in item:
            row = {"input_ids": list(item["input_ids"]), "labels": list(item.get("labels", item["input_ids"]))}
        else:
            messages = item["messages"] if isinstance(item, dict) and "messages" in item else item
            if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
                raise LabkitError(f"perplexity: item {i} is neither a conversation, a chat example nor a tokenized "
                                  "row. Fix: pass message lists, {'messages': ...} or {'input_ids', 'labels'} rows")
            row = tokenize_chat(tokenizer, messages)
        if not answer_only:
            row["labels"] = list(row["input_ids"])
        rows.append(row)
    return rows


def perplexity(model, tokenizer, items: Sequence, answer_only: bool = True, batch_size: int = 16) -> float:
    """exp of the mean next-token cross-entropy over answer tokens (answer_only) or over whole sequences."""
    rows = lm_rows(tokenizer, items, answer_only)
    scored = sum(sum(label != IGNORE for label in r["labels"][1:]) for r in rows)
    if scored == 0:
        what = "assistant reply" if answer_only else "sequence longer than one token"
        raise LabkitError(f"perplexity: none of the {len(rows)} items has an {what} to score. "
                          "Fix: include assistant turns, or pass answer_only=False")
    pad_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    return math.exp(validation_loss(model, rows, pad_id, batch_size=batch_size))


# ---------------------------------------------------------------- SQuAD token F1 and exact match

PUNCTUATION = set(string.punctuation)  # ASCII punctuation, as SQuAD's evaluation script removes


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if prediction and reference are equal after SQuAD normalisation, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1: harmonic mean of precision and recall of the shared normalised tokens (two empties: 1.0)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


# ---------------------------------------------------------------- ROUGE-L


def rouge_tokens(text: str, stemmer: Callable[[str], str] | None = None) -> list[str]:
    """Tokens as rouge-score makes them: lower case, runs of non [a-z0-9] as spaces; words over 3 letters stemmed if given."""
    return [stemmer(t) if stemmer and len(t) > 3 else t for t in normalise(text).split()]


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence of two sequences (dynamic programming, one row at a time)."""
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, start=1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(prediction: str, reference: str, stemmer: Callable[[str], str] | None = None) -> float:
    """ROUGE-L F-measure: LCS-based precision and recall of prediction tokens against the reference's.

    For rouge-score's `use_stemmer=True`, pass `nltk.stem.porter.PorterStemmer("ORIGINAL_ALGORITHM").stem`.
    """
    pred, ref = rouge_tokens(prediction, stemmer), rouge_tokens(reference, stemmer)
    if not pred or not ref:
        return 0.0
    lcs = lcs_length(ref, pred)
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


# ---------------------------------------------------------------- BLEU (sacrebleu's, tokenizer 13a)

_13A_RULES = [
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # punctuation and symbols become tokens
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # period and comma, unless preceded by a digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # ... unless followed by a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # dash after a digit
]


def tokenize_13a(line: str) -> list[str]:
    """Tokens as sacrebleu's default '13a' tokenizer (mteval-v13a, used by WMT) makes them."""
    line = line.rstrip().replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    for entity, char in (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")):
        line = line.replace(entity, char)
    line = f" {line} "
    for pattern, replacement in _13A_RULES:
        line = pattern.sub(replacement, line)
    return line.split()


def ngram_counts(tokens: list[str], max_n: int = 4) -> Counter:
    """Counts of every n-gram of a token list, 1 <= n <= max_n."""
    return Counter(tuple(tokens[i : i + n]) for n in range(1, max_n + 1) for i in range(len(tokens) - n + 1))


def bleu_stats(prediction: str, reference: str, max_n: int = 4) -> list[int]:
    """Sufficient statistics of one pair: prediction length, reference length, clipped matches and totals per order."""
    pred, ref = tokenize_13a(prediction), tokenize_13a(reference)
    pred_counts, ref_counts = ngram_counts(pred, max_n), ngram_counts(ref, max_n)
    correct, total = [0] * max_n, [0] * max_n
    for gram, count in pred_counts.items():
        total[len(gram) - 1] += count
        correct[len(gram) - 1] += min(count, ref_counts[gram])
    return [len(pred), len(ref), *correct, *total]


def bleu_from_stats(stats: list[int], max_n: int = 4, effective_order: bool = False) -> float:
    """BLEU (0-100) from summed statistics: brevity penalty x geometric mean of precisions, 'exp' smoothing as sacrebleu."""
    pred_len, ref_len, correct, total = stats[0], stats[1], stats[2 : 2 + max_n], stats[2 + max_n :]
    bp = 1.0 if pred_len >= ref_len else (math.exp(1 - ref_len / pred_len) if pred_len > 0 else 0.0)
    if not any(correct):
        return 0.0
    precisions, halving, order = [0.0] * max_n, 1.0, max_n
    for n in range(max_n):
        if total[n] == 0:
            break
        if effective_order:
            order = n + 1
        if correct[n] == 0:  # NIST's 'exp' smoothing: each zero-match order gets half the previous pseudo-count
            halving *= 2
            precisions[n] = 100.0 / (halving * total[n])
        else:
            precisions[n] = 100.0 * correct[n] / total[n]
    logs = [math.log(p) if p > 0 else -9999999999 for p in precisions[:order]]
    return bp * math.exp(sum(logs) / order)


def bleu(predictions: list[str], references: list[str], max_n: int = 4) -> float:
    """Corpus BLEU (0-100) of predictions against one reference each, as `sacrebleu.corpus_bleu(predictions, [references])`."""
    if len(predictions) != len(references):
        raise LabkitError(f"bleu: {len(predictions)} predictions but {len(references)} references. "
                          "Fix: pass one reference per prediction")
    stats = [sum(column) for column in zip(*(bleu_stats(p, r, max_n) for p, r in zip(predictions, references)))]
    return bleu_from_stats(stats or [0] * (2 + 2 * max_n), max_n)


def sentence_bleu(prediction: str, reference: str, max_n: int = 4) -> float:
    """BLEU (0-100) of one sentence, as `sacrebleu.sentence_bleu` (exp smoothing, effective order)."""
    return bleu_from_stats(bleu_stats(prediction, reference, max_n), max_n, effective_order=True)


# ---------------------------------------------------------------- agreement between raters


def cohen_kappa(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    """Cohen's kappa of two raters' labels on the same items: agreement beyond chance (nan if chance agreement is 1)."""
    if len(a) != len(b) or not a:
        raise LabkitError(f"cohen_kappa: the raters have {len(a)} and {len(b)} labels. Fix: pass two equally long, non-empty lists")
    n = len(a)
    observed = sum(x == y for x, y in zip(a, b)) / n
    count_a, count_b = Counter(a), Counter(b)
    expected = sum(count_a[label] * count_b[label] for label in count_a) / (n * n)
    return (observed - expected) / (1 - expected) if expected < 1 else float("nan")


def kappa_ci(a: Sequence[Hashable], b: Sequence[Hashable], n_boot: int = 2000, seed: int = 0,
             level: float = 0.95) -> tuple[float, float, float]:
    """Cohen's kappa and its percentile bootstrap confidence interval (items resampled)."""
    import numpy as np

    kappa = cohen_kappa(a, b)
    codes = {label: i for i, label in enumerate(dict.fromkeys([*a, *b]))}
    x, y = np.array([codes[v] for v in a]), np.array([codes[v] for v in b])
    idx = np.random.default_rng(seed).integers(0, len(x), size=(n_boot, len(x)))
    xs, ys = x[idx], y[idx]
    observed = (xs == ys).mean(axis=1)
    expected = sum((xs == c).mean(axis=1) * (ys == c).mean(axis=1) for c in codes.values())
    with np.errstate(divide="ignore", invalid="ignore"):
        kappas = np.where(expected < 1, (observed - expected) / (1 - expected), np.nan)
    lo, hi = np.nanquantile(kappas, [(1 - level) / 2, 1 - (1 - level) / 2])
    return kappa, float(lo), float(hi)


# ---------------------------------------------------------------- pairwise A/B comparison

OUTCOME_SCORES = {"A": 1.0, "B": 0.0, "tie": 0.5}  # system A's score for each verdict


def check_outcomes(outcomes: Sequence[str], what: str) -> None:
    """Raise LabkitError unless every outcome is 'A', 'B' or 'tie'."""
    bad = next((i for i, o in enumerate(outcomes) if o not in OUTCOME_SCORES), None)
    if bad is not None:
        raise LabkitError(f"{what}: outcome {bad} is {outcomes[bad]!r}. Fix: each verdict must be 'A', 'B' or 'tie'")
    if not outcomes:
        raise LabkitError(f"{what}: no outcomes. Fix: pass at least one verdict")


def win_rate(outcomes: Sequence[str], n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """System A's win rate over blind pairwise verdicts ('A', 'B' or 'tie', a tie counting half) and its 95 % bootstrap CI."""
    check_outcomes(outcomes, "win_rate")
    return bootstrap_ci([OUTCOME_SCORES[o] for o in outcomes], n_boot=n_boot, seed=seed)


def position_flip_rate(verdicts_ab: Sequence[str], verdicts_ba: Sequence[str], n_boot: int = 2000,
                       seed: int = 0) -> tuple[float, float, float]:
    """Share of pairs whose winner changes when the two answers swap places, and its 95 % bootstrap CI.

    verdicts_ab[i] is the winner ('A', 'B' or 'tie', named by system) with A shown first, verdicts_ba[i] with B first.
    """
    if len(verdicts_ab) != len(verdicts_ba):
        raise LabkitError(f"position_flip_rate: {len(verdicts_ab)} verdicts in A-first order but {len(verdicts_ba)} "
                          "in B-first order. Fix: judge every pair in both orders")
    check_outcomes(verdicts_ab, "position_flip_rate")
    check_outcomes(verdicts_ba, "position_flip_rate")
    return bootstrap_ci([float(x != y) for x, y in zip(verdicts_ab, verdicts_ba)], n_boot=n_boot, seed=seed)
