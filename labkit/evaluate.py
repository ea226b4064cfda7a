"""The eval core: batched greedy generation and the running task's metrics."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from labkit import LabkitError
from labkit.paths import cache_root
from labkit.runtime import model_autocast, pick_amp_dtype
from labkit.store import StoreError, cached, content_key, read_json
from labkit.tickets import FIELDS, LABEL_SETS, field_matches, follows_schema, is_valid, parse_triage


@torch.no_grad()
def generate(
    model,
    tokenizer,
    conversations: list[list[dict]],
    max_new_tokens: int = 64,
    batch_size: int = 32,
    progress: bool = True,
    logits_processor=None,
) -> list[str]:
    """Greedy replies to chat prompts: the same tokens as `model.generate`, computed with less waste.

    Prompts go in batches of similar length (little padding), a KV cache means each step runs one token per
    row, and a row that reaches end of turn leaves the batch (and its cache) at once. `logits_processor`
    (e.g. `labkit.constrain.GrammarLogitsProcessor`) may change each step's scores: see `greedy_batch`.
    """
    device = next(model.parameters()).device
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # longest first: peak memory up front
    replies: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    with model_autocast(model):
        for start in tqdm(range(0, len(order), batch_size), desc="generate", disable=not progress, leave=False):
            idx = order[start : start + batch_size]
            tokens = greedy_batch(model, [prompts[i] for i in idx], max_new_tokens, tokenizer.eos_token_id,
                                  tokenizer.pad_token_id, device, logits_processor)
            for i, row in zip(idx, tokens):
                replies[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    model.train(was_training)
    return replies


def cached_generate(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int, model_key: str,
                    progress: bool = True, batch_size: int = 32, logits_processor=None,
                    precision_of=None) -> list[str]:
    """`generate`'s replies, cached on disk by content: `model_key` (which weights) + the prompts + the length.

    `model_key` must name the weights exactly (e.g. the base model's name and the cached adapter folders' names,
    which are hashes of data and configuration): a wrong key returns another model's replies. A `logits_processor`
    must name itself with a `cache_key` (as `labkit.constrain.GrammarLogitsProcessor` does). `model` may also be a
    function that builds the model, called only on a cache miss (for models costly to make, e.g. merges); then
    `precision_of` is a model with the same dtype and device, whose precision goes into the key.
    """
    built = isinstance(model, torch.nn.Module)
    if not built and not isinstance(precision_of, torch.nn.Module):
        raise LabkitError("cached_generate: `model` is a builder function, so pass `precision_of=` a model with the "
                          "dtype and device the built model will have (its precision is part of the cache key)")
    parameter = next((model if built else precision_of).parameters())  # precision changes greedy replies: in the key
    precision = f"{parameter.dtype}, {parameter.device.type}, autocast {pick_amp_dtype(parameter.device.type)}"
    key = {"model": model_key, "conversations": conversations, "max_new_tokens": max_new_tokens, "precision": precision}
    if batch_size != 32:  # padding differs with the batch, so replies may too; the default stays out of older keys
        key["batch_size"] = batch_size
    if logits_processor is not None:  # constrained replies differ from free ones; free keys stay as they were
        if getattr(logits_processor, "cache_key", None) is None:
            raise LabkitError(f"cached_generate: {type(logits_processor).__name__} has no `cache_key`, so its replies "
                              "cannot be cached. Fix: give it a cache_key string, or call generate() uncached")
        key["logits_processor"] = logits_processor.cache_key
    path = cache_root() / "replies" / f"{content_key(key, length=24)}.json"
    return cached(path, lambda p: read_replies(p, len(conversations)),
                  lambda: generate(model if built else model(), tokenizer, conversations, max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, progress=progress, logits_processor=logits_processor),
                  lambda replies, tmp: tmp.write_text(json.dumps({"model": model_key, "replies": replies}),
                                                      encoding="utf-8"))


def read_replies(path: Path, count: int) -> list[str]:
    """The `count` replies cached in `path`, verified to be that many strings."""
    stored = read_json(path)
    replies = stored.get("replies") if isinstance(stored, dict) else None
    if not (isinstance(replies, list) and len(replies) == count and all(isinstance(r, str) for r in replies)):
        raise StoreError(f"{path}: cached replies are not {count} strings. Fix: delete {path}; the next run "
                         "generates them again")
    return replies


def greedy_batch(model, prompts: list[list[int]], max_new_tokens: int, eos_id: int, pad_id: int,
                 device: torch.device | str = "cpu", logits_processor=None) -> list[list[int]]:
    """New token ids for each prompt by greedy decoding (up to and including end of turn), KV-cached.

    `logits_processor(generated, scores)` (a transformers LogitsProcessor) may change each step's scores; it sees
    the live rows' generated tokens so far, without the prompt, and must keep no per-row state (rows leave).
    """
    from transformers import DynamicCache

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):  # left padding: every row's next token lands in the same column
        ids[r, width - len(p) :], mask[r, width - len(p) :] = torch.tensor(p), 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    cache = DynamicCache()
    live = torch.arange(len(prompts), device=device)  # which prompts are still generating, by batch row
    out: list[list[int]] = [[] for _ in prompts]
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1]
        if logits_processor is not None:
            generated = torch.tensor([out[r] for r in live.tolist()], dtype=torch.long, device=device)
            logits = logits_processor(generated.reshape(len(live), -1), logits)
        nxt = logits.argmax(-1)
        for r, token in zip(live.tolist(), nxt.tolist()):
            out[r].append(token)
        going = nxt != eos_id
        if not going.all():  # finished rows leave the batch and the cache: they cost nothing from here on
            keep = going.nonzero()[:, 0]
            if len(keep) == 0:
                break
            cache.batch_select_indices(keep)
            live, nxt, mask, positions = live[keep], nxt[keep], mask[keep], positions[keep]
        ids = nxt[:, None]
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
        positions = positions[:, -1:] + 1
    return out


def score_triage(replies: list[str], golds: list[dict]) -> dict[str, float]:
    """JSON validity, mean per-field accuracy and whole-record exact match of triage replies."""

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
    """Per-example JSON validity, field accuracy, exact match and each field's accuracy (the units bootstrap resamples)."""

    parsed = [parse_triage(r) for r in replies]
    matches = [field_matches(p, g) for p, g in zip(parsed, golds)]
    return {
        "json_valid": [float(follows_schema(p)) for p in parsed],
        "field_acc": [sum(m.values()) / len(FIELDS) for m in matches],
        "exact_match": [float(all(m.values())) for m in matches],
        **{f"acc_{f}": [float(m[f]) for m in matches] for f in FIELDS},
    }


def compare(results: dict[str, list[str]], golds: list[dict]):
    """A side-by-side table (pandas DataFrame) of several systems on one split, with 95 % bootstrap CIs."""
    import pandas as pd


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


# ---------------------------------------------------------------- general-knowledge probes (forgetting)

PROBE_TOKENS = 24  # enough for a one-sentence answer; the answer word comes first in nearly every reply


def probe_conversations(probes: list[dict], system: str | None = None) -> list[list[dict]]:
    """Each probe's question as a chat prompt (with `system` if given, else the model's default system prompt)."""
    head = [{"role": "system", "content": system}] if system else []
    return [head + [{"role": "user", "content": p["question"]}] for p in probes]


def probe_correct(reply: str, answers: list[str]) -> bool:
    """Whether the reply states one of the accepted answers as a whole word (case-insensitive)."""
    import re

    return any(re.search(rf"(?<![\w-]){re.escape(a)}(?![\w-])", reply, flags=re.IGNORECASE) for a in answers)


def score_probes(replies: list[str], probes: list[dict]) -> list[float]:
    """1.0 for each probe answered correctly, else 0.0 (the units a bootstrap CI resamples)."""
    if len(replies) != len(probes):
        raise ValueError(f"{len(replies)} replies for {len(probes)} probes")
    return [float(probe_correct(r, p["answers"])) for r, p in zip(replies, probes)]
