"""Write the course's data files: splits, the dirty raw file, preference pairs and probes."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

from labkit.data import read_jsonl, write_jsonl
from labkit.tickets import (
    CATEGORIES,
    FIELDS,
    Ticket,
    chat_example,
    label_of,
    make_ticket,
    normalise,
    to_json,
    unique_tickets,
)

SEED = 20261123
SPLIT_SIZES = {"train": 1600, "validation": 200, "test": 200}  # 80 / 10 / 10
REPLY_PROMPT = "You are a friendly support agent. Write a short reply to the customer."


# ---------------------------------------------------------------- the dirty raw file


def _near_variant(rng: random.Random, text: str, kind: str) -> str:
    """A near-duplicate of text: 'surface' edits vanish under normalise(); 'word' edits do not."""
    if kind == "surface":
        edit = rng.choice(["upper", "spaces", "punct"])
        if edit == "upper":
            return text.upper()
        if edit == "spaces":
            return "  " + text.replace(" ", "  ") + " "
        return text.replace(".", "!").replace(",", "")
    lines = text.split("\n")
    swaps = {"Hi,": "Hello,", "Hello,": "Hi,", "Hey,": "Hi there,", "Hi there,": "Hey,",
             "Dear support team,": "Dear team,", "Good morning,": "Good afternoon,"}
    if lines[0] in swaps:
        lines[0] = swaps[lines[0]]
    else:
        lines.insert(0, "Hi team,")
    return "\n".join(lines)


def _with_text(example: dict, text: str, idx: str) -> dict:
    msgs = [dict(m) for m in example["messages"]]
    msgs[1]["content"] = text
    return {"id": idx, "messages": msgs}


def _contradict(example: dict, rng: random.Random, idx: str) -> dict:
    label = label_of(example)
    label["category"] = rng.choice([c for c in CATEGORIES if c != label["category"]])
    msgs = [dict(m) for m in example["messages"]]
    msgs[2]["content"] = to_json(label)
    return {"id": idx, "messages": msgs}


def _malformed_lines(base: dict, idx: str) -> list[tuple[str, str]]:
    """Broken records as raw lines, each with the problem it plants."""
    sys_msg, user, asst = base["messages"]
    good = json.dumps({"id": idx, "messages": base["messages"]}, ensure_ascii=False)
    return [
        ("truncated JSON", good[: len(good) // 2]),
        ("content is not a string", json.dumps({"id": idx + "b", "messages": [sys_msg, {"role": "user", "content": 42}, asst]})),
        ("messages is not a list", json.dumps({"id": idx + "c", "messages": user["content"]}, ensure_ascii=False)),
        ("message without a role", json.dumps({"id": idx + "d", "messages": [sys_msg, {"content": user["content"]}, asst]}, ensure_ascii=False)),
        ("no assistant turn", json.dumps({"id": idx + "e", "messages": [sys_msg, user]}, ensure_ascii=False)),
        ("answer is not valid JSON", json.dumps({"id": idx + "f", "messages": [sys_msg, user, {"role": "assistant", "content": asst["content"][:-9]}]}, ensure_ascii=False)),
        ("unknown label value", json.dumps({"id": idx + "g", "messages": [sys_msg, user, {"role": "assistant", "content": asst["content"].replace('"category": "', '"category": "urgent-')}]}, ensure_ascii=False)),
        ("unknown role", json.dumps({"id": idx + "h", "messages": [sys_msg, {"role": "customer", "content": user["content"]}, asst]}, ensure_ascii=False)),
    ]


def make_raw(rng: random.Random, clean: list[dict], test: list[dict]) -> tuple[list[str], dict]:
    """The dirty raw file's lines and a manifest of every planted problem (1-based line numbers)."""
    rows: list[tuple[str, str, int | None]] = [("clean", json.dumps(r, ensure_ascii=False), None) for r in clean]
    n = len(clean)
    for i in rng.sample(range(n), 20):
        rows.append(("exact_duplicate", json.dumps({**clean[i], "id": clean[i]["id"] + "-dup"}, ensure_ascii=False), i))
    for k, i in enumerate(rng.sample(range(n), 20)):
        kind = "surface" if k < 10 else "word"
        text = _near_variant(rng, clean[i]["messages"][1]["content"], kind)
        rows.append((f"near_duplicate_{kind}", json.dumps(_with_text(clean[i], text, clean[i]["id"] + "-near"), ensure_ascii=False), i))
    for i in rng.sample(range(n), 10):
        rows.append(("contradiction", json.dumps(_contradict(clean[i], rng, clean[i]["id"] + "-x"), ensure_ascii=False), i))
    for k, i in enumerate(rng.sample(range(n), 6)):
        ex = json.loads(json.dumps(clean[i]))
        ex["id"] += "-empty"
        if k % 3 == 0:
            ex["messages"][1]["content"] = ""
        elif k % 3 == 1:
            ex["messages"][2]["content"] = "   "
        else:
            ex["messages"] = []
        rows.append(("empty", json.dumps(ex, ensure_ascii=False), None))
    for problem, line in _malformed_lines(clean[0], "raw-bad"):
        rows.append(("malformed", line, None))
    for k, j in enumerate(rng.sample(range(len(test)), 12)):
        text = test[j]["messages"][1]["content"]
        if k % 2:
            text = _near_variant(rng, text, "word")
        rows.append(("test_leak", json.dumps(_with_text(test[j], text, f"raw-leak-{k}"), ensure_ascii=False), None))
    order = list(range(len(rows)))
    rng.shuffle(order)
    line_of = {old: new + 1 for new, old in enumerate(order)}
    manifest: dict[str, list] = {}
    for old, (kind, _, source) in enumerate(rows):
        if kind == "clean":
            continue
        entry = {"line": line_of[old]}
        if source is not None:
            entry["same_as_line"] = line_of[source]
        manifest.setdefault(kind, []).append(entry)
    for kind in manifest:
        manifest[kind].sort(key=lambda e: e["line"])
    return [rows[old][1] for old in order], manifest


# ---------------------------------------------------------------- preference pairs

ACKS = {
    "billing": "sorry about the trouble with your payment",
    "technical": "sorry that your device is giving you trouble",
    "account": "sorry about the problem with your account",
    "shipping": "sorry that your delivery has not gone smoothly",
    "returns": "thanks for letting us know you want to send it back",
}
NEXT_STEPS = {
    "billing": "I have asked our billing team to check {ref} and correct any overcharge",
    "technical": "please restart it once, and if the problem stays I will arrange a repair for {ref}",
    "account": "I have sent a secure link to your email so you can fix this for {ref}",
    "shipping": "I have opened a trace with the courier for {ref} and will update you tomorrow",
    "returns": "I have emailed you a free return label for {ref}",
}


def reply_pair(rng: random.Random, ticket: Ticket) -> dict:
    """A preference pair: both replies say the same thing; the chosen one greets the customer by name."""
    cat = ticket.label["category"]
    ref = f"order {ticket.label['order_id']}" if ticket.label["order_id"] else "your request"
    body = f"{ACKS[cat][0].upper()}{ACKS[cat][1:]}. {NEXT_STEPS[cat].format(ref=ref)[0].upper()}{NEXT_STEPS[cat].format(ref=ref)[1:]}."
    chosen = f"{rng.choice(['Hi', 'Hello', 'Dear'])} {ticket.name}, {body[0].lower()}{body[1:]}"
    rejected = f"{rng.choice(['Hi there', 'Hello', 'Dear customer'])}, {body[0].lower()}{body[1:]}"
    return {
        "prompt": [{"role": "system", "content": REPLY_PROMPT}, {"role": "user", "content": ticket.text}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "customer_name": ticket.name,
    }


def signed_tickets(rng: random.Random, n: int, seen: set[str]) -> list[Ticket]:
    """Unique tickets whose text is signed with the customer's first name."""
    out: list[Ticket] = []
    while len(out) < n:
        t = make_ticket(rng)
        key = normalise(t.text)
        if t.name in t.text and key not in seen:
            seen.add(key)
            out.append(t)
    return out


# ---------------------------------------------------------------- general-capability probes

PROBES = [
    ("What is the capital of France?", ["Paris"]), ("What is the capital of Japan?", ["Tokyo"]),
    ("What is the capital of Italy?", ["Rome"]), ("What is the capital of Germany?", ["Berlin"]),
    ("What is the capital of Spain?", ["Madrid"]), ("What is the capital of the United Kingdom?", ["London"]),
    ("What is the capital of Russia?", ["Moscow"]), ("What is the capital of China?", ["Beijing"]),
    ("What is the capital of Egypt?", ["Cairo"]), ("What is the capital of Canada?", ["Ottawa"]),
    ("What is 2 + 2?", ["4", "four"]), ("What is 10 minus 3?", ["7", "seven"]),
    ("What is 5 times 6?", ["30", "thirty"]), ("What is 100 divided by 10?", ["10", "ten"]),
    ("How many days are in a week?", ["7", "seven"]), ("How many legs does a spider have?", ["8", "eight"]),
    ("How many continents are there on Earth?", ["7", "seven"]), ("How many hours are in a day?", ["24", "twenty-four"]),
    ("What is the opposite of hot?", ["cold"]), ("What is the opposite of up?", ["down"]),
    ("What is the opposite of day?", ["night"]), ("What is the opposite of big?", ["small", "little"]),
    ("What color is the sky on a clear day?", ["blue"]), ("What color is grass?", ["green"]),
    ("What color are bananas when ripe?", ["yellow"]), ("What do bees make?", ["honey"]),
    ("What is the largest planet in our solar system?", ["Jupiter"]), ("Which planet is known as the Red Planet?", ["Mars"]),
    ("What is the freezing point of water in Celsius?", ["0", "zero"]), ("What gas do plants absorb from the air?", ["carbon dioxide", "CO2"]),
    ("Who wrote Romeo and Juliet?", ["Shakespeare"]), ("What is the chemical symbol for water?", ["H2O"]),
    ("What is the largest ocean on Earth?", ["Pacific"]), ("What is the tallest mountain in the world?", ["Everest"]),
    ("What language is mainly spoken in Brazil?", ["Portuguese"]), ("What is the plural of mouse?", ["mice"]),
    ("Translate 'hello' into Spanish.", ["hola"]), ("Translate 'thank you' into French.", ["merci"]),
    ("What is the square root of 81?", ["9", "nine"]), ("What animal is known as man's best friend?", ["dog"]),
    # 80 more (issue 14): 40 probes give a 95 % CI about +-15 points wide, too wide to see forgetting of a few points
    ("What is the capital of Australia?", ["Canberra"]), ("What is the capital of India?", ["New Delhi", "Delhi"]),
    ("What is the capital of Greece?", ["Athens"]), ("What is the capital of Portugal?", ["Lisbon"]),
    ("What is the capital of Ireland?", ["Dublin"]), ("What is the capital of Norway?", ["Oslo"]),
    ("What is the capital of Sweden?", ["Stockholm"]), ("What is the capital of Austria?", ["Vienna"]),
    ("What is the capital of Poland?", ["Warsaw"]), ("What is the capital of Mexico?", ["Mexico City"]),
    ("What is the capital of Argentina?", ["Buenos Aires"]), ("What is the capital of Kenya?", ["Nairobi"]),
    ("What is the capital of Thailand?", ["Bangkok"]), ("What is the capital of South Korea?", ["Seoul"]),
    ("What is the capital of the United States?", ["Washington"]), ("What is the capital of the Netherlands?", ["Amsterdam"]),
    ("What is 3 + 5?", ["8", "eight"]), ("What is 9 + 6?", ["15", "fifteen"]), ("What is 12 minus 4?", ["8", "eight"]),
    ("What is 20 minus 5?", ["15", "fifteen"]), ("What is 7 times 8?", ["56", "fifty-six"]),
    ("What is 3 times 4?", ["12", "twelve"]), ("What is 50 divided by 5?", ["10", "ten"]),
    ("What is half of 20?", ["10", "ten"]), ("What is 15 + 15?", ["30", "thirty"]),
    ("What is 6 squared?", ["36", "thirty-six"]),
    ("How many months are in a year?", ["12", "twelve"]), ("How many minutes are in an hour?", ["60", "sixty"]),
    ("How many sides does a triangle have?", ["3", "three"]), ("How many sides does a square have?", ["4", "four"]),
    ("How many legs does an insect have?", ["6", "six"]), ("How many wheels does a bicycle have?", ["2", "two"]),
    ("How many days are in a leap year?", ["366"]), ("How many seconds are in a minute?", ["60", "sixty"]),
    ("What is the opposite of fast?", ["slow"]), ("What is the opposite of happy?", ["sad", "unhappy"]),
    ("What is the opposite of open?", ["closed", "shut"]), ("What is the opposite of left?", ["right"]),
    ("What is the opposite of wet?", ["dry"]), ("What is the opposite of old?", ["young", "new"]),
    ("What is the opposite of early?", ["late"]), ("What is the opposite of full?", ["empty"]),
    ("What color do you get by mixing blue and yellow?", ["green"]), ("What color is snow?", ["white"]),
    ("What color is a ripe tomato?", ["red"]), ("What color is coal?", ["black"]),
    ("What is the closest star to Earth?", ["Sun"]), ("What is the natural satellite of Earth called?", ["Moon"]),
    ("Which planet is closest to the Sun?", ["Mercury"]), ("What do cows drink?", ["water"]),
    ("What is the boiling point of water in Celsius?", ["100", "one hundred"]),
    ("What gas do humans need to breathe?", ["oxygen"]), ("What is the hardest natural substance?", ["diamond"]),
    ("What is frozen water called?", ["ice"]), ("Which organ pumps blood through the body?", ["heart"]),
    ("What is the largest mammal?", ["blue whale", "whale"]), ("What is the fastest land animal?", ["cheetah"]),
    ("Which animal is known as the king of the jungle?", ["lion"]), ("What do caterpillars turn into?", ["butterfly", "butterflies", "moth"]),
    ("What is a baby dog called?", ["puppy"]), ("What is a baby cat called?", ["kitten"]),
    ("Who painted the Mona Lisa?", ["Leonardo", "da Vinci"]), ("Who developed the theory of relativity?", ["Einstein"]),
    ("Who was the first person to walk on the Moon?", ["Armstrong"]),
    ("What is the longest river in the world?", ["Nile", "Amazon"]), ("What is the largest desert in the world?", ["Sahara", "Antarctic", "Antarctica"]),
    ("On which continent is Egypt?", ["Africa"]), ("On which continent is Brazil?", ["South America"]),
    ("What language is spoken in Germany?", ["German"]), ("What currency is used in Japan?", ["yen"]),
    ("What is the plural of child?", ["children"]), ("What is the plural of foot?", ["feet"]),
    ("What is the past tense of go?", ["went"]), ("What is the past tense of eat?", ["ate"]),
    ("Translate 'cat' into Spanish.", ["gato"]), ("Translate 'water' into French.", ["eau"]),
    ("Translate 'goodbye' into Spanish.", ["adios", "adiós"]), ("What is the first month of the year?", ["January"]),
    ("What is the chemical symbol for gold?", ["Au"]), ("What is the chemical symbol for sodium?", ["Na"]),
]


# ---------------------------------------------------------------- general instructions (replay against forgetting)

# Everyday requests of other kinds than the probes (no capitals, sums, opposites, colours or translations), so
# mixing them into SFT cannot teach the probes' answers. Notebook 07 pairs each with the base model's own reply
# (self-distillation: the mix rehearses what the model already does) and mixes them into the triage data.
GENERAL_TEMPLATES = [
    ("Give me one practical tip for {}.", ["studying for an exam", "saving money", "sleeping better", "cooking rice",
                                            "learning to swim", "keeping a plant alive", "writing an email", "running a meeting"]),
    ("Write one friendly sentence about {}.", ["autumn leaves", "a morning coffee", "a rainy afternoon", "a good book",
                                                "the ocean", "a mountain walk", "a birthday party", "a quiet library"]),
    ("Explain in one sentence what {} is.", ["a recipe", "a library", "a calendar", "a bridge", "a password",
                                             "a spreadsheet", "a thermometer", "a passport"]),
    ("Suggest a name for {}.", ["a small bakery", "a pet turtle", "a book club", "a hiking group", "a coffee shop",
                                "a garden blog", "a robot toy", "a chess team"]),
    ("Describe {} in a few words.", ["a busy city street", "a summer evening", "fresh bread", "a winter morning",
                                     "a crowded train", "a calm lake", "an old castle", "a football match"]),
    ("List three things you might pack for {}.", ["a beach holiday", "a camping trip", "a business trip",
                                                  "a picnic", "a ski weekend", "a long flight", "a day at the zoo", "a concert"]),
    ("How can I politely {}?", ["decline an invitation", "ask for a deadline extension", "end a phone call",
                                "remind a friend about money they owe", "ask a neighbour to be quieter",
                                "say no to extra work", "leave a party early", "ask for feedback"]),
    ("What are two benefits of {}?", ["walking every day", "reading before bed", "drinking water", "learning a language",
                                      "keeping a diary", "cycling to work", "cooking at home", "getting up early"]),
    ("Write a short thank-you note to {}.", ["a teacher", "a neighbour who watered my plants", "a colleague",
                                             "a friend who helped me move", "a nurse", "my grandmother",
                                             "a bus driver", "a mentor"]),
    ("Give a simple definition of the word '{}'.", ["curious", "generous", "patient", "brave", "honest",
                                                    "humble", "creative", "reliable"]),
]
GENERAL_PROMPTS = [template.format(filler) for template, fillers in GENERAL_TEMPLATES for filler in fillers]


# ---------------------------------------------------------------- everything


def generate_all(out_dir: str | Path, seed: int = SEED) -> dict[str, Path]:
    """Generate every data file into out_dir, deterministically from seed; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    seen: set[str] = set()
    splits = {}
    for name, size in SPLIT_SIZES.items():
        tickets = unique_tickets(rng, size, seen)
        splits[name] = [chat_example(t, f"{name}-{i:04d}") for i, t in enumerate(tickets)]
    raw_clean = [chat_example(t, f"raw-{i:04d}") for i, t in enumerate(unique_tickets(rng, 400, seen))]
    raw_lines, manifest = make_raw(rng, raw_clean, splits["test"])
    pairs = [reply_pair(rng, t) for t in signed_tickets(rng, 400, seen)]
    paths = {name: out / f"{name}.jsonl" for name in splits}
    for name, records in splits.items():
        write_jsonl(paths[name], records)
    paths["raw"] = out / "raw_tickets.jsonl"
    paths["raw"].write_text("".join(line + "\n" for line in raw_lines), encoding="utf-8")
    paths["raw_manifest"] = out / "raw_manifest.json"
    paths["raw_manifest"].write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    paths["preferences_train"] = out / "preferences_train.jsonl"
    paths["preferences_test"] = out / "preferences_test.jsonl"
    write_jsonl(paths["preferences_train"], pairs[:300])
    write_jsonl(paths["preferences_test"], pairs[300:])
    paths["probes"] = out / "probes.jsonl"
    write_jsonl(paths["probes"], [{"question": q, "answers": a} for q, a in PROBES])
    paths["general_prompts"] = out / "general_prompts.jsonl"
    write_jsonl(paths["general_prompts"], [{"prompt": p} for p in GENERAL_PROMPTS])
    return paths


def label_counts(records: list[dict]) -> dict[str, Counter]:
    """Label distribution per field ('none' for null)."""
    counts: dict[str, Counter] = {f: Counter() for f in FIELDS}
    for r in records:
        label = label_of(r)
        for f in FIELDS:
            v = label[f]
            counts[f][("none" if v is None else ("present" if f == "order_id" else v))] += 1
    return counts



def distribution_table(folder: str | Path) -> str:
    """The data card's label-distribution table (markdown), computed from the split files."""
    splits = {s: label_counts(read_jsonl(Path(folder) / f"{s}.jsonl")) for s in SPLIT_SIZES}
    lines = ["| field | " + " | ".join(SPLIT_SIZES) + " |", "|---" * (len(SPLIT_SIZES) + 1) + "|"]
    for f in FIELDS:
        cells = []
        for s in SPLIT_SIZES:
            c = splits[s][f]
            if f == "product":
                cells.append(f"{sum(v for k, v in c.items() if k != 'none')} named, {c['none']} null")
            else:
                cells.append(", ".join(f"{k} {v}" for k, v in sorted(c.items())))
        lines.append(f"| {f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    for path in generate_all(sys.argv[1] if len(sys.argv) > 1 else "data").values():
        print(path)
