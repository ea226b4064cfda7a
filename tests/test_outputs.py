"""Stored notebook outputs: present, clean, small, and never older than the code that made them."""

import copy
import json
from pathlib import Path

import pytest

from labkit import LabkitError
from labkit.course import outputs as labkit_outputs
from labkit.course.outputs import (MAX_OUTPUT_BYTES, WIDGET_VIEW, clean, keep, notebooks_dir, oversized, read_notebook,
                            stale_cells)

NOTEBOOKS = sorted(notebooks_dir().glob("[0-9]*.ipynb"))


def code_cells(nb: dict) -> list[dict]:
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def toy_notebook() -> dict:
    cells = [{"cell_type": "markdown", "metadata": {}, "source": ["# Title"]},
             {"cell_type": "code", "metadata": {}, "source": ["x = 1"], "outputs": [], "execution_count": 1},
             {"cell_type": "code", "metadata": {}, "source": ["print(x)"], "execution_count": 2,
              "outputs": [{"output_type": "stream", "name": "stdout", "text": ["1\n"]}]}]
    return {"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_stored_output_belongs_to_the_current_source(path):
    assert stale_cells(read_notebook(path)) == [], f"{path.name}: stale outputs. Fix: make outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_notebook_shows_a_run_before_it_is_run(path):
    """On GitHub, in Colab before running, or in a handout, every notebook shows its plots, tables and numbers."""
    code = code_cells(read_notebook(path))
    assert all(c.get("execution_count") for c in code), f"{path.name}: code cells without a stored run. Fix: make outputs"
    assert sum(bool(c.get("outputs")) for c in code) >= len(code) // 2, f"{path.name}: most cells show nothing"


def test_a_notebook_that_stores_no_run_is_not_stale():
    assert stale_cells(toy_notebook() | {"cells": [c | {"outputs": []} for c in toy_notebook()["cells"]]}) == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_notebook_stores_an_error_stderr_or_a_widget_view(path):
    stored = [o for c in code_cells(read_notebook(path)) for o in c.get("outputs", [])]
    assert all(keep(o) for o in stored)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_stored_output_is_oversized(path):
    assert oversized(read_notebook(path)) == []


def test_the_notebooks_folder_stays_small():
    assert sum(p.stat().st_size for p in NOTEBOOKS) < 12_000_000


def test_editing_a_code_cell_makes_it_and_every_cell_below_stale():
    nb = clean(toy_notebook())
    assert stale_cells(nb) == []
    code_cells(nb)[0]["source"] = ["x = 2"]
    assert stale_cells(nb) == [1, 2]


def test_editing_markdown_leaves_outputs_fresh():
    nb = clean(toy_notebook())
    nb["cells"][0]["source"] = ["# Another title"]
    assert stale_cells(nb) == []


def test_a_new_code_cell_is_stale_until_refreshed():
    nb = clean(toy_notebook())
    nb["cells"].append({"cell_type": "code", "metadata": {}, "source": ["y = 3"], "outputs": [], "execution_count": None})
    assert stale_cells(nb) == [3]


def test_a_real_notebook_goes_stale_when_one_code_cell_changes():
    nb = read_notebook(NOTEBOOKS[0])
    edited = copy.deepcopy(nb)
    code_cells(edited)[-1]["source"] = code_cells(edited)[-1]["source"] + ["\n# edited"]
    assert stale_cells(edited) == [len(code_cells(nb))]


def test_cleaning_keeps_stdout_and_plots_and_drops_stderr_widget_views_and_errors():
    outputs = [{"output_type": "stream", "name": "stdout", "text": ["kept\n"]},
               {"output_type": "stream", "name": "stderr", "text": ["a warning\n"]},
               {"output_type": "display_data", "metadata": {}, "data": {"image/png": "iVBOR", "text/plain": ["<Figure>"]}},
               {"output_type": "display_data", "metadata": {}, "data": {WIDGET_VIEW: {"model_id": "m"}, "text/plain": ["HBox()"]}},
               {"output_type": "error", "ename": "ValueError", "evalue": "no", "traceback": []}]
    nb = toy_notebook()
    code_cells(nb)[1]["outputs"] = outputs
    kept = code_cells(clean(nb))[1]["outputs"]
    assert [o.get("name") or next(iter(o["data"])) for o in kept] == ["stdout", "image/png"]


def test_an_oversized_output_is_found():
    nb = toy_notebook()
    code_cells(nb)[1]["outputs"] = [{"output_type": "display_data", "metadata": {},
                                     "data": {"image/png": "A" * (MAX_OUTPUT_BYTES + 1)}}]
    assert oversized(nb) == [(2, len(json.dumps(code_cells(nb)[1]["outputs"][0])))]


def test_a_run_that_writes_to_stderr_is_refused_and_nothing_is_written(monkeypatch, tmp_path):
    nb = toy_notebook()
    code_cells(nb)[1]["outputs"] = [{"output_type": "stream", "name": "stderr",
                                     "text": ["Running requests:  54%|#####     | 65/120\n"]}]
    path = tmp_path / "toy.ipynb"
    path.write_text(json.dumps(toy_notebook()))
    before = path.read_text()
    monkeypatch.setattr(labkit_outputs, "execute", lambda p, timeout_s=600: copy.deepcopy(nb))
    with pytest.raises(LabkitError, match=r"toy.ipynb: code cell 2 wrote to stderr on a clean run.*'Running requests:"
                                          r".*Fix: .*nothing was written"):
        labkit_outputs.refresh(path)
    assert path.read_text() == before
