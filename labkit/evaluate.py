"""The eval core: batched greedy generation and the running task's metrics."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def generate(
    model,
    tokenizer,
    conversations: list[list[dict]],
    max_new_tokens: int = 64,
    batch_size: int = 32,
    progress: bool = True,
) -> list[str]:
    """Greedy replies to chat prompts, batched with left padding, stopping at end of turn."""
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    # Longest prompts first: batches of similar length waste less padding.
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    replies: list[str] = [""] * len(texts)
    was_training = model.training
    model.eval()
    for start in tqdm(range(0, len(order), batch_size), desc="generate", disable=not progress, leave=False):
        idx = order[start : start + batch_size]
        batch = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        for i, row in zip(idx, out[:, batch["input_ids"].shape[1] :]):
            replies[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    model.train(was_training)
    return replies


def score_triage(replies: list[str], golds: list[dict]) -> dict[str, float]:
    """JSON validity, mean per-field accuracy and whole-record exact match of triage replies."""
    from labkit.tickets import FIELDS, field_matches, follows_schema, is_valid, parse_triage

    parsed = [parse_triage(r) for r in replies]
    matches = [field_matches(p, g) for p, g in zip(parsed, golds)]
    n = len(golds)
    scores = {
        "json_valid": sum(follows_schema(p) for p in parsed) / n,
        "labels_valid": sum(is_valid(p) for p in parsed) / n,
        "field_acc": sum(sum(m.values()) / len(FIELDS) for m in matches) / n,
        "exact_match": sum(all(m.values()) for m in matches) / n,
    }
    scores.update({f"acc_{f}": sum(m[f] for m in matches) / n for f in FIELDS})
    return scores


def macro_f1(predicted: list, gold: list, labels: list) -> float:
    """Macro-averaged F1 over a label set (a prediction outside the set counts as wrong)."""
    scores = []
    for label in labels:
        tp = sum(p == label and g == label for p, g in zip(predicted, gold))
        fp = sum(p == label and g != label for p, g in zip(predicted, gold))
        fn = sum(p != label and g == label for p, g in zip(predicted, gold))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0)
    return sum(scores) / len(scores)


def bootstrap_ci(values: list[float], n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of per-example values and its percentile bootstrap confidence interval."""
    import numpy as np

    x = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(x.mean()), float(lo), float(hi)


def per_example(replies: list[str], golds: list[dict]) -> dict[str, list[float]]:
    """Per-example JSON validity, field accuracy and exact match (the units bootstrap resamples)."""
    from labkit.tickets import FIELDS, field_matches, follows_schema, parse_triage

    parsed = [parse_triage(r) for r in replies]
    matches = [field_matches(p, g) for p, g in zip(parsed, golds)]
    return {
        "json_valid": [float(follows_schema(p)) for p in parsed],
        "field_acc": [sum(m.values()) / len(FIELDS) for m in matches],
        "exact_match": [float(all(m.values())) for m in matches],
    }


def compare(results: dict[str, list[str]], golds: list[dict]):
    """A side-by-side table (pandas DataFrame) of several systems on one split, with 95 % bootstrap CIs."""
    import pandas as pd

    from labkit.tickets import LABEL_SETS, parse_triage

    rows = []
    for name, replies in results.items():
        row = {"system": name}
        for metric, values in per_example(replies, golds).items():
            mean, lo, hi = bootstrap_ci(values)
            row[metric] = mean
            row[f"{metric} 95% CI"] = f"[{lo:.3f}, {hi:.3f}]"
            row[f"_{metric}_ci"] = (lo, hi)
        parsed = [parse_triage(r) or {} for r in replies]
        for field, labels in LABEL_SETS.items():
            row[f"{field} macro-F1"] = macro_f1([p.get(field) for p in parsed], [g[field] for g in golds], labels)
        rows.append(row)
    return pd.DataFrame(rows).set_index("system")
