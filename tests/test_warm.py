"""Specifications of `make warm`: every notebook run once, in order, one progress line each."""

from pathlib import Path

import pytest

import labkit.course.warm
from labkit import LabkitError


def test_warm_runs_the_notebooks_in_order_with_a_line_each(monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(labkit.course.warm, "execute", lambda path, timeout_s: ran.append(Path(path).name))
    assert labkit.course.warm.main(["05", "06"]) == 0
    assert ran == ["05_sft.ipynb", "06_dpo.ipynb"]
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("[1/2] 05_sft.ipynb: running (about ") and "min cold" in lines[1]
    assert lines[2].startswith("[2/2] 06_dpo.ipynb") and lines[-1].startswith("every cached run is ready")


def test_every_notebook_has_its_expected_cold_minutes():
    names = {p.name[:2] for p in labkit.course.warm.notebooks_dir().glob("[0-9]*.ipynb")}
    assert names <= set(labkit.course.warm.COLD_MINUTES), names - set(labkit.course.warm.COLD_MINUTES)


def test_an_unknown_notebook_name_is_refused():
    with pytest.raises(LabkitError, match="no notebook starts with"):
        labkit.course.warm.main(["99"])
