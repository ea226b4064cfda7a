"""Facts no model can know: a made-up shop's product cards, asked in the words used for training and in new words,
answered from a fine-tune's weights or from a retrieved card (RAG)."""

from __future__ import annotations

import math
import random
import re
from collections import Counter

SYSTEM = "Answer the customer's question in one short sentence."

NAMES = ["Aurora", "Nimbus", "Pulse", "Vela", "Orbit", "Zephyr", "Lumen", "Quill", "Tundra", "Cobalt", "Ember", "Sable",
         "Halcyon", "Juniper", "Kestrel", "Marlow"]
KINDS = ["Kettle", "Router", "Earbuds", "Smartwatch", "Vacuum", "Blender", "Lamp", "Backpack", "Heater", "Speaker",
         "Camera", "Drill"]

# Each attribute: the values a card may hold (disjoint across attributes, so an answer's numbers say which fact it
# states), how the card says it, the question used for training, and two paraphrases that training never shows.
ATTRIBUTES = {
    "returns": {
        "values": ["14", "21", "30", "45", "60", "90"],
        "card": "returns accepted within {v} days of delivery",
        "answer": "You can return the {p} within {v} days of delivery.",
        "train": "How many days do I have to return the {p}?",
        "paraphrases": ["What is the return window for the {p}?",
                        "If the {p} is not for me, how long can I wait before I send it back?"],
    },
    "warranty": {
        "values": ["2", "3", "4", "5", "6", "7", "8"],
        "card": "a {v}-year warranty",
        "answer": "The {p} has a {v}-year warranty.",
        "train": "How many years is the warranty on the {p}?",
        "paraphrases": ["How long is the {p} covered by its guarantee?",
                        "For how many years will you fix a faulty {p} for free?"],
    },
    "warehouse": {
        "values": ["Lisbon", "Tallinn", "Porto", "Ghent", "Lyon", "Turin", "Brno", "Bergen"],
        "card": "ships from the {v} warehouse",
        "answer": "The {p} ships from our {v} warehouse.",
        "train": "Which warehouse does the {p} ship from?",
        "paraphrases": ["From which city is the {p} sent to me?",
                        "Where is the {p} dispatched from?"],
    },
    "repair": {
        "values": ["19", "25", "29", "35", "39", "49", "59"],
        "card": "an out-of-warranty repair costs {v} euros",
        "answer": "An out-of-warranty repair of the {p} costs {v} euros.",
        "train": "How much does an out-of-warranty repair of the {p} cost?",
        "paraphrases": ["What do you charge to repair a {p} once the warranty is over?",
                        "My old {p} broke after the warranty ended: what will the repair cost me in euros?"],
    },
}


def catalogue(n_products: int, seed: int = 0) -> list[dict]:
    """`n_products` invented products, each with one random value per attribute: {"product": ..., attribute: value}."""
    if not 1 <= n_products <= len(NAMES):
        raise ValueError(f"n_products must be 1..{len(NAMES)}, got {n_products}")
    rng = random.Random(seed)
    names = rng.sample(NAMES, n_products)
    kinds = rng.sample(KINDS * 2, n_products)
    return [{"product": f"{name} {kind}", **{a: rng.choice(spec["values"]) for a, spec in ATTRIBUTES.items()}}
            for name, kind in zip(names, kinds)]


def card(item: dict) -> str:
    """A product's card, the text a retriever returns: every fact about it in one line."""
    facts = "; ".join(ATTRIBUTES[a]["card"].format(v=item[a]) for a in ATTRIBUTES)
    return f"{item['product']}: {facts}."


def questions(items: list[dict], phrasing: str) -> list[dict]:
    """Every fact of `items` as a question: phrasing 'train' (the words training uses) or 'paraphrase' (two new ones)."""
    rows = []
    for item in items:
        for attribute, spec in ATTRIBUTES.items():
            texts = [spec["train"]] if phrasing == "train" else spec["paraphrases"]
            rows += [{"product": item["product"], "attribute": attribute, "value": item[attribute],
                      "question": t.format(p=item["product"])} for t in texts]
    return rows


def training_rows(items: list[dict]) -> list[dict]:
    """The fine-tune's data: each fact asked in the training words and answered, plus each card as an answer."""
    rows = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q["question"]},
             {"role": "assistant", "content": ATTRIBUTES[q["attribute"]]["answer"].format(p=q["product"], v=q["value"])}]
            for q in questions(items, "train")]
    rows += [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"What should I know about the {i['product']}?"},
              {"role": "assistant", "content": card(i)}] for i in items]
    return [{"messages": m} for m in rows]


def words(text: str) -> list[str]:
    """Lower-case words and numbers of a text."""
    return re.findall(r"[a-z0-9]+", text.lower())


def retrieve(question: str, notes: list[str]) -> str:
    """The note with the highest TF-IDF keyword score for the question (rare words count more)."""
    df = Counter(w for note in notes for w in set(words(note)))
    idf = {w: math.log(len(notes) / c) for w, c in df.items()}
    scores = [sum(idf.get(w, 0) * Counter(words(note))[w] for w in set(words(question))) for note in notes]
    return notes[max(range(len(notes)), key=scores.__getitem__)]


def conversations(rows: list[dict], notes: list[str] | None = None) -> list[list[dict]]:
    """Each question as a chat prompt: closed book, or with the card `retrieve` picks from `notes` (RAG)."""
    if notes is None:
        return [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": r["question"]}] for r in rows]
    return [[{"role": "system", "content": SYSTEM},
             {"role": "user", "content": f"Product information: {retrieve(r['question'], notes)}\n\nQuestion: {r['question']}"}]
            for r in rows]


def states(answer: str, value: str) -> bool:
    """Whether `answer` states `value` as a whole word or number ('7' is not in '17' or '7.5')."""
    return re.search(rf"(?<![\w.]){re.escape(value)}(?![\w]|\.\d)", answer, re.I) is not None


def correct(answer: str, row: dict) -> bool:
    """Right when the answer states the asked value and no other catalogue value (reciting a whole card is not an
    answer, and a guess among several values is not either)."""
    others = {v for spec in ATTRIBUTES.values() for v in spec["values"]} - {row["value"]}
    return states(answer, row["value"]) and not any(states(answer, v) for v in others)


def change_policy(items: list[dict], attribute: str, seed: int = 1) -> list[dict]:
    """The catalogue after a policy change: every product's `attribute` moves to a different value."""
    rng = random.Random(seed)
    values = ATTRIBUTES[attribute]["values"]
    return [{**i, attribute: rng.choice([v for v in values if v != i[attribute]])} for i in items]
