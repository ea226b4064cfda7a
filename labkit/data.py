"""Reading and writing the course's JSONL files, and the committed splits.

Every loader reads through `read_lines`: it checks that the path is a regular file, reads at most
MAX_BYTES, accepts a UTF-8 byte-order mark, names a file that is not JSON Lines (gzip, UTF-16, one JSON
array or object) and reports each bad line as `file:line:field: what. Fix: how`. Then `record_issues`
checks every chat example and preference pair the way training needs it (the one validator: `read_jsonl`,
the splits, `python -m labkit validate` and `python -m labkit sft|dpo` all use it), before any tokenizing.
"""

from __future__ import annotations

import json
import stat
from dataclasses import dataclass
from pathlib import Path

from labkit import LabkitError
from labkit.paths import data_dir

SPLITS = ("train", "validation", "test")
MAX_BYTES = 512 * 2**20  # a data file larger than this is refused, so a wrong path cannot fill memory
MAX_DEPTH = 64  # JSON nested deeper than this is refused (course records are 4 levels deep)
SHOWN = 20  # problems listed in one error message; the rest are counted


class DataError(LabkitError):
    """A data file has problems; the message gives one per line: file:line:field: what. Fix: how."""


@dataclass
class Problem:
    """One problem in a data file: where it is, what is wrong and how to fix it."""

    line: int
    kind: str  # empty, malformed, too_long, exact_duplicate, near_duplicate_surface, near_duplicate_word, contradiction, test_leak
    field: str
    message: str
    fix: str
    same_as: int | None = None

    def __str__(self) -> str:
        also = f" (same as line {self.same_as})" if self.same_as else ""
        return f"line {self.line}: {self.field}: {self.message}{also}. Fix: {self.fix}"

    def located(self, name: str) -> str:
        """The problem as one line: file:line:field: what. Fix: how."""
        also = f" (same as line {self.same_as})" if self.same_as else ""
        return f"{name}:{self.line}:{self.field}: {self.message}{also}. Fix: {self.fix}"


def problems_message(path: str | Path, problems: list[Problem], shown: int = SHOWN) -> str:
    """One line per problem (file:line:field), at most `shown` of them, then how many more."""
    name = Path(path).name
    lines = [p.located(name) for p in problems[:shown]]
    if len(problems) > shown:
        lines.append(f"... and {len(problems) - shown} more")
    if len(problems) == 1:
        return lines[0]
    return "\n".join([f"{len(problems)} problems in {path}:", *lines])


# ---------------------------------------------------------------- the file itself


def read_bytes(path: str | Path, max_bytes: int = MAX_BYTES) -> bytes:
    """The bytes of a regular data file, or a DataError saying why it cannot be one (never reads unbounded)."""
    path = Path(path)
    try:
        info = path.stat()  # stat never blocks, even on a FIFO
    except FileNotFoundError:
        raise DataError(f"{path}: no such file. Fix: check the path (the folder holds "
                        f"{_neighbours(path)})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror}). Fix: check the path and its permissions") from None
    if stat.S_ISDIR(info.st_mode):
        raise DataError(f"{path}: is a folder, not a file. Fix: name a .jsonl file inside it "
                        f"({_neighbours(path / 'x')})")
    if not stat.S_ISREG(info.st_mode):
        kind = "a FIFO (named pipe)" if stat.S_ISFIFO(info.st_mode) else "a device or other special file"
        raise DataError(f"{path}: is {kind}, not a regular file. Fix: save the data to a .jsonl file and pass that")
    if info.st_size > max_bytes:
        raise DataError(f"{path}: is {size(info.st_size)}, over the {size(max_bytes)} limit. "
                        f"Fix: split it into smaller files, or raise labkit.data.MAX_BYTES")
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)  # bounded even if the file grows or reports no size (/proc)
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror}). Fix: check the file's permissions") from None
    if len(raw) > max_bytes:
        raise DataError(f"{path}: holds more than {size(max_bytes)}. "
                        f"Fix: split it into smaller files, or raise labkit.data.MAX_BYTES")
    return raw


def size(n: int) -> str:
    """A byte count for people: '512 MiB' or '900 bytes'."""
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n} bytes"


def _neighbours(path: Path) -> str:
    """A short list of the .jsonl files next to `path`, for a 'no such file' hint."""
    try:
        names = sorted(p.name for p in path.parent.glob("*.jsonl"))[:5]
    except OSError:
        names = []
    return ", ".join(names) if names else "no .jsonl files"


def sniff(raw: bytes, name: str) -> str | None:
    """What the file is if it is not JSON Lines (gzip, UTF-16, one JSON array or object), with the fix; else None."""
    if raw[:2] == b"\x1f\x8b":
        return f"{name}:1:file: is gzip-compressed, not JSON Lines. Fix: decompress it first (gunzip {name})"
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return f"{name}:1:encoding: is UTF-16, not UTF-8. Fix: re-save the file as UTF-8"
    text = raw.lstrip()
    if not text[:1] in (b"[", b"{"):
        return None
    first = text.split(b"\n", 1)[0]
    try:
        one = json.loads(first)
        if isinstance(one, dict):
            return None  # an ordinary first JSONL line
    except (ValueError, RecursionError):
        pass
    try:
        whole = json.loads(text)
    except (ValueError, RecursionError):
        return None  # not one JSON document either: let the per-line checks speak
    if isinstance(whole, list) and (b"\n" in text.strip() or any(isinstance(item, dict) for item in whole)):
        items = f"{len(whole)} item" + ("s" if len(whole) != 1 else "")
        return (f"{name}:1:file: is one JSON array of {items}, not JSON Lines. Fix: write one object per "
                f"line, e.g. labkit.data.write_jsonl(path, records) or jq -c '.[]' {name}")
    if isinstance(whole, dict):
        return (f"{name}:1:file: is one pretty-printed JSON object spread over several lines, not JSON Lines. "
                f"Fix: write each record on one line (json.dumps without indent)")
    return None


# ---------------------------------------------------------------- lines


def depth(value) -> int:
    """How deeply lists and dicts nest in a parsed JSON value (iterative: never recurses)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (list, dict)):
            deepest = max(deepest, d)
            stack += [(c, d + 1) for c in (v.values() if isinstance(v, dict) else v)]
    return deepest


def parse_line(blob: bytes, n: int) -> tuple[object, Problem | None]:
    """One JSON value from one line, or the problem that prevents it."""
    try:
        value = json.loads(blob.decode("utf-8"))
    except UnicodeDecodeError as e:
        return None, Problem(n, "malformed", "encoding", f"byte {e.start} is not UTF-8", "re-save the file as UTF-8")
    except ValueError as e:
        return None, Problem(n, "malformed", "json", f"not valid JSON ({e.msg} at column {e.colno})",
                             "fix or drop the line; it may be truncated")
    except RecursionError:
        return None, Problem(n, "malformed", "json", "nested too deeply to parse", "flatten or drop the line")
    if depth(value) > MAX_DEPTH:
        return None, Problem(n, "malformed", "json", f"nested {depth(value)} levels deep (limit {MAX_DEPTH})",
                             "flatten or drop the line")
    return value, None


def read_lines(path: str | Path, max_bytes: int = MAX_BYTES) -> tuple[list[tuple[int, object]], list[Problem]]:
    """(line number, value) for every line that parses, and a Problem for every one that does not."""
    raw = read_bytes(path, max_bytes)
    if (found := sniff(raw, Path(path).name)) is not None:
        raise DataError(found)
    if raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark, as Windows editors write it
        raw = raw[3:]
    good, problems = [], []
    for n, blob in enumerate(raw.split(b"\n"), start=1):
        if not blob.strip():
            continue
        value, problem = parse_line(blob, n)
        if problem:
            problems.append(problem)
        else:
            good.append((n, value))
    return good, problems


# ---------------------------------------------------------------- records: chat examples and preference pairs

ROLES = ("system", "user", "assistant")
PAIR_FIELDS = ("prompt", "chosen", "rejected")
# No token of SmolLM2's vocabulary is longer than this many characters (the longest of its 49,152 is 81: a run of
# spaces; tests/test_validation.py measures it), so a text longer than max_length x CHARS_PER_TOKEN cannot fit in
# max_length tokens: such an example is refused before the tokenizer spends minutes and gigabytes only to cut it.
CHARS_PER_TOKEN = 96

Issue = tuple[str, str, str, str]  # one problem of one record: (kind, field, what is wrong, how to fix it)


def json_type(value) -> str:
    """A parsed JSON value's type as JSON names it, with its article: 'null', 'a string', 'a list', 'an object'."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def message_issues(message, where: str) -> list[Issue]:
    """The problems of one chat message: an object with a role (system, user, assistant) and text content."""
    if not isinstance(message, dict):
        return [("malformed", where, f"is {json_type(message)}, not a message",
                 'write each message as {"role": "user", "content": "..."}')]
    out = []
    role, content = message.get("role"), message.get("content")
    if "role" not in message:
        out.append(("malformed", f"{where}.role", "is missing", "give every message a role: system, user or assistant"))
    elif not isinstance(role, str):
        out.append(("malformed", f"{where}.role", f"is {json_type(role)}, not a string", "use system, user or assistant"))
    elif role not in ROLES:
        out.append(("malformed", f"{where}.role", f"{role!r} is not a known role", "use system, user or assistant"))
    if content is None:
        what = "is missing" if "content" not in message else "is null, not a string"
        out.append(("malformed", f"{where}.content", what, "give every message its text as a string"))
    elif isinstance(content, list):
        out.append(("malformed", f"{where}.content", "is a list of parts, not a string",
                    "join the parts' text into one string"))
    elif not isinstance(content, str):
        out.append(("malformed", f"{where}.content", f"is {type(content).__name__}, not a string",
                    "store the text as a string"))
    elif not content.strip() and role != "system":
        who = role if isinstance(role, str) else "?"
        out.append(("empty", f"{where}.content", f"the {who} turn is empty", "drop the record or write the missing text"))
    return out


def too_long(chars: int, max_length: int | None, field: str) -> list[Issue]:
    """A problem if `chars` characters cannot fit in max_length tokens (none when max_length is None)."""
    if max_length is None or chars <= max_length * CHARS_PER_TOKEN:
        return []
    return [("too_long", field, f"holds {chars:,} characters, more than max_length={max_length} tokens can hold "
             f"(at most {max_length * CHARS_PER_TOKEN:,}: {CHARS_PER_TOKEN} per token)",
             "shorten it, split it or drop the line, or raise max_length")]


def chat_issues(messages, max_length: int | None = None, field: str = "messages") -> list[Issue]:
    """The problems of one chat example's messages: what SFT needs (a user turn first, an assistant turn last)."""
    if not isinstance(messages, list):
        return [("malformed", field, f"is a {type(messages).__name__}, not a list",
                 "make `messages` a list of {role, content} objects")]
    if not messages:
        return [("empty", field, "is an empty list", "drop the record or fill in the conversation")]
    out = [issue for i, m in enumerate(messages) for issue in message_issues(m, f"{field}[{i}]")]
    if out:
        return out
    roles = [m["role"] for m in messages]
    if set(roles) == {"system"}:
        return [("malformed", field, "holds only a system prompt (no user or assistant turn)",
                 "add the user's message and the answer to learn, or drop the record")]
    if roles[-1] != "assistant":
        return [("malformed", field, "has no assistant turn at the end", "end each conversation with the answer to learn")]
    first = next(i for i, r in enumerate(roles) if r != "system")
    if roles[first] != "user":
        return [("malformed", f"{field}[{first}].role", "the conversation starts with an assistant turn (no user turn "
                 "before it)", "put the user's message before the first answer")]
    return too_long(sum(len(m["content"]) for m in messages), max_length, field)


def pair_issues(record: dict, max_length: int | None = None) -> list[Issue]:
    """The problems of one preference pair: a prompt ending with a user turn, two different assistant replies."""
    out = []
    for key in PAIR_FIELDS:
        value = record.get(key)
        speaker = "user" if key == "prompt" else "assistant"
        if key not in record:
            out.append(("malformed", key, "is missing", "give each pair a prompt, a chosen and a rejected reply"))
        elif not isinstance(value, list):
            out.append(("malformed", key, f"is {json_type(value)}, not a list of chat messages",
                        f'write it as a list of messages, e.g. [{{"role": "{speaker}", "content": "..."}}]'))
        elif not value:
            out.append(("empty", key, "is an empty list", "drop the pair or fill it in"))
        else:
            out += [issue for i, m in enumerate(value) for issue in message_issues(m, f"{key}[{i}]")]
    if out:
        return out
    prompt = [m["role"] for m in record["prompt"]]
    if prompt[-1] != "user":
        return [("malformed", f"prompt[{len(prompt) - 1}].role", f"the prompt's last turn is {prompt[-1]!r}, not 'user'",
                 "end the prompt with the user's message; the replies go in chosen and rejected")]
    first = next(i for i, r in enumerate(prompt) if r != "system")
    if prompt[first] != "user":
        return [("malformed", f"prompt[{first}].role", "the prompt starts with an assistant turn (no user turn before "
                 "it)", "put the user's message first")]
    for key in ("chosen", "rejected"):
        if (other := next((i for i, m in enumerate(record[key]) if m["role"] != "assistant"), None)) is not None:
            return [("malformed", f"{key}[{other}].role", f"a {record[key][other]['role']} turn in a reply",
                     "a reply holds assistant turns only; put the rest in the prompt")]
    if record["chosen"] == record["rejected"]:
        return [("malformed", "rejected", "is the same reply as chosen", "give the pair two different replies, or drop it")]
    chars = {key: sum(len(m["content"]) for m in record[key]) for key in PAIR_FIELDS}
    reply = max(PAIR_FIELDS[1:], key=chars.get)  # the longer sequence is prompt + this reply
    return too_long(chars["prompt"] + chars[reply], max_length, max(("prompt", reply), key=chars.get))


KINDS = {"chat": ("messages",), "pairs": PAIR_FIELDS}  # what each kind of training data holds on every line


def kind_of(record: dict) -> str | None:
    """'chat' for a record with messages, 'pairs' for one with prompt, chosen and rejected, else None."""
    return next((kind for kind, keys in KINDS.items() if set(keys) <= set(record)), None)


def record_issues(record, kind: str | None = None, max_length: int | None = None) -> list[Issue]:
    """The problems of one parsed line as `kind` ('chat' or 'pairs') of training data; None: as its keys say
    (a record that is neither, e.g. a probe, passes). With max_length, text that cannot fit is a problem too."""
    if not isinstance(record, dict):
        return [("malformed", "record", f"the line is {json_type(record)}, not a JSON object",
                 "write one {...} object per line")]
    shape = kind_of(record)
    kind = kind or shape
    if kind == "chat" and shape != "chat":
        what = "this line is a preference pair" if shape == "pairs" else f"the line has keys {sorted(record)}"
        fix = ("train pairs with `python -m labkit dpo`" if shape == "pairs"
               else "give each line a messages list of {role, content} objects")
        return [("malformed", "messages", f"is missing: {what}", fix)]
    if kind == "pairs" and shape != "pairs":
        what = "this line is a chat example" if shape == "chat" else f"the line has keys {sorted(record)}"
        fix = ("train chat examples with `python -m labkit sft`" if shape == "chat"
               else "give each line prompt, chosen and rejected (lists of {role, content} objects)")
        missing = next(k for k in PAIR_FIELDS if k not in record)
        return [("malformed", missing, f"is missing: {what}", fix)]
    if kind == "chat":
        return chat_issues(record["messages"], max_length)
    if kind == "pairs":
        return pair_issues(record, max_length)
    return []


def record_problems(rows: list[tuple[int, object]], kind: str | None = None,
                    max_length: int | None = None) -> list[Problem]:
    """A Problem for each issue of each (line, record): the validator over a whole file."""
    return [Problem(n, *issue) for n, record in rows for issue in record_issues(record, kind, max_length)]


# ---------------------------------------------------------------- the course's files


def read_jsonl(path: str | Path, kind: str | None = None, max_length: int | None = None) -> list[dict]:
    """Every record of a clean JSONL file, or a DataError naming each bad line (file:line:field).

    Every line must be a JSON object; chat examples and preference pairs are checked as training needs them
    (record_issues). `kind` ('chat' or 'pairs') demands that every line be one; `max_length` refuses text that
    cannot fit in that many tokens.
    """
    good, problems = read_lines(path)
    problems += record_problems(good, kind, max_length)
    if problems:
        raise DataError(problems_message(path, sorted(problems, key=lambda p: p.line)))
    return [value for _, value in good]  # type: ignore[misc]


def read_examples(path: str | Path, kind: str, max_length: int | None = None) -> list[dict]:
    """The training examples of a file ('chat' or 'pairs'), every one checked; a file with none is an error too."""
    records = read_jsonl(path, kind, max_length)
    if not records:
        raise DataError(f"{path}: holds no examples. Fix: pass a .jsonl file with one example per line")
    return records


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    """Write records one JSON object per line (UTF-8, stable key order)."""
    Path(path).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def load_split(name: str) -> list[dict]:
    """One committed data file by name: 'train', 'validation', 'test', 'preferences_train', 'probes', ..."""
    return read_jsonl(data_dir() / f"{name}.jsonl")


def load_splits() -> tuple[list[dict], list[dict], list[dict]]:
    """The running example's train, validation and test splits."""
    return tuple(load_split(name) for name in SPLITS)  # type: ignore[return-value]
