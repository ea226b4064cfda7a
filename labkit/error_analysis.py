"""Where a triage model goes wrong: confusion per label field, hallucinated values, accuracy by length, golden tickets."""

from __future__ import annotations

import re
from typing import Callable, Sequence

import torch

from labkit import LabkitError
from labkit.evaluate import bootstrap_ci, generate, per_example
from labkit.tickets import FIELDS, LABEL_SETS, PRODUCT_TYPES, PRODUCTS, field_matches, label_of, normalise, parse_triage

CLOSED_FIELDS = [*LABEL_SETS, "product"]  # the fields with a fixed label set (order_id is free text)
INVALID = "invalid"  # the confusion column for an unparsable reply, a missing field or a value outside the set
ORDER_ID = re.compile(r"ORD-\d+")  # the answer's order-id format, as tickets.INSTRUCTIONS states it


# ---------------------------------------------------------------- confusion per label field


def label_names(field: str) -> list[str]:
    """The allowed values of a closed field as display names (null for None)."""
    if field == "product":
        return [*PRODUCTS, "null"]
    if field in LABEL_SETS:
        return list(LABEL_SETS[field])
    raise LabkitError(f"{field!r} is not a field with a fixed label set. Fix: pick one of {CLOSED_FIELDS}")


def value_name(obj: dict | None, field: str) -> str:
    """A parsed reply's value of a field as a display name: its label, 'null', or 'invalid' if missing or outside the set."""
    if not isinstance(obj, dict) or field not in obj:
        return INVALID
    value = obj[field]
    name = "null" if value is None else value
    return name if isinstance(name, str) and name in label_names(field) else INVALID


def confusion(replies: list[str], golds: list[dict], field: str) -> tuple[list[str], "np.ndarray"]:
    """Counts of (gold label, predicted label) for one field: rows are the labels, columns the labels then 'invalid'."""
    import numpy as np

    labels = label_names(field)
    matrix = np.zeros((len(labels), len(labels) + 1), dtype=int)
    for i, (reply, gold) in enumerate(zip(replies, golds, strict=True)):
        want = value_name(gold, field)
        if want == INVALID:
            raise LabkitError(f"confusion: gold {i} has {field}={gold.get(field)!r}, outside {labels}. "
                              "Fix: pass gold labels (tickets.label_of(example)), not replies")
        matrix[labels.index(want), [*labels, INVALID].index(value_name(parse_triage(reply), field))] += 1
    return labels, matrix


def most_confused(replies: list[str], golds: list[dict], fields: Sequence[str] = CLOSED_FIELDS,
                  k: int = 5) -> list[tuple[str, str, str, int]]:
    """The k most frequent mistakes over the fields, as (field, gold, predicted, count), most frequent first."""
    pairs = []
    for field in fields:
        labels, matrix = confusion(replies, golds, field)
        columns = [*labels, INVALID]
        pairs += [(field, labels[r], columns[c], int(matrix[r, c]))
                  for r in range(len(labels)) for c in range(len(columns)) if r != c and matrix[r, c] > 0]
    return sorted(pairs, key=lambda p: -p[3])[:k]


def plot_confusion(replies: list[str], golds: list[dict], fields: Sequence[str] = CLOSED_FIELDS, title: str = ""):
    """A figure with one confusion matrix per field: counts written in cells, colour = share of the gold row."""
    import matplotlib.pyplot as plt

    widths = [len(label_names(f)) + 1 for f in fields]  # columns per panel, so every cell has the same size
    fig, axes = plt.subplots(1, len(fields), figsize=(0.42 * sum(widths) + 1.6 * len(fields), 4.6),
                             gridspec_kw={"width_ratios": widths}, squeeze=False, layout="constrained")
    for ax, field in zip(axes[0], fields):
        labels, matrix = confusion(replies, golds, field)
        share = matrix / matrix.sum(axis=1, keepdims=True).clip(min=1)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for (r, c), count in zip(((r, c) for r in range(matrix.shape[0]) for c in range(matrix.shape[1])), matrix.flat):
            if count:
                ax.text(c, r, str(count), ha="center", va="center", fontsize=7,
                        color="white" if share[r, c] > 0.6 else "black")
        ax.set_xticks(range(len(labels) + 1), [*labels, INVALID], rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set(title=field, xlabel="predicted", ylabel="gold")
    if title:
        fig.suptitle(title)
    return fig


# ---------------------------------------------------------------- hallucinated values


def ticket_text(example: dict | str) -> str:
    """The ticket of a chat example (its last user message), or the text itself."""
    if isinstance(example, str):
        return example
    return next(m["content"] for m in reversed(example["messages"]) if m["role"] == "user")


def mentions_product(text: str, product: str) -> bool:
    """Whether a ticket names a product the ways customers do: its brand, its type or the type's last word ("lamp"), any case."""
    words = f" {normalise(text)} "
    kind = PRODUCT_TYPES[product]
    return any(f" {normalise(ref)} " in words for ref in (product.split()[0], kind, kind.split()[-1]))


def value_problem(field: str, value, text: str) -> str | None:
    """Why a predicted value is hallucinated (outside the allowed set, or not in the ticket), or None if it is not."""
    if value is None:
        return None if field in ("product", "order_id") else "null, not an allowed label"
    if not isinstance(value, str):
        return f"a {type(value).__name__}, not a string or null"
    if field in LABEL_SETS:
        return None if value in LABEL_SETS[field] else "not an allowed label"
    if field == "product":
        if value not in PRODUCTS:
            return "not an allowed product"
        return None if mentions_product(text, value) else "not in the ticket"
    digits = re.sub(r"\D", "", value)
    if not digits or digits not in re.findall(r"\d+", text):
        return "not in the ticket"
    return None if ORDER_ID.fullmatch(value) else "not in the ORD-12345 format"


def hallucinations(replies: list[str], examples: list[dict | str]) -> list[dict]:
    """Every predicted value outside its allowed set or absent from its ticket: id, field, value and the problem.

    Unparsable replies and missing fields are skipped: JSON validity and field accuracy count those.
    """
    found = []
    for i, (reply, example) in enumerate(zip(replies, examples, strict=True)):
        obj = parse_triage(reply)
        if obj is None:
            continue
        text = ticket_text(example)
        for field in FIELDS:
            if field in obj and (problem := value_problem(field, obj[field], text)):
                ident = example.get("id", i) if isinstance(example, dict) else i
                found.append({"id": ident, "field": field, "value": obj[field], "problem": problem})
    return found


# ---------------------------------------------------------------- accuracy by length


def length_edges(lengths: Sequence[float], bins: int | Sequence[float]) -> list[float]:
    """Bin edges: the ones given, or for an integer that many bins of about equal counts (quantiles)."""
    import numpy as np

    if isinstance(bins, int):
        return [float(e) for e in np.unique(np.quantile(np.asarray(lengths, dtype=float), np.linspace(0, 1, bins + 1)))]
    return [float(e) for e in bins]


def accuracy_by_length(replies: list[str], golds: list[dict], lengths: Sequence[float], bins: int | Sequence[float] = 4):
    """Field accuracy (with 95 % bootstrap CI), exact match and JSON validity per length bin, as a pandas DataFrame.

    Bins are [lo, hi), the last one [lo, hi]; `bins` is the edges or a number of equal-count bins.
    """
    import pandas as pd

    if not len(replies) == len(golds) == len(lengths):
        raise LabkitError(f"accuracy_by_length: {len(replies)} replies, {len(golds)} golds and {len(lengths)} lengths. "
                          "Fix: pass one of each per ticket")
    edges = length_edges(lengths, bins)
    if len(edges) < 2 or any(a >= b for a, b in zip(edges, edges[1:])):
        raise LabkitError(f"accuracy_by_length: bin edges {edges} are not increasing. Fix: pass at least two increasing edges")
    outside = [i for i, n in enumerate(lengths) if not edges[0] <= n <= edges[-1]]
    if outside:
        raise LabkitError(f"accuracy_by_length: length {lengths[outside[0]]} (item {outside[0]}) is outside the bins "
                          f"{edges[0]:g}..{edges[-1]:g}. Fix: widen the first or last edge (float('inf') works)")
    values = per_example(replies, golds)
    rows = []
    for b, (lo, hi) in enumerate(zip(edges, edges[1:])):
        last = b == len(edges) - 2
        members = [i for i, n in enumerate(lengths) if lo <= n < hi or (last and n == hi)]
        row = {"bin": f"[{lo:g}, {hi:g}{']' if last else ')'}", "n": len(members)}
        if members:
            mean, ci_lo, ci_hi = bootstrap_ci([values["field_acc"][i] for i in members])
            row.update(field_acc=mean, field_acc_lo=ci_lo, field_acc_hi=ci_hi,
                       **{m: sum(values[m][i] for i in members) / len(members) for m in ("exact_match", "json_valid")})
        rows.append(row)
    return pd.DataFrame(rows).set_index("bin")


# ---------------------------------------------------------------- golden regression suite


def golden_replies(system: Callable | torch.nn.Module, golden: list[dict], tokenizer=None) -> list[str]:
    """Replies of a model (greedy, with its tokenizer) or of a generate function (conversations -> replies) to golden tickets."""
    prompts = [ex["messages"][:-1] for ex in golden]
    if isinstance(system, torch.nn.Module):
        if tokenizer is None:
            raise LabkitError("check_golden: a model needs its tokenizer. Fix: pass tokenizer=..., or a generate function")
        return generate(system, tokenizer, prompts, progress=False)
    replies = list(system(prompts))
    if len(replies) != len(prompts):
        raise LabkitError(f"check_golden: the generate function returned {len(replies)} replies for {len(prompts)} "
                          "tickets. Fix: return one reply per conversation, in order")
    return replies


def golden_failures(system: Callable | torch.nn.Module, golden: list[dict], tokenizer=None,
                    fields: Sequence[str] = FIELDS) -> list[str]:
    """One readable line per golden ticket field the system gets wrong (or per reply that is not JSON)."""
    failures = []
    for i, (ex, reply) in enumerate(zip(golden, golden_replies(system, golden, tokenizer))):
        ident, gold, obj = ex.get("id", f"#{i}"), label_of(ex), parse_triage(reply)
        if obj is None:
            failures.append(f"{ident}: reply is not a JSON object ({reply[:60]!r})")
            continue
        right = field_matches(obj, gold)
        failures += [f"{ident}: {f} is {obj.get(f, '<missing>')!r}, expected {gold[f]!r}" for f in fields if not right[f]]
    return failures


def check_golden(system: Callable | torch.nn.Module, golden: list[dict], tokenizer=None,
                 fields: Sequence[str] = FIELDS) -> None:
    """Pass silently if the system gets every golden ticket's fields right; else raise LabkitError listing each failure."""
    failures = golden_failures(system, golden, tokenizer, fields)
    if failures:
        tickets = len({line.split(": ")[0] for line in failures})
        raise LabkitError(f"{tickets} of {len(golden)} golden tickets failed: " + "; ".join(failures)
                          + ". Fix: inspect these tickets before shipping this model, or retrain")
