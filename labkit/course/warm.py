"""`make warm`: run every notebook once, in order, so every cached run of the course is trained before a workshop.

Each notebook's training runs, generated replies and judge verdicts land in labkit's cache (`LABKIT_HOME`); a
notebook opened afterwards loads them in seconds. The notebooks themselves are not changed (their outputs are
discarded). Point `LABKIT_HOME` at a shared folder to prepare one cache for a whole room.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from labkit import LabkitError
from labkit.course.outputs import execute, notebooks_dir
from labkit.paths import cache_root

# Minutes of each notebook's first run on an empty cache, 2 cores, CPU profile, in order: measured on a new machine on
# 2026-12-08 (labkit.course.outputs, one notebook at a time). 03 ran beside a second notebook for most of its run, so its
# figure is high; 01 includes the knowledge experiment's LoRA run. A warm notebook takes a fraction of this.
COLD_MINUTES = {"00": 0.2, "01": 3.5, "02": 5.2, "03": 13.1, "04": 6.6, "05": 23.4, "06": 8.8, "07": 47.3,
                "08": 14.3, "09": 1.3, "10": 12.4}


def expected(path: Path) -> str:
    """'about N min' for a notebook's cold run, from COLD_MINUTES."""
    minutes = COLD_MINUTES.get(path.name[:2])
    return f"about {minutes:.0f} min cold" if minutes is not None else "not yet measured"


def warm(paths: list[Path], timeout_s: int = 1800) -> float:
    """Execute `paths` in order, one progress line each; the seconds it took in all."""
    started = time.perf_counter()
    total = sum(COLD_MINUTES.get(p.name[:2], 0.0) for p in paths)
    print(f"warming {len(paths)} notebooks into {cache_root()} (up to ~{total:.0f} min on an empty cache, 2 cores)",
          flush=True)
    for i, path in enumerate(paths, 1):
        print(f"[{i}/{len(paths)}] {path.name}: running ({expected(path)}) ...", end=" ", flush=True)
        t = time.perf_counter()
        execute(path, timeout_s)
        print(f"done in {(time.perf_counter() - t) / 60:.1f} min", flush=True)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    """`python -m labkit.course.warm [NAME ...]`: fill labkit's cache by running the notebooks (or the named ones)."""
    parser = argparse.ArgumentParser(prog="python -m labkit.course.warm", description=main.__doc__)
    parser.add_argument("names", nargs="*", help="notebook name prefixes (e.g. 05 06); default: every notebook")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds one cell may run on a cold cache")
    args = parser.parse_args(argv)
    paths = sorted(notebooks_dir().glob("[0-9]*.ipynb"))
    if args.names:
        paths = [p for p in paths if any(p.name.startswith(n) for n in args.names)]
        if not paths:
            raise LabkitError(f"no notebook starts with {args.names}. Fix: name notebooks by number, e.g. 05 06")
    print(f"every cached run is ready: {warm(paths, args.timeout) / 60:.1f} min in all", flush=True)
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except LabkitError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2)
