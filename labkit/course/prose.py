"""Numbers in the course's prose: a figure a run produces is never typed into markdown.

Stored outputs carry a stamp of their code (labkit.course.outputs), so a stale output cannot go unnoticed; markdown has
no stamp. A time, a speed-up, a size or an accuracy typed into a sentence goes stale the day the code, the data or
the machine changes, and then the notebook contradicts itself. So markdown points at the table, plot or printed
line that shows a result ("the table above") without restating it, or a code cell renders the sentence from the
run's variables and asserts it where it is a claim. What markdown may state:

* a figure quoted from the articles or a paper, in a sentence that names its source ("the articles", "the ZeRO
  paper", "Dettmers et al.") or in a block (paragraph, list item or table) that carries `<!-- cited: SOURCE -->`;
  a table is cited when its header or the sentence that introduces it names the source;
* a definition, not a result: in a block that carries `<!-- defined: WHAT -->` (a format's arithmetic, a setting
  of the run), a name set or compared to a value (`r = 16`, `Jaccard >= 0.6`), a bound in a sentence that says a
  check asserts it ("the check below holds it between 10 and 60 %"), a target ("target: under 2 s"), hardware
  (`8x A100`, `80 GB GPU`), the level of an interval ("95 % bootstrap interval"), a version (Python 3.10+);
* anything that is not a figure: integers (counts, dates, section numbers), model sizes (135M, 1.5B), names with
  digits (Qwen2.5), code spans, LaTeX and links.

A figure is a decimal, a percentage, a multiplier (`1.6x`, `3x faster`), an amount of money, or a number with a
unit of time, memory or speed (s, ms, min, hours, MB, GB, tokens/s). `python -m labkit.course.prose` lists every figure
with its verdict; tests/test_prose.py fails on any that is neither cited nor defined.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

from labkit.course.outputs import notebooks_dir, read_notebook, source_text

NUMBER = r"\d+(?:,\d{3})*(?:\.\d+)?"
RANGE = rf"{NUMBER}(?:\s?(?:-|–|to)\s?{NUMBER})?"
UNIT = r"(?:ms|s|sec|seconds?|min|minutes?|h|hours?|kB|KB|MB|GB|TB|tokens/s|tok/s|GFLOP/s)"
COMPARATIVE = r"(?:faster|slower|more|less|fewer|smaller|larger|bigger|cheaper|higher|lower|quicker|the)"
FIGURE = re.compile("|".join([
    rf"\${RANGE}",                                                    # money: $2, $1.50-3.50, $18,000
    rf"(?<![\w.\-/]){RANGE}\s?%",                                     # percentages: 45 %, 10-20 %, 0.1-1 %
    rf"(?<![\w.\-/])\d+\.\d+\s?[x×](?!\w)",                           # decimal multipliers: 1.6x, 1.26×
    rf"(?<![\w.\-/])\d+(?:\s?[-–]\s?\d+)?\s?[x×](?!\w)(?=\s+{COMPARATIVE}\b)",  # 3x faster, 3-4× faster
    rf"(?<![\w.\-/]){RANGE}\s?{UNIT}(?![\w/])",                       # times, sizes, speeds: 17 ms, 1.1 GB
    r"(?<![\w.\-/])\d+\.\d+(?:e[-+]?\d+)?(?![\w.]|\s?[MBK]\b)",       # decimals: 0.54, 1.19e-04 (not 1.5B)
]))
SOURCE = re.compile(r"\barticles?\b|\bpapers?\b|\bet al\b", re.IGNORECASE)
ASSERTED = re.compile(r"\bthe checks?\b|\bchecker\b|\basserts?\b", re.IGNORECASE)
MARKER = re.compile(r"<!--\s*(cited|defined)\s*:(.*?)-->", re.DOTALL)
SETTING = re.compile(r"(?:^|[\s(*])[^\W\d]\w*\s?(?:=|≥|≤|>=|<=|<|>)\s?~?$")   # r = | beta = | cosine ≥
HARDWARE = re.compile(r"\d\s?[x×]\s?$")                                        # "8 x 80 GB": a GPU's size
HARDWARE_AFTER = re.compile(r"\s?(?:GPUs?|cards?|A100|A10G|H100|L4|T4)\b")
SECTION = re.compile(r"\bsections?\s$", re.IGNORECASE)
TARGET = re.compile(r"\b(?:target|budget|limit)\b\W{0,3}(?:under|below|at most|of)?\s?$", re.IGNORECASE)  # a goal
VERSION = re.compile(r"(?:\b[Pp]ython|\bversions?|\bv)\s?$")                  # Python 3.10, version 0.3
INTERVAL = re.compile(r"\binterval|\bconfidence|\bbootstrap|\bCI\b")          # "a 95 % interval": its level


@dataclass(frozen=True)
class Figure:
    """One figure in a markdown cell, where it is, the sentence around it, and why it may (or may not) stand."""

    where: str       # "05_sft.ipynb cell 19" or "README.md"
    figure: str      # the figure as written: "3×", "0.54", "17 ms"
    sentence: str    # the sentence (or table row) it sits in
    verdict: str     # "cited", "defined", "asserted" or "stale" (none of them: the test fails)


def plain(markdown: str) -> str:
    """The markdown with what holds no prose figure blanked: code, LaTeX, link targets, HTML (markers are kept)."""
    text = markdown.replace(r"\$", "\x00")                             # an escaped dollar is money, not LaTeX
    text = re.sub(r"```.*?```", " ", text, flags=re.DOTALL)
    text = re.sub(r"\$\$.*?\$\$|\$[^$\n]+\$", " math ", text, flags=re.DOTALL)
    text = re.sub(r"`[^`\n]*`", "code", text)
    text = re.sub(r"\]\([^)\s]*\)", "]", text)                         # [label](address): keep the label
    text = re.sub(r"<(?!!--)[^>\n]*>", " ", text)                      # HTML tags, not comments
    return text.replace("\x00", "$")


def blocks(text: str) -> list[str]:
    """Paragraphs, tables and list items: the units a marker applies to."""
    parts = []
    for paragraph in re.split(r"\n\s*\n", text):
        parts += [p for p in re.split(r"\n(?=\s*(?:[*-]|\d+\.)\s)", paragraph) if p.strip()]
    return parts


def is_table(block: str) -> bool:
    """Whether a block holds a markdown table."""
    return bool(re.search(r"^\s*\|", block, re.MULTILINE))


def sentences(block: str) -> list[str]:
    """A block cut into sentences (a table into rows): the unit a named source applies to."""
    if is_table(block):
        return [row for row in block.splitlines() if row.strip()]
    return [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'*(_\[]|code)", block.replace("\n", " ")) if s.strip()]


def table_source(block: str, before: str) -> bool:
    """Whether a table names its source in its header row or in the last sentence before it."""
    header = next((row for row in block.splitlines() if row.strip().startswith("|")), "")
    intro = sentences(before)[-1] if before.strip() else ""
    return bool(SOURCE.search(header) or SOURCE.search(intro))


def verdict(sentence: str, match: re.Match, marker: str | None, cited_table: bool) -> str:
    """Why a figure may stand here ("cited", "defined", "asserted"), or "stale"."""
    before, after = sentence[: match.start()], sentence[match.end():]
    if marker == "cited" or cited_table or SOURCE.search(before):    # the source is named before the figure
        return "cited"
    if marker == "defined" or any(p.search(before) for p in (SETTING, SECTION, VERSION, TARGET)):
        return "defined"
    if after.startswith("+") or (match.group().startswith("95") and INTERVAL.search(sentence)):
        return "defined"                                              # Python 3.10+, a 95 % interval
    if HARDWARE.search(before) or (match.group().rstrip().endswith("GB") and HARDWARE_AFTER.match(after)):
        return "defined"
    return "asserted" if ASSERTED.search(sentence) else "stale"


def figures(markdown: str, where: str) -> list[Figure]:
    """Every figure in one markdown text, with its verdict (a marker without its source leaves it stale)."""
    found, units = [], blocks(plain(markdown))
    for k, block in enumerate(units):
        marks = [(kind, what.strip()) for kind, what in MARKER.findall(block)]
        marker = next((kind for kind, what in marks if what), None)
        cited_table = is_table(block) and table_source(block, units[k - 1] if k else "")
        for sentence in sentences(MARKER.sub(" ", block)):
            for match in FIGURE.finditer(sentence):
                found.append(Figure(where, match.group().strip(), sentence.strip(),
                                    verdict(sentence, match, marker, cited_table)))
    return found


def notebook_figures(path: str | Path) -> list[Figure]:
    """Every figure in a notebook's markdown cells."""
    cells = read_notebook(path)["cells"]
    return [f for i, cell in enumerate(cells) if cell["cell_type"] == "markdown"
            for f in figures(source_text(cell), f"{Path(path).name} cell {i}")]


def readme_figures(path: str | Path) -> list[Figure]:
    """Every figure in a README's prose (its code blocks are not prose)."""
    return figures(Path(path).read_text(encoding="utf-8"), Path(path).name)


def scan(paths: list[Path] | None = None, readme: Path | None = None) -> list[Figure]:
    """Every figure in the course's markdown: the notebooks' cells and README.md."""
    paths = sorted(notebooks_dir().glob("[0-9]*.ipynb")) if paths is None else paths
    readme = notebooks_dir().parent / "README.md" if readme is None else readme
    return [f for p in paths for f in notebook_figures(p)] + (readme_figures(readme) if readme.exists() else [])


def explain(figure: Figure) -> str:
    """One line for a stale figure: where, what, and how to fix it."""
    return (f"{figure.where}: {figure.figure!r} in {figure.sentence[:120]!r} is neither cited nor defined. Fix: "
            "point at the output that shows it (\"the table above\") or render the sentence from the run's "
            "variables in a code cell; a quote gets its source (<!-- cited: SOURCE -->), a setting <!-- defined: ... -->")


def summary(found: list[Figure]) -> str:
    """How many figures the scan found, by verdict."""
    counts = {v: sum(f.verdict == v for f in found) for v in ("cited", "defined", "asserted", "stale")}
    return f"{len(found)} figures in markdown: " + ", ".join(f"{n} {v}" for v, n in counts.items())


def main(argv: list[str] | None = None) -> int:
    """`python -m labkit.course.prose [--all]`: the stale figures (every figure with --all) and a summary; 1 if any is stale."""
    found = scan()
    show = found if argv and "--all" in argv else [f for f in found if f.verdict == "stale"]
    for figure in show:
        print(explain(figure) if figure.verdict == "stale" else f"{figure.where}: {figure.figure!r} {figure.verdict}")
    print(summary(found), file=sys.stderr)
    return 1 if any(f.verdict == "stale" for f in found) else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
