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
    f'"category": one of {CATEGORIES} (the first problem the customer raises)\n'
    f'"priority": one of {PRIORITIES} (high if the customer says it is urgent or gives a deadline, low if they say '
    'there is no rush, otherwise medium)\n'
    f'"sentiment": one of {SENTIMENTS} (negative for frustration, anger or sarcasm, positive for praise, otherwise neutral)\n'
    f'"product": one of {PRODUCTS} spelled exactly so, however the customer writes it, or null if none is named\n'
    '"order_id": the order number written as "ORD-12345", or null'
)


def prompt_conversations(examples: list[dict], system: str = SYSTEM_PROMPT, shots: list[dict] = ()) -> list[list[dict]]:
    """Chat prompts for examples: a system message, optional few-shot turns, then the ticket."""
    few = [m for ex in shots for m in ex["messages"][1:]]
    return [[{"role": "system", "content": system}, *few, ex["messages"][1]] for ex in examples]

def balanced_shots(examples: list[dict], k: int) -> list[dict]:
    """k few-shot examples that cover the label space: categories, priorities and sentiments take turns.

    Shot i wants category i mod 5, priority i mod 3 and sentiment (i + i // 3) mod 3; it is the first unused
    example with all three, else with the category and priority, else with the category.
    """
    from labkit import LabkitError

    if not 0 < k <= len(examples):
        raise LabkitError(f"balanced_shots: k={k} but there are {len(examples)} examples. Fix: pick 1 <= k <= {len(examples)}")
    labels = [json.loads(ex["messages"][-1]["content"]) for ex in examples]
    chosen: list[int] = []
    for i in range(k):
        want = {"category": CATEGORIES[i % len(CATEGORIES)], "priority": PRIORITIES[i % len(PRIORITIES)],
                "sentiment": SENTIMENTS[(i + i // len(PRIORITIES)) % len(SENTIMENTS)]}
        for keys in (("category", "priority", "sentiment"), ("category", "priority"), ("category",), ()):
            j = next((j for j, lab in enumerate(labels) if j not in chosen and all(lab[f] == want[f] for f in keys)), None)
            if j is not None:
                chosen.append(j)
                break
    return [examples[j] for j in chosen]


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
# Tickets are written the way customers write them: several phrasing families per category, typos, product
# names in any case or shortened, order numbers in several forms, greetings and signatures with names,
# companies and numbers that are not order numbers, one or two issues, urgency and mood said in many ways.
# The label rules are stated in data/README.md; every template below follows them. Category, priority and
# sentiment are sampled independently, so no field can be guessed from another.

# How customers refer to each product besides its full name: its first word, or its type alone.
PRODUCT_TYPES = {
    "Aurora Kettle": "kettle", "Nimbus Router": "router", "Pulse Earbuds": "earbuds",
    "Vela Smartwatch": "smartwatch", "Orbit Vacuum": "vacuum", "Cedar Desk Lamp": "desk lamp",
    "Atlas Backpack": "backpack", "Zephyr Fan": "fan", "Lumen Projector": "projector",
    "Harbor Blender": "blender",
}

# Slots: {p} a product reference ({P} at the start of a sentence), {o} an inline order reference (may be
# empty), {amount}/{amount2} prices, {code} an error code, {email}/{user} account details, {day} a weekday.
# Four families per category: statements, questions, terse fragments and short stories.
ISSUES = {
    "billing": [
        "I was charged twice for {p}{o}.", "My card was charged two times for the same order{o}.",
        "The invoice for {p}{o} shows the wrong amount.", "You charged me a late fee I never agreed to{o}.",
        "My payment for {p} was declined even though my card works everywhere else{o}.",
        "The discount code didn't work when I paid for {p}{o}.", "I was billed for a subscription I cancelled last month.",
        "The money left my bank account but the order still shows as unpaid{o}.",
        "Why was I charged {amount} when {p} was listed at {amount2}{o}?", "Can you send me a VAT invoice for {p}{o}?",
        "Why is there a second payment for {p} on my statement{o}?", "How do I change the card you bill me on?",
        "Is there a reason my card keeps getting declined at checkout?", "What is the {amount} service fee on my bill?",
        "double charge on {p}{o}", "card declined at checkout, tried twice", "wrong amount on my invoice{o}",
        "charged {amount} for {p} but the price said {amount2}",
        "I ordered {p} last week{o} and when I checked my bank statement there were two identical payments.",
        "My partner paid for {p} with my card and now there is a fee on top of the price that nobody mentioned{o}.",
        "I tried to pay for {p} three times and the card was declined each time, but my bank says nothing is wrong on their side.",
    ],
    "technical": [
        "{P} keeps dropping the wifi connection{o}.", "{P} won't turn on since the last firmware update.",
        "The app crashes whenever I try to pair {p}.", "{P} shows error E{code} and then restarts.",
        "The battery in {p} dies after about an hour{o}.", "{P} makes a loud rattling noise when it runs.",
        "Bluetooth won't connect to {p}.", "The display on {p} flickers and then freezes{o}.",
        "How do I reset {p} to factory settings? It stopped responding.", "Is there a fix for {p} overheating after ten minutes?",
        "Why does {p} disconnect from the app every few minutes?", "The app crashes on my phone every time I open it.",
        "The app logs me out and won't show any of my devices.",
        "{p} not charging", "{p} stuck on the loading screen, tried restarting", "app won't sync with {p}",
        "{p} error E{code} again",
        "Since yesterday {p} only works for a few minutes before it shuts itself off, I tried another socket and it's the same.",
        "I followed the setup guide for {p} twice but it never shows up in the app, the light just blinks orange{o}.",
    ],
    "account": [
        "I can't log in, the password reset email never arrives.", "Please change the email on my account to {email}.",
        "My account got locked after too many login attempts.", "How do I delete my account and all my data?",
        "I see logins on my account that I don't recognise.", "I'd like to merge my two accounts into one.",
        "The two-factor code is rejected every time I sign in.", "Please change my username to {user}.",
        "How can I change the phone number linked to my profile?",
        "Why does the site say my email is already registered when I never signed up?",
        "I can't register {p} to my account, it says the serial number is already in use.",
        "cant log in", "password reset link expired, need a new one", "locked out of my account",
        "I changed phones last week and now the authenticator codes don't work, so I'm stuck outside my account.",
        "My old email address no longer exists, so I can't get the verification code to sign in.",
    ],
    "shipping": [
        "My package{o} hasn't arrived and tracking hasn't moved in a week.",
        "The courier says {p}{o} was delivered but I never got it.",
        "Can I change the delivery address for my order{o} before it ships?", "Tracking says my parcel{o} is stuck in customs.",
        "The delivery{o} was left at the wrong house.", "When will {p} ship{o}? It's been pending for days.",
        "I paid for express delivery but {p}{o} came late.", "The box{o} arrived crushed and soaked from the rain.",
        "Where is my parcel{o}?", "Do you deliver on Saturdays?", "The tracking link in your email doesn't open.",
        "where is my order{o}", "parcel{o} missing", "{p} still not delivered{o}",
        "I ordered {p}{o} for my son's birthday and tracking has said 'out for delivery' for four days, but nobody has come.",
        "The driver left a card saying nobody was home, but I was home all day waiting for {p}{o}.",
    ],
    "returns": [
        "I'd like to return {p}{o}, it's not what I expected.", "{P} arrived with a cracked lid and I want an exchange{o}.",
        "How do I get a return label for {p}{o}?", "I sent {p} back two weeks ago{o} and still haven't had my refund.",
        "Can I swap {p} for a different colour{o}?", "{P} stopped working after three days, I want to send it back{o}.",
        "Is {p} still within the 30-day return window{o}?",
        "The wrong item was in the box{o}, I ordered {p} and need to send this one back.",
        "What is your return policy for opened items?", "My refund for a returned item still hasn't shown up.",
        "want to return {p}{o}", "refund for the returned {p}{o}?", "exchange {p} for a bigger size pls",
        "I bought {p} as a gift{o} but they already have one, so I'd like to send it back unopened.",
    ],
}

PRIORITY_CUES = {
    "high": [
        "This is urgent.", "I need this sorted ASAP.", "Please fix this today.", "I need it by {day}.",
        "It has to be sorted before {day}.", "Need a reply today please!!", "It's an emergency, my business depends on it.",
        "Please escalate this right away.", "Time sensitive!", "I need an answer immediately.",
        "Can someone get back to me today?", "asap please", "My flight is tomorrow morning so this can't wait.",
    ],
    "medium": ["", "", "", "Please let me know the next steps.", "Could you look into it?", "Let me know what you find.",
               "Can you help?", "What should I do?"],
    "low": [
        "No rush.", "No rush, whenever you get a chance.", "Not urgent at all.", "Not urgent, just curious.",
        "Low priority, whenever suits you.", "No hurry on this one.", "Take your time.",
        "Just asking for future reference.", "It can wait, no stress.", "Whenever is convenient.", "This isn't urgent.",
    ],
}
URGENT_PREFIXES = ["URGENT: ", "URGENT!! ", "Urgent - ", "ASAP: "]  # a high-priority cue glued before the issue
LOW_PREFIXES = ["Not urgent: ", "Low priority - ", "No rush: "]

SENTIMENT_CUES = {
    "negative": [
        "I'm really frustrated.", "Honestly this is unacceptable.", "Very disappointed.",
        "This is the third time, I'm fed up.", "Terrible experience.", "I'm angry that nobody has replied.",
        "Not happy at all.", "This is ridiculous.", "What a joke.", "I'm losing my patience with you.",
        "so annoyed right now", "Worst customer service ever.",
        # sarcasm counts as negative: praise words said about the problem
        "Great, just great.", "Thanks for nothing.", "Wonderful service, really. Not.",
    ],
    "neutral": ["", "", "", "Thanks.", "Thank you.", "Thanks in advance.", "Regards."],
    "positive": [
        "I love your products!", "You've always been great, so I'm sure you can sort it.",
        "Thanks so much, your team is wonderful.", "Really happy with the service so far.",
        "Great product apart from this!", "you guys rock", "Big thanks, you're the best :)",
        "Your support has always been amazing.", "Honestly the best shop I've used.", "luv ur stuff btw",
        "Keep up the great work!",
    ],
}

SECOND_ISSUE_OPENERS = ["Also, ", "PS: ", "Unrelated, but ", "One more thing: ", "And while I'm here, "]
ORDER_INLINE = [" (order {ord})", " ({ord})", " on order {ord}", ", order number {num}", " (order #{num})",
                " (order no. {num})", " - {ord}"]
ORDER_SENTENCES = ["Order number: {num}.", "My order is {ord}.", "Order ref {ord}.", "It was order #{num}.",
                   "order {ord}"]
FILLERS = [
    "I've been a customer for a few years.", "I bought it in {month}.", "I already tried turning it off and on again.",
    "My neighbour recommended your shop.", "I checked the FAQ page but couldn't find an answer.",
    "I called your hotline but the line was busy.", "I'm writing from my work email.",
    "I placed the order on {date} {month}.", "I already opened case {case} about this but it was closed.",
    "My customer number is {case}, if that helps.", "I paid {amount} in total.", "I live at {house} {street}.",
]
GREETINGS = ["", "", "Hi,", "Hello,", "Hi there,", "Dear support team,", "Hey,", "Good morning,", "Hello team,",
             "To whom it may concern,", "Dear Sir or Madam,"]
SIGN_OFFS = [
    "{first}", "- {first}", "Best, {full}", "Cheers, {first}", "Thanks, {first}", "Kind regards,\n{full}\n{company}",
    "{full}\n{company}\nTel: {phone}", "Sent from my phone", "{first} ({phone})", "{full} | {company} | {phone}", "",
]
SUBJECTS = {
    "billing": ["Billing question", "Payment problem", "Charge on my card", "Invoice"],
    "technical": ["Device problem", "Not working", "Technical issue", "Help with setup"],
    "account": ["Account access", "Login problem", "My account", "Profile change"],
    "shipping": ["Delivery", "Where is my parcel?", "Shipping question", "Tracking"],
    "returns": ["Return request", "Exchange", "Refund", "Returning an item"],
}
GENERIC_SUBJECTS = ["Help", "Question", "Problem", "Support request"]
FIRST_NAMES = [
    "Maria", "James", "Aiko", "Liam", "Fatima", "Noah", "Chen", "Olivia", "Mateo", "Priya",
    "Lucas", "Amara", "Sofia", "Ethan", "Yusuf", "Hannah", "Diego", "Mei", "Oscar", "Zara",
    "Ivan", "Leila", "Tomás", "Grace", "Kofi", "Elena", "Ravi", "Chloe", "Jonas", "Nadia",
]
LAST_NAMES = ["Garcia", "Smith", "Tanaka", "Okafor", "Müller", "Rossi", "Kim", "Novak", "Silva", "Patel"]
COMPANIES = ["Brightwave Ltd", "Kestrel & Sons", "Greenleaf Studio", "Northgate Dental", "Bluefin Logistics",
             "Pine Street Bakery", "Oakridge Consulting", "Redhill Motors"]
DAYS = ["Friday", "Monday", "tomorrow", "the weekend", "Thursday"]
MONTHS = ["January", "March", "May", "July", "September", "November"]
STREETS = ["Elm Road", "Mill Lane", "Station Street", "Park Avenue"]
CHAT_WORDS = {"please": "pls", "you": "u", "thanks": "thx", "your": "ur", "because": "cos", "are": "r"}


def product_reference(rng: random.Random, product: str) -> str:
    """How a customer names a product: full name in any case, a typo, its first word, or its type alone."""
    brand = product.split()[0]
    form = rng.choice(["full", "full", "full", "lower", "lower", "upper", "typo", "brand", "type", "type"])
    name = {"full": product, "lower": product.lower(), "upper": product.upper(), "typo": typo(rng, product),
            "brand": brand if rng.random() < 0.6 else brand.lower(), "type": PRODUCT_TYPES[product]}[form]
    return rng.choice(["the", "the", "my", "my new", "our", "this"]) + " " + name


def typo(rng: random.Random, word: str) -> str:
    """One slip of the keyboard inside a word: two letters swapped, one dropped, or one doubled."""
    letters = [i for i in range(1, len(word) - 2) if word[i].isalpha() and word[i + 1].isalpha()]
    if not letters:
        return word
    i = rng.choice(letters)
    kind = rng.choice(["swap", "drop", "double"])
    if kind == "swap":
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if kind == "drop":
        return word[:i] + word[i + 1 :]
    return word[:i] + word[i] + word[i:]


def add_typos(rng: random.Random, text: str, n: int, keep: set[str]) -> str:
    """text with n typos in random words of 5+ letters (words in `keep`, such as names, stay intact)."""
    words = text.split(" ")
    spots = [i for i, w in enumerate(words) if len(w) >= 5 and w.isalpha() and w not in keep]
    for i in rng.sample(spots, min(n, len(spots))):
        words[i] = typo(rng, words[i])
    return " ".join(words)


def order_forms(rng: random.Random, digits: str) -> dict[str, str]:
    """An order number as customers write it: ORD-12345, ord-12345, ORD12345 or ORD 12345, and the digits alone."""
    ord_ = rng.choice(["ORD-{d}", "ORD-{d}", "ORD-{d}", "ord-{d}", "ORD{d}", "ORD {d}"]).format(d=digits)
    return {"ord": ord_, "num": digits}


def sentence(text: str) -> str:
    """text ending like a sentence: a full stop is added unless it already ends in . ! ? or )."""
    return text if text.endswith((".", "!", "?", ")")) else text + "."


def chat_style(text: str) -> str:
    """A ticket typed like a chat message: lower case, chat abbreviations, no full stops at the end."""
    words = [CHAT_WORDS.get(w, w) for w in text.lower().split(" ")]
    return " ".join(words).rstrip(".")


@dataclass
class Ticket:
    """One generated ticket: its text, its gold label, and the customer's first name."""

    text: str
    label: dict
    name: str


def _slots(rng: random.Random, first: str) -> dict[str, str]:
    """Values for the non-label slots of templates (prices, codes, dates, account details)."""
    return {
        "amount": f"${rng.randint(12, 399)}.{rng.choice(['00', '99', '49'])}",
        "amount2": f"${rng.randint(12, 399)}.{rng.choice(['00', '99', '49'])}",
        "code": str(rng.randint(10, 99)), "email": f"{first.lower()}.{rng.randint(1, 99)}@example.com",
        "user": f"{first.lower()}_{rng.randint(100, 999)}", "day": rng.choice(DAYS), "month": rng.choice(MONTHS),
        "date": str(rng.randint(1, 28)), "case": str(rng.randint(10000, 99999)), "house": str(rng.randint(2, 180)),
        "street": rng.choice(STREETS),
    }


def make_ticket(rng: random.Random, narrow: bool = False) -> Ticket:
    """Sample one ticket and its label (the label rules are in data/README.md).

    narrow=True writes one phrasing family only (notebook 07's contrast to the diverse data): a plain statement
    from each category's first four templates, as an email, products by their catalogue name and order ids as
    ORD-nnnnn, with no typos, second issue, up-front urgency or shouting. narrow=False draws exactly as before, so the committed data does not change.
    """
    category, priority, sentiment = rng.choice(CATEGORIES), rng.choice(PRIORITIES), rng.choice(SENTIMENTS)
    first = rng.choice(FIRST_NAMES)
    slots = _slots(rng, first)
    template = rng.choice(ISSUES[category][:4] if narrow else ISSUES[category])
    product = rng.choice(PRODUCTS) if "{p}" in template.lower() else None
    p_ref = (product if narrow else product_reference(rng, product)) if product else ""  # narrow: the catalogue name
    order_rate = {"billing": 0.6, "shipping": 0.7, "returns": 0.6, "technical": 0.3, "account": 0.1}[category]
    order_id, order_sentence, o_inline = None, "", ""
    if rng.random() < order_rate:
        digits = str(rng.randint(10000, 99999))
        order_id = f"ORD-{digits}"
        forms = {"ord": order_id, "num": order_id} if narrow else order_forms(rng, digits)
        if "{o}" in template and rng.random() < 0.7:
            o_inline = rng.choice(ORDER_INLINE).format(**forms)
        else:
            order_sentence = rng.choice(ORDER_SENTENCES).format(**forms)
    issue = template.format(p=p_ref, P=p_ref[:1].upper() + p_ref[1:], o=o_inline, **slots)
    issue = issue[:1].upper() + issue[1:] if rng.random() < 0.7 else issue
    # a second, unrelated issue (never with a product or an order number): the label follows the first one
    second = ""
    if not narrow and rng.random() < 0.15:
        other = rng.choice([c for c in CATEGORIES if c != category])
        plain = [t for t in ISSUES[other] if "{p}" not in t.lower() and "{o}" not in t]
        s = rng.choice(plain).format(**slots)
        second = rng.choice(SECOND_ISSUE_OPENERS) + s[:1].lower() + s[1:]
    p_cue = rng.choice(PRIORITY_CUES[priority]).format(**slots)
    s_cue = rng.choice(SENTIMENT_CUES[sentiment])
    if not narrow and priority != "medium" and rng.random() < 0.2:  # the urgency said up front instead
        issue = rng.choice(URGENT_PREFIXES if priority == "high" else LOW_PREFIXES) + issue
        p_cue = ""
    if not narrow and priority == "high" and rng.random() < 0.1:
        issue = issue.upper()  # shouting
    layout = "email" if narrow else rng.choices(["email", "chat", "subject", "long"], weights=[45, 25, 15, 15])[0]
    fillers = [rng.choice(FILLERS).format(**slots) for _ in range(rng.randint(1, 3))] if layout == "long" else []
    cues = [c for c in (p_cue, s_cue) if c]
    rng.shuffle(cues)
    before = cues[:1] if cues and rng.random() < 0.25 else []  # a cue may open the ticket
    after = cues[len(before):]
    body = " ".join(sentence(x) for x in [*before, *fillers, issue, order_sentence, second, *after] if x)
    if not narrow and rng.random() < 0.3:
        body = add_typos(rng, body, rng.randint(1, 2), keep={first, "order", "Order", "number", *p_ref.split()})
    full = first if rng.random() < 0.6 else f"{first} {rng.choice(LAST_NAMES)}"
    phone = rng.choice([f"+44 7700 {rng.randint(900000, 900999)}", f"555-{rng.randint(100, 999)}-{rng.randint(1000, 9999)}",
                        f"(0{rng.randint(20, 99)}) {rng.randint(1000, 9999)} {rng.randint(1000, 9999)}"])
    sign = rng.choice(SIGN_OFFS).format(first=first, full=full, company=rng.choice(COMPANIES), phone=phone)
    if layout == "chat":
        greeting = rng.choice(["", "", "hi", "hey", "hello"])
        text = " ".join(x for x in (greeting, chat_style(body), rng.choice(["", "", f"- {first.lower()}", "thx"])) if x)
    else:
        text = "\n".join(x for x in (rng.choice(GREETINGS), body, sign) if x)
        if layout == "subject":
            subject = rng.choice(SUBJECTS[category] + GENERIC_SUBJECTS)
            if priority == "high" and rng.random() < 0.5:
                subject = "URGENT: " + subject
            text = f"Subject: {subject}\n\n{text}"
    label = {"category": category, "priority": priority, "sentiment": sentiment, "product": product,
             "order_id": order_id}
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


def unique_tickets(rng: random.Random, n: int, seen: set[str], narrow: bool = False) -> list[Ticket]:
    """n tickets whose normalised text is new to `seen` (which is updated)."""
    out = []
    while len(out) < n:
        t = make_ticket(rng, narrow)
        key = normalise(t.text)
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def one_family_examples(n: int, avoid: list[dict], seed: int = 7) -> list[dict]:
    """n training examples written in one phrasing family only (see make_ticket's narrow), none equal to `avoid`."""
    seen = {normalise(ex["messages"][1]["content"]) for ex in avoid}
    return [chat_example(t, f"narrow-{i:04d}") for i, t in enumerate(unique_tickets(random.Random(seed), n, seen, narrow=True))]
