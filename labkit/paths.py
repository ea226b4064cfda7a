"""Where the course's files are: the data folder and labkit's cache."""

from __future__ import annotations

import os
from pathlib import Path

from labkit import LabkitError


def data_dir() -> Path:
    """The course's data/ folder: $LABKIT_DATA, the repo checkout, or ./data or ../data."""
    candidates = []
    if os.environ.get("LABKIT_DATA"):
        candidates.append(Path(os.environ["LABKIT_DATA"]))
    candidates += [Path(__file__).resolve().parent.parent / "data", Path.cwd() / "data", Path.cwd().parent / "data"]
    for folder in candidates:
        if (folder / "train.jsonl").exists():
            return folder
    raise LabkitError(
        "cannot find the course data (train.jsonl). Run the notebook from the repository's notebooks/ "
        "folder, or set LABKIT_DATA=/path/to/labkit/data."
    )


def cache_root() -> Path:
    """Where labkit keeps converted models and trained adapters ($LABKIT_HOME)."""
    return Path(os.environ.get("LABKIT_HOME", Path.home() / ".cache" / "labkit"))
