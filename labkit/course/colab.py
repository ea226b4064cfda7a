"""The first cell of every notebook: on Colab it fetches the course and installs what Colab lacks.

The course's address is written here once (REPO_URL). `python -m labkit.course.colab` writes COLAB_CELL into
every notebook; tests/test_notebooks.py fails if a notebook's copy differs.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

REPO_URL = "https://github.com/labkit-course/labkit"

COLAB_CELL = f'''# Colab only: fetch the course (labkit + data) and install what Colab lacks (labkit[colab] in pyproject.toml:
# trl, bitsandbytes, rouge-score, sacrebleu, the embedding model); 07 and 08 add their engine when they need it.
# Everything else Colab already has at versions labkit accepts, so no runtime restart is needed.
# Elsewhere this cell does nothing. LABKIT_REPO / LABKIT_COLAB_DIR override where from and where to.
import os, subprocess, sys
REPO = os.environ.get("LABKIT_REPO", "{REPO_URL}")
HOME = os.environ.get("LABKIT_COLAB_DIR", "/content/labkit")
if "google.colab" in sys.modules:
    if not os.path.exists(HOME):
        subprocess.run(["git", "clone", "--depth", "1", REPO, HOME], check=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", HOME + "[colab]"], check=True)
    sys.path.insert(0, HOME)
    os.chdir(os.path.join(HOME, "notebooks"))'''

COLAB_CELL_INDEX = 1  # after the title cell


def on_colab() -> bool:
    """True inside a Google Colab runtime."""
    return "google.colab" in sys.modules


def install_on_colab(requirement: str, why: str, no_deps: bool = False) -> bool:
    """On Colab, pip-install what one notebook needs the first time it needs it (True); elsewhere do nothing (False).

    The Colab cell installs only what every notebook needs; 07's judge and harness and 08's server need more
    (a llama.cpp build takes minutes), so they ask for it here instead of making every notebook wait.
    """
    if not on_colab():
        return False
    print(f"Colab: installing {requirement} for {why} (once per runtime) ...", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *(["--no-deps"] if no_deps else []), requirement],
                   check=True)
    importlib.invalidate_caches()
    return True


def notebooks_dir() -> Path:
    """The repository's notebooks/ folder."""
    return Path(__file__).resolve().parents[2] / "notebooks"


def colab_cell_source(path: str | Path) -> str:
    """The source of a notebook's Colab cell (the first code cell)."""
    nb = json.loads(Path(path).read_text(encoding="utf-8"))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    return "".join(code[0]["source"]) if code else ""


def write_colab_cell(path: str | Path) -> bool:
    """Make a notebook's first code cell COLAB_CELL; True if the file changed."""
    path = Path(path)
    nb = json.loads(path.read_text(encoding="utf-8"))
    cell = next(c for c in nb["cells"] if c["cell_type"] == "code")
    lines = COLAB_CELL.splitlines(keepends=True)
    if cell["source"] == lines:
        return False
    cell["source"] = lines
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return True


if __name__ == "__main__":
    for nb_path in sorted(notebooks_dir().glob("*.ipynb")):
        if write_colab_cell(nb_path):
            print("updated", nb_path.name, file=sys.stderr)
