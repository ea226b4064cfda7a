"""Data preparation: validate, convert, clean, decontaminate and split fine-tuning JSONL files."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter, defaultdict
from itertools import zip_longest
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from labkit.data import (ROLES, DataError, Problem, chat_issues, json_type, pair_issues, problems_message, read_bytes,
                         read_lines)
from labkit.tickets import FIELDS, is_valid, normalise

FORMATS = ("messages", "instruction", "completion", "preference")


# ---------------------------------------------------------------- formats


def detect_format(record: dict) -> str | None:
    """Which of the four formats a record is in, or None."""
    if "messages" in record:
        return "messages"
    if {"prompt", "chosen", "rejected"} <= set(record):
        return "preference"
    if {"instruction", "output"} <= set(record):
        return "instruction"
    if {"prompt", "completion"} <= set(record):
        return "completion"
    return None


def to_messages(record: dict, system: str | None = None) -> dict:
    """Convert an instruction or completion record to the chat `messages` format."""
    fmt = detect_format(record)
    head = [{"role": "system", "content": system}] if system else []
    if fmt == "messages":
        return record
    if fmt == "instruction":
        user = record["instruction"] + (("\n\n" + record["input"]) if record.get("input") else "")
        return {"messages": head + [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]}
    if fmt == "completion":
        return {"messages": head + [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]}
    raise DataError(f"cannot convert a {fmt or 'unknown'}-format record to messages; expected instruction or completion.")


def to_instruction(record: dict) -> dict:
    """Convert a chat record (system, user, assistant) to Alpaca instruction format."""
    msgs = record["messages"]
    system = next((m["content"] for m in msgs if m["role"] == "system"), "")
    user = next(m["content"] for m in msgs if m["role"] == "user")
    return {"instruction": system, "input": user, "output": msgs[-1]["content"]}


def to_completion(record: dict, tokenizer) -> dict:
    """Convert a chat record to prompt/completion text with the model's chat template."""
    msgs = record["messages"]
    prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    return {"prompt": prompt, "completion": msgs[-1]["content"] + tokenizer.eos_token}


# ---------------------------------------------------------------- validation


def _check_messages(msgs, triage: bool, max_length: int | None = None) -> list[tuple[str, str, str, str]]:
    """(kind, field, message, fix) for each problem of one `messages` value: labkit.data's checks, then the answer's schema."""
    issues = chat_issues(msgs, max_length)
    if issues or not triage:
        return issues
    try:
        answer = json.loads(msgs[-1]["content"])
    except ValueError:
        return [("malformed", f"messages[{len(msgs) - 1}].content", "the answer is not valid JSON", "write the canonical answer with labkit.tickets.to_json")]
    if not is_valid(answer):
        return [("malformed", f"messages[{len(msgs) - 1}].content", "the answer has a field or label outside the schema", f"use the fields {FIELDS} with allowed labels")]
    return []


def validate_lines(path: str | Path, triage: bool = True,
                   max_length: int | None = None) -> tuple[list[tuple[int, dict]], list[Problem]]:
    """Read a JSONL file and return (line, record) for valid records and every problem found (no early stop).

    Chat records and preference pairs get labkit.data's checks (the ones training runs); `triage` also checks each
    chat answer against the ticket schema, `max_length` refuses text that cannot fit in that many tokens.
    """
    path = Path(path)
    values, problems = read_lines(path)
    if not values and not problems:
        return [], [Problem(1, "empty", "file", f"{path.name} is empty (0 records)", "check the export step that wrote it")]
    good = []
    for n, record in values:
        if not isinstance(record, dict) or detect_format(record) is None:
            keys = sorted(record) if isinstance(record, dict) else f"none: the line is {json_type(record)}, not an object"
            problems.append(Problem(n, "malformed", "format", f"unknown format (keys {keys})", "use messages, instruction/output, prompt/completion or prompt/chosen/rejected"))
            continue
        fmt = detect_format(record)
        if fmt == "messages":
            issues = _check_messages(record["messages"], triage, max_length)
        else:
            issues = pair_issues(record, max_length) if fmt == "preference" else []
        problems += [Problem(n, *issue) for issue in issues]
        if not issues:
            good.append((n, record))
    problems.sort(key=lambda p: p.line)
    return good, problems


def load_jsonl(path: str | Path, triage: bool = True, max_length: int | None = None) -> list[dict]:
    """Valid records of a file, or a DataError listing every problem (file:line:field: what. Fix: how)."""
    good, problems = validate_lines(path, triage, max_length)
    if problems:
        raise DataError(problems_message(path, problems))
    return [r for _, r in good]


# ---------------------------------------------------------------- duplicates and contradictions


def prompt_key(record: dict) -> str:
    """Normalised text of everything before the answer: the key for duplicates and contradictions."""
    return normalise(" ".join(m["content"] for m in record["messages"][:-1]))


def find_duplicates(rows: list[tuple[int, dict]]) -> list[Problem]:
    """Exact/surface duplicates (same normalised prompt and answer) and contradictions (same prompt, other answer)."""
    problems, first = [], {}
    by_prompt: dict[str, dict[str, int]] = defaultdict(dict)
    for n, rec in rows:
        answer = normalise(rec["messages"][-1]["content"])
        key = prompt_key(rec)
        raw = json.dumps(rec["messages"], sort_keys=True)
        if answer in by_prompt[key]:
            src = by_prompt[key][answer]
            kind = "exact_duplicate" if first[src] == raw else "near_duplicate_surface"
            problems.append(Problem(n, kind, "messages", "repeats an earlier record", "keep one copy", src))
        elif by_prompt[key]:
            src = next(iter(by_prompt[key].values()))
            problems.append(Problem(n, "contradiction", "assistant", "same input, different answer", "relabel or drop both", src))
            by_prompt[key][answer] = n
        else:
            by_prompt[key][answer] = n
        first.setdefault(n, raw)
    return problems


def shingles(text: str, n: int = 3) -> set[str]:
    """Word n-grams of normalised text."""
    w = normalise(text).split()
    return {" ".join(w[i : i + n]) for i in range(max(1, len(w) - n + 1))}


def minhash(items: set[str], num_perm: int = 128) -> np.ndarray:
    """MinHash signature: for each of num_perm salted hashes, the minimum over the set."""
    h = np.array([int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") for s in items], dtype=np.uint64)
    salts = np.random.default_rng(0).integers(1, 2**63, size=num_perm, dtype=np.uint64)
    return ((h[None, :] * (salts[:, None] | np.uint64(1))) ^ salts[:, None]).min(axis=1)


def jaccard(a: set, b: set) -> float:
    """|A and B| / |A or B|."""
    return len(a & b) / max(1, len(a | b))


def nearest_jaccard(queries: list[dict], reference: list[dict], n: int = 3) -> list[float]:
    """For each query ticket, the word n-gram Jaccard to its most similar reference ticket (1.0: a copy)."""
    user = lambda ex: next(m["content"] for m in ex["messages"] if m["role"] == "user")  # noqa: E731
    index: dict[str, list[int]] = defaultdict(list)
    ref_sets = [shingles(user(ex), n) for ex in reference]
    for j, grams in enumerate(ref_sets):
        for g in grams:
            index[g].append(j)
    nearest = []
    for ex in queries:
        grams = shingles(user(ex), n)
        shared = Counter(j for g in grams for j in index.get(g, ()))  # only tickets sharing an n-gram can score > 0
        nearest.append(max((c / (len(grams) + len(ref_sets[j]) - c) for j, c in shared.items()), default=0.0))
    return nearest


def find_near_duplicates(rows: list[tuple[int, dict]], threshold: float = 0.8) -> list[Problem]:
    """Near duplicates of the user text: MinHash candidates (estimate >= threshold - 0.15), verified by exact Jaccard."""
    texts = [next(m["content"] for m in r["messages"] if m["role"] == "user") for _, r in rows]
    sets = [shingles(t) for t in texts]
    sig = np.stack([minhash(s) for s in sets])
    problems, dropped = [], set()
    for i in range(len(rows)):
        est = (sig[i + 1 :] == sig[i]).mean(axis=1)
        for j in np.nonzero(est >= threshold - 0.15)[0] + i + 1:
            if j in dropped or normalise(texts[i]) == normalise(texts[j]) or jaccard(sets[i], sets[j]) < threshold:
                continue
            dropped.add(j)
            problems.append(Problem(rows[j][0], "near_duplicate_word", "user", f"Jaccard {jaccard(sets[i], sets[j]):.2f} with another record",
                                    "keep one copy", rows[i][0]))
    return problems


def find_test_leaks(rows: list[tuple[int, dict]], test: list[dict], n: int = 8, threshold: float = 0.6) -> list[Problem]:
    """Records whose user text shares >= threshold of its word n-grams (Jaccard) with one test ticket."""
    index: dict[str, set[int]] = defaultdict(set)
    test_sets = [shingles(ex["messages"][1]["content"], n) for ex in test]
    for t, s in enumerate(test_sets):
        for g in s:
            index[g].add(t)
    problems = []
    for line, rec in rows:
        user = next((m["content"] for m in rec["messages"] if m.get("role") == "user"), None)
        if user is None:  # no ticket, nothing to leak (e.g. an unknown role)
            continue
        s = shingles(user, n)
        hits = Counter(t for g in s for t in index.get(g, ()))
        best = max(hits, key=lambda t: jaccard(s, test_sets[t]), default=None)
        if best is not None and jaccard(s, test_sets[best]) >= threshold:
            problems.append(Problem(line, "test_leak", "user", f"{n}-gram Jaccard {jaccard(s, test_sets[best]):.2f} with test record {test[best].get('id', best)}",
                                    "remove it from training data"))
    return problems


# ---------------------------------------------------------------- the pipeline and its report


@dataclass
class QualityReport:
    """What cleaning found and kept: counts per problem kind, and the problems themselves."""

    path: str
    lines: int
    kept: int
    counts: dict[str, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    def __str__(self) -> str:
        rows = "\n".join(f"  {k:<24}{v:>5}" for k, v in sorted(self.counts.items()))
        return f"{self.path}: {self.lines} lines -> {self.kept} kept\n{rows}"


def clean(path: str | Path, test: list[dict] | None = None) -> tuple[list[dict], QualityReport]:
    """Validate, dedup (exact, surface, near), drop contradictions (all sides) and test leaks; return records and report."""
    rows, problems = validate_lines(path)
    dupes = find_duplicates(rows)
    contradicted = {p.line for p in dupes if p.kind == "contradiction"} | {p.same_as for p in dupes if p.kind == "contradiction"}
    drop = {p.line for p in dupes} | contradicted
    rest = [(n, r) for n, r in rows if n not in drop]
    near = find_near_duplicates(rest)
    drop |= {p.line for p in near}
    leaks = find_test_leaks([(n, r) for n, r in rest if n not in drop], test) if test else []
    drop |= {p.line for p in leaks}
    problems += dupes + near + leaks
    kept = [r for n, r in rows if n not in drop]
    n_lines = read_bytes(path).count(b"\n")
    return kept, QualityReport(str(path), n_lines, len(kept), dict(Counter(p.kind for p in problems)), problems)


def compare_with_manifest(problems: list[Problem], manifest: dict) -> dict[str, dict[str, int]]:
    """Per category: planted, reported, matched (a report touches the planted line or its source), extra."""
    out = {}
    for kind, entries in manifest.items():
        found = [p for p in problems if p.kind == kind]
        used, matched = set(), 0
        for e in entries:
            want = {e["line"], e.get("same_as_line")} - {None}
            hit = next((i for i, p in enumerate(found) if i not in used and ({p.line, p.same_as} & want)), None)
            if hit is not None:
                used.add(hit)
                matched += 1
        out[kind] = {"planted": len(entries), "reported": len(found), "matched": matched, "extra": len(found) - len(used)}
    return out


def stratified_split(records: list[dict], fractions: tuple[float, ...] = (0.8, 0.1, 0.1), key=None, seed: int = 0) -> list[list[dict]]:
    """Split records into parts with the same label mix; records with the same prompt go to the same part."""
    key = key or (lambda r: json.loads(r["messages"][-1]["content"])["category"])
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[prompt_key(r)].append(r)
    by_label: dict[str, list[list[dict]]] = defaultdict(list)
    for g in groups.values():
        by_label[key(g[0])].append(g)
    parts: list[list[dict]] = [[] for _ in fractions]
    rng = random.Random(seed)
    for label in sorted(by_label):
        gs = by_label[label]
        rng.shuffle(gs)
        bounds = np.cumsum([0, *fractions]) / sum(fractions) * len(gs)
        for p in range(len(fractions)):
            for g in gs[round(bounds[p]) : round(bounds[p + 1])]:
                parts[p] += g
    return parts


# ---------------------------------------------------------------- experiments: quality and quantity


def careless_records(path: str | Path) -> list[dict]:
    """What a careless user trains on: every line that parses to a chat record the chat template can render.

    Nothing else is checked, so duplicates, contradictions, test leaks, empty or broken answers and
    unknown roles all stay in. Lines that would crash the trainer (not JSON, not UTF-8, `messages` not a
    non-empty list of {role, content} strings) are skipped, as a user would after the first crash.
    """
    records = []
    for _, record in read_lines(path)[0]:  # lines that are not JSON or not UTF-8 are skipped
        msgs = record.get("messages") if isinstance(record, dict) else None
        if isinstance(msgs, list) and msgs and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs
        ):
            records.append(record)
    return records


def nested_subsets(records: list[dict], sizes: list[int], key=None, seed: int = 0) -> dict[int, list[dict]]:
    """Training sets for a learning curve: the first n records of one shuffled, label-balanced order.

    Every larger set contains every smaller one, so the curve measures what *adding* examples buys
    rather than which examples were drawn; labels take turns, so even 10 records cover 5 categories.
    """
    key = key or (lambda r: json.loads(r["messages"][-1]["content"])["category"])
    if max(sizes) > len(records):
        raise DataError(f"asked for {max(sizes)} records but there are only {len(records)}; use smaller sizes.")
    by_label: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_label[key(r)].append(r)
    rng = random.Random(seed)
    for label in sorted(by_label):
        rng.shuffle(by_label[label])
    turns = zip_longest(*(by_label[label] for label in sorted(by_label)))
    order = [r for turn in turns for r in turn if r is not None]
    return {n: order[:n] for n in sizes}


# ---------------------------------------------------------------- mixing general data in (replay, notebook 07)


def chat_rows(prompts: list[str], replies: list[str]) -> list[dict]:
    """Prompt/reply pairs as chat training rows (no system turn: the model's default one applies)."""
    return [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]}
            for p, r in zip(prompts, replies, strict=True)]


def mix_in(task: list[dict], general: list[dict], share: float, seed: int = 0) -> list[dict]:
    """The task rows plus general rows making up `share` of the result (cycled if too few), shuffled."""
    if not 0 < share < 1:
        raise ValueError(f"share={share} must be between 0 and 1 (e.g. 0.15 for 15 % general data)")
    if not general:
        raise ValueError("no general rows to mix in")
    n_general = round(share / (1 - share) * len(task))
    mixed = task + [general[i % len(general)] for i in range(n_general)]
    random.Random(seed).shuffle(mixed)
    return mixed
