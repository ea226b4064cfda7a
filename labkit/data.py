"""Reading and writing the course's JSONL files, and the committed splits.

Every loader reads through `read_lines`: it checks that the path is a regular file, reads at most
MAX_BYTES, accepts a UTF-8 byte-order mark, names a file that is not JSON Lines (gzip, UTF-16, one JSON
array or object) and reports each bad line as `file:line:field: what. Fix: how`.
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
    kind: str  # empty, malformed, exact_duplicate, near_duplicate_surface, near_duplicate_word, contradiction, test_leak
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


# ---------------------------------------------------------------- the course's files


def read_jsonl(path: str | Path) -> list[dict]:
    """Every record of a clean JSONL file, or a DataError naming each bad line (see labkit.dataprep to validate)."""
    good, problems = read_lines(path)
    if problems:
        raise DataError(problems_message(path, problems))
    return [value for _, value in good]  # type: ignore[misc]


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    """Write records one JSON object per line (UTF-8, stable key order)."""
    Path(path).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def load_split(name: str) -> list[dict]:
    """One committed data file by name: 'train', 'validation', 'test', 'preferences_train', 'probes', ..."""
    return read_jsonl(data_dir() / f"{name}.jsonl")


def load_splits() -> tuple[list[dict], list[dict], list[dict]]:
    """The running example's train, validation and test splits."""
    return tuple(load_split(name) for name in SPLITS)  # type: ignore[return-value]
