"""The notebooks' stored outputs: executed, cleaned, and stamped so a stale output cannot go unnoticed.

A learner on GitHub, in Colab before running, or reading the site (labkit.course.site) sees the plots, tables and
numbers of a clean run of the CPU profile. Each code cell carries a stamp: the hash of its own source and of
every code cell above it (an output depends on what ran before it). `stale_cells` lists cells whose stamp
no longer matches, tests/test_outputs.py fails on any, and `make outputs` (python -m labkit.course.outputs)
re-executes and re-stamps. Outputs that say nothing off-line are dropped: stderr (warnings, text progress
bars), widget views (progress bars and sliders need a live kernel) and error tracebacks.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
import time
from pathlib import Path

from labkit import LabkitError

STAMP = "labkit"  # key in a code cell's metadata: {"source_sha256": ...}
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
MAX_OUTPUT_BYTES = 400_000  # one output (a plot at the course's sizes is 20-120 kB)


def notebooks_dir() -> Path:
    """The repository's notebooks/ folder."""
    return Path(__file__).resolve().parents[2] / "notebooks"


def read_notebook(path: str | Path) -> dict:
    """A notebook file as JSON."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_notebook(path: str | Path, nb: dict) -> None:
    """Write a notebook the way the repository keeps them (indent 1, UTF-8, trailing newline), all or nothing."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def source_text(cell: dict) -> str:
    """A cell's source as one string (notebook files store it as a list of lines or a string)."""
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def stamps(nb: dict) -> list[str]:
    """For each code cell in order, the SHA-256 of its source and of every code cell above it."""
    running, result = hashlib.sha256(), []
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            running.update(source_text(cell).encode() + b"\0")
            result.append(running.hexdigest())
    return result


def rendered(nb: dict) -> bool:
    """Whether a notebook stores a run at all (some code cell has outputs or a stamp)."""
    return any(c.get("outputs") or STAMP in c.get("metadata", {}) for c in nb["cells"] if c["cell_type"] == "code")


def stale_cells(nb: dict) -> list[int]:
    """Numbers (1-based, counting code cells) of code cells whose stamp is missing or outdated, in a stored run."""
    if not rendered(nb):
        return []  # nothing stored, nothing stale
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    return [n for n, (cell, want) in enumerate(zip(code, stamps(nb)), 1)
            if cell.get("metadata", {}).get(STAMP, {}).get("source_sha256") != want]


def keep(output: dict) -> bool:
    """Whether a stored output is worth keeping off-line (not stderr, not a widget view, not an error)."""
    if output["output_type"] == "error":
        return False
    if output["output_type"] == "stream":
        return output.get("name") == "stdout"
    return WIDGET_VIEW not in output.get("data", {})


def clean(nb: dict) -> dict:
    """A copy with only outputs worth keeping, no run timestamps, and fresh stamps on every code cell."""
    nb = copy.deepcopy(nb)
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    for cell, stamp in zip(code, stamps(nb)):
        cell["outputs"] = [o for o in cell.get("outputs", []) if keep(o)]
        metadata = cell.setdefault("metadata", {})
        metadata.pop("execution", None)
        metadata[STAMP] = {"source_sha256": stamp}
    nb.get("metadata", {}).pop("widgets", None)
    return nb


def oversized(nb: dict) -> list[tuple[int, int]]:
    """(code cell number, bytes) of every stored output larger than MAX_OUTPUT_BYTES."""
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    return [(n, size) for n, cell in enumerate(code, 1) for o in cell.get("outputs", [])
            if (size := len(json.dumps(o))) > MAX_OUTPUT_BYTES]


def execute(path: str | Path, timeout_s: int = 600) -> dict:
    """Run a notebook top to bottom in a fresh kernel (in its own folder, offline) and return it with outputs."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    client = NotebookClient(nb, timeout=timeout_s, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError) as err:
        raise LabkitError(f"{path.name}: a cell failed while executing ({str(err).strip().splitlines()[-1][:200]}). "
                          f"Fix: run the notebook in JupyterLab to see the traceback; nothing was written") from None
    return json.loads(nbformat.writes(nb))


def dropped(nb: dict) -> dict[str, int]:
    """How many outputs of each kind clean() would drop (stderr, widget views, errors): what a learner would see."""
    counts: dict[str, int] = {}
    for cell in nb["cells"]:
        for o in cell.get("outputs", []) if cell["cell_type"] == "code" else []:
            if not keep(o):
                kind = o.get("name") if o["output_type"] == "stream" else "widget" if o["output_type"] != "error" else "error"
                counts[kind] = counts.get(kind, 0) + 1
    return counts


def stderr_outputs(nb: dict) -> list[tuple[int, str]]:
    """(code cell number, first line) of every output a cell wrote to stderr: a pink block in JupyterLab."""
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    return [(n, "".join(o.get("text", "")).strip().splitlines()[0] if "".join(o.get("text", "")).strip() else "(blank)")
            for n, cell in enumerate(code, 1) for o in cell.get("outputs", [])
            if o["output_type"] == "stream" and o.get("name") == "stderr"]


def refresh(path: str | Path, timeout_s: int = 600) -> float:
    """Execute a notebook, clean its outputs, stamp it and write it back; the seconds it took.

    A clean run must not write to stderr (a learner sees it as a pink block): if a cell does, nothing is written.
    """
    started = time.perf_counter()
    executed = execute(path, timeout_s)
    if pink := stderr_outputs(executed):
        cell, line = pink[0]
        raise LabkitError(f"{Path(path).name}: code cell {cell} wrote to stderr on a clean run ({len(pink)} outputs "
                          f"in all; first: {line[:200]!r}). Fix: remove the cause, or silence that one named "
                          "third-party warning at its source with a comment saying why; nothing was written")
    if extra := dropped(executed):
        print(f"{Path(path).name}: not stored: {extra}", file=sys.stderr)
    nb = clean(executed)
    if big := oversized(nb):
        cell, size = big[0]
        raise LabkitError(f"{Path(path).name}: code cell {cell} stores an output of {size:,} bytes "
                          f"(limit {MAX_OUTPUT_BYTES:,}). Fix: a smaller figure or less printing; nothing was written")
    write_notebook(path, nb)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    """`python -m labkit.course.outputs [NAME ...]`: refresh the stale notebooks (or the named ones); --check only lists."""
    parser = argparse.ArgumentParser(prog="python -m labkit.course.outputs", description=main.__doc__)
    parser.add_argument("names", nargs="*", help="notebook files or name prefixes (e.g. 03); default: every stale one")
    parser.add_argument("--check", action="store_true", help="list stale notebooks and exit 1 if any")
    parser.add_argument("--all", action="store_true", help="refresh every notebook, stale or not")
    parser.add_argument("--timeout", type=int, default=600, help="seconds one cell may run (default 600, as nbval)")
    args = parser.parse_args(argv)
    paths = sorted(notebooks_dir().glob("[0-9]*.ipynb"))
    if args.names:
        paths = [p for p in paths if any(p.name.startswith(Path(n).name) for n in args.names)]
    stale = {p: stale_cells(read_notebook(p)) for p in paths}
    todo = paths if args.all or args.names else [p for p in paths if stale[p]]
    if args.check:
        for p in paths:
            if stale[p]:
                print(f"{p.name}: code cells {stale[p]} have outputs of an older source. Fix: make outputs")
        return 1 if any(stale.values()) else 0
    for p in todo:
        print(f"{p.name}: executing ...", file=sys.stderr, flush=True)
        print(f"{p.name}: refreshed in {refresh(p, args.timeout):.0f} s", file=sys.stderr, flush=True)
    if not todo:
        print("every notebook's stored outputs match its source", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except LabkitError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2)
