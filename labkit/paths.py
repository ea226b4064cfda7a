"""Where the course's files are: the data folder and labkit's cache."""

from __future__ import annotations

from pathlib import Path

from labkit import LabkitError, settings


def data_dir() -> Path:
    """The course's data/ folder: $LABKIT_DATA, the repo checkout, or ./data or ../data."""
    if (chosen := settings.data_folder()) is not None:  # set: it must hold the data, never silently another folder
        return chosen
    candidates = [Path(__file__).resolve().parent.parent / "data", Path.cwd() / "data", Path.cwd().parent / "data"]
    for folder in candidates:
        if (folder / "train.jsonl").exists():
            return folder
    raise LabkitError(
        "cannot find the course data (train.jsonl). Run the notebook from the repository's notebooks/ "
        "folder, or set LABKIT_DATA=/path/to/labkit/data."
    )


def cache_root() -> Path:
    """Where labkit keeps converted models and trained adapters ($LABKIT_HOME)."""
    return settings.home()


def model_dir(name: str) -> Path:
    """labkit's safetensors folder of one model: where the offline GGUF is converted to (exists once converted)."""
    return cache_root() / "models" / name.replace("/", "--")
