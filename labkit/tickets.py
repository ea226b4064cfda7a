"""The running example: support tickets triaged into strict JSON, and a seeded generator of them."""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass

# The contract: exactly these fields, in this order, with these label sets.
CATEGORIES = ["billing", "technical", "account", "shipping", "returns"]
PRIORITIES = ["low", "medium", "high"]
SENTIMENTS = ["negative", "neutral", "positive"]
PRODUCTS = [
    "Aurora Kettle", "Nimbus Router", "Pulse Earbuds", "Vela Smartwatch", "Orbit Vacuum",
    "Cedar Desk Lamp", "Atlas Backpack", "Zephyr Fan", "Lumen Projector", "Harbor Blender",
]
FIELDS = ["category", "priority", "sentiment", "product", "order_id"]
LABEL_SETS = {"category": CATEGORIES, "priority": PRIORITIES, "sentiment": SENTIMENTS}

SYSTEM_PROMPT = "Triage the support ticket. Reply with JSON only."

# The prompt-engineering baseline's system prompt: everything a careful prompt engineer would say.
INSTRUCTIONS = (
    "You triage customer support tickets. Reply with one JSON object and nothing else, with exactly "
    "these keys in this order:\n"
    f'"category": one of {CATEGORIES}\n'
    f'"priority": one of {PRIORITIES} (high if the customer says it is urgent, low if there is no rush)\n'
    f'"sentiment": one of {SENTIMENTS}\n'
    f'"product": one of {PRODUCTS}, or null if no product is named\n'
    '"order_id": the order number such as "ORD-12345", or null'
)


def prompt_conversations(examples: list[dict], system: str = SYSTEM_PROMPT, shots: list[dict] = ()) -> list[list[dict]]:
    """Chat prompts for examples: a system message, optional few-shot turns, then the ticket."""
    few = [m for ex in shots for m in ex["messages"][1:]]
    return [[{"role": "system", "content": system}, *few, ex["messages"][1]] for ex in examples]

# ---------------------------------------------------------------- the answer format


def to_json(label: dict) -> str:
    """The one canonical JSON string for a label (fields in order, compact spacing)."""
    return json.dumps({k: label[k] for k in FIELDS}, ensure_ascii=False)


def parse_triage(text: str) -> dict | None:
    """Parse a model's answer: the first JSON object in it, or None if there is none."""
    start = text.find("{")
    if start < 0:
        return None
    try:
        obj, _ = json.JSONDecoder().raw_decode(text[start:])
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def follows_schema(obj: dict | None) -> bool:
    """Format compliance: exactly the schema's fields, in order, each a string or null."""
    return isinstance(obj, dict) and list(obj) == FIELDS and all(v is None or isinstance(v, str) for v in obj.values())


def is_valid(obj: dict | None) -> bool:
    """Follows the schema and every value comes from its allowed set."""
    if not follows_schema(obj):
        return False
    for field, labels in LABEL_SETS.items():
        if obj[field] not in labels:
            return False
    if obj["product"] is not None and obj["product"] not in PRODUCTS:
        return False
    return obj["order_id"] is None or isinstance(obj["order_id"], str)


def field_matches(pred: dict | None, gold: dict) -> dict[str, bool]:
    """Per-field correctness of one prediction (a missing or unparsable field counts as wrong)."""
    pred = pred if isinstance(pred, dict) else {}
    return {f: f in pred and pred[f] == gold[f] for f in FIELDS}


# ---------------------------------------------------------------- the generator
# Phrase banks: each category has its own vocabulary, and priority and sentiment are signalled by
# cue sentences, sampled independently so that no field can be guessed from another.

ISSUES = {
    "billing": [
        "I was charged twice for {product_ref}{order_ref}.",
        "My invoice{order_ref} shows the wrong amount for {product_ref}.",
        "There is a charge on my credit card I don't recognise{order_ref}.",
        "The discount code was not applied when I paid for {product_ref}{order_ref}.",
        "Can you send me a VAT invoice for {product_ref}{order_ref}?",
        "I was billed for a subscription I cancelled last month.",
        "Why did the price of {product_ref} go up after checkout{order_ref}?",
        "My payment failed but the money left my bank account{order_ref}.",
    ],
    "technical": [
        "{product_ref_cap} keeps disconnecting from wifi{order_ref}.",
        "{product_ref_cap} won't turn on after the latest firmware update.",
        "The app crashes every time I try to pair {product_ref}.",
        "{product_ref_cap} shows error code E{code} and then restarts.",
        "The battery on {product_ref} drains in about an hour{order_ref}.",
        "{product_ref_cap} makes a loud buzzing noise when it is running.",
        "Bluetooth pairing with {product_ref} fails on my phone.",
        "The screen on {product_ref} flickers and freezes{order_ref}.",
    ],
    "account": [
        "I can't log in to my account, the password reset email never arrives.",
        "Please change the email address on my account to {email}.",
        "My account was locked after too many login attempts.",
        "How do I delete my account and all my data?",
        "Someone else may have accessed my account, I see logins I don't recognise.",
        "I want to merge my two accounts into one.",
        "The two-factor code is not accepted when I sign in.",
        "Please update the username on my profile to {username}.",
    ],
    "shipping": [
        "My package{order_ref} still hasn't arrived and tracking has not updated for a week.",
        "The courier marked {product_ref}{order_ref} as delivered but nothing came.",
        "Can I change the delivery address for{order_ref_bare} before it ships?",
        "Tracking says my parcel{order_ref} is stuck in customs.",
        "The delivery{order_ref} was left at the wrong house.",
        "When will {product_ref} ship{order_ref}? It says pending for days.",
        "I paid for express delivery but {product_ref}{order_ref} came late.",
        "The box{order_ref} arrived crushed and the delivery driver left it in the rain.",
    ],
    "returns": [
        "I'd like to return {product_ref}{order_ref}, it's not what I expected.",
        "{product_ref_cap} arrived with a cracked part and I want an exchange{order_ref}.",
        "How do I get a return label for {product_ref}{order_ref}?",
        "I sent back {product_ref}{order_ref} two weeks ago and the return still shows open.",
        "Can I exchange {product_ref} for a different colour{order_ref}?",
        "{product_ref_cap} stopped working after three days, I want to send it back{order_ref}.",
        "Is {product_ref} still within the 30-day return window{order_ref}?",
        "The wrong item was in the box{order_ref}, I ordered {product_ref} and need to return this one.",
    ],
}

PRIORITY_CUES = {
    "high": [
        "This is urgent, please fix it today.", "I need this sorted ASAP.",
        "Please treat this as urgent.", "It's an emergency, my business depends on it.",
        "I need an answer immediately.", "Urgent: please escalate this right away.",
    ],
    "medium": ["", "", "Please let me know the next steps.", "Could you look into it this week?"],
    "low": [
        "No rush, whenever you get a chance.", "No hurry at all, reply when convenient.",
        "Just asking for future reference, no rush.", "Low priority, whenever suits you.",
        "No hurry on this one.",
    ],
}

SENTIMENT_CUES = {
    "negative": [
        "I'm really frustrated with this.", "Honestly this is unacceptable.",
        "I'm very disappointed with your service.", "This is the third time, I'm fed up.",
        "Terrible experience so far.", "I'm angry that nobody has replied.",
    ],
    "neutral": ["", "", "Thank you.", "Thanks in advance."],
    "positive": [
        "I love your products otherwise!", "You've always been great, so I'm sure you can help.",
        "Thanks so much, your team is wonderful.", "Really happy with the service so far.",
        "Great product apart from this, thanks!",
    ],
}

GREETINGS = ["", "Hi,", "Hello,", "Hi there,", "Dear support team,", "Hey,", "Good morning,"]
SIGN_OFFS = ["{name}", "- {name}", "Best, {name}", "Cheers, {name}", "Sent from my phone", ""]
FIRST_NAMES = [
    "Maria", "James", "Aiko", "Liam", "Fatima", "Noah", "Chen", "Olivia", "Mateo", "Priya",
    "Lucas", "Amara", "Sofia", "Ethan", "Yusuf", "Hannah", "Diego", "Mei", "Oscar", "Zara",
    "Ivan", "Leila", "Tomás", "Grace", "Kofi", "Elena", "Ravi", "Chloe", "Jonas", "Nadia",
]
LAST_NAMES = ["Garcia", "Smith", "Tanaka", "Okafor", "Müller", "Rossi", "Kim", "Novak", "Silva", "Patel"]


def _product_mention(rng: random.Random, product: str) -> str:
    """How a customer names a product: 'the', 'my' or 'my new' before its name."""
    return rng.choice(["the", "the", "my", "my new"]) + " " + product


def _order_id(rng: random.Random) -> str:
    return f"ORD-{rng.randint(10000, 99999)}"


@dataclass
class Ticket:
    """One generated ticket: its text, its gold label, and who wrote it."""

    text: str
    label: dict
    name: str


def make_ticket(rng: random.Random) -> Ticket:
    """Sample one ticket and its label."""
    category = rng.choice(CATEGORIES)
    priority = rng.choice(PRIORITIES)
    sentiment = rng.choice(SENTIMENTS)
    template = rng.choice(ISSUES[category])
    uses_product = "{product_ref" in template
    product = rng.choice(PRODUCTS) if uses_product else None
    uses_order = "{order_ref" in template and rng.random() < 0.75
    order_id = _order_id(rng) if uses_order else None
    first = rng.choice(FIRST_NAMES)
    mention = _product_mention(rng, product) if product else ""
    order_ref = ""
    if order_id:
        order_ref = rng.choice([" (order {o})", " on order {o}", ", order number {o}"]).format(o=order_id)
    issue = template.format(
        product_ref=mention,
        product_ref_cap=mention[:1].upper() + mention[1:],
        order_ref=order_ref,
        order_ref_bare=f" order {order_id}" if order_id else " my order",
        code=rng.randint(10, 99),
        email=f"{first.lower()}.{rng.randint(1, 99)}@example.com",
        username=f"{first.lower()}_{rng.randint(100, 999)}",
    )
    cues = [c for c in (rng.choice(PRIORITY_CUES[priority]), rng.choice(SENTIMENT_CUES[sentiment])) if c]
    rng.shuffle(cues)
    body = " ".join([issue] + cues)
    greeting = rng.choice(GREETINGS)
    name = first if rng.random() < 0.7 else f"{first} {rng.choice(LAST_NAMES)}"
    sign = rng.choice(SIGN_OFFS).format(name=name)
    text = "\n".join(part for part in (greeting, body, sign) if part)
    label = {"category": category, "priority": priority, "sentiment": sentiment,
             "product": product, "order_id": order_id}
    return Ticket(text, label, first)


def normalise(text: str) -> str:
    """Lower case, letters and digits only, single spaces: the key for duplicate checks."""
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def chat_example(ticket: Ticket, idx: str) -> dict:
    """A ticket as a chat `messages` record with the canonical JSON answer."""
    return {
        "id": idx,
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": ticket.text},
            {"role": "assistant", "content": to_json(ticket.label)},
        ],
    }


def label_of(example: dict) -> dict:
    """The gold label of a chat example (parsed from its assistant turn)."""
    return json.loads(example["messages"][-1]["content"])


def unique_tickets(rng: random.Random, n: int, seen: set[str]) -> list[Ticket]:
    """n tickets whose normalised text is new to `seen` (which is updated)."""
    out = []
    while len(out) < n:
        t = make_ticket(rng)
        key = normalise(t.text)
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out
