"""The rendered course (labkit.course.site): a page per notebook with its plots, and a contents page linking them."""

import re

import pytest

from labkit.course.outputs import notebooks_dir, read_notebook
from labkit.course.site import build, headings, title

NOTEBOOKS = sorted(notebooks_dir().glob("[0-9]*.ipynb"))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site") / "site"
    build(out, execute_first=False)
    return out


def stored_images(nb: dict) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", []))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_notebook_has_a_page_with_its_title_and_images(site, path):
    page = (site / path.with_suffix(".html").name).read_text(encoding="utf-8")
    nb = read_notebook(path)
    assert title(nb, "") and title(nb, "").split()[0] in page
    assert len(re.findall(r'<img[^>]+src="data:image/png;base64,', page)) >= stored_images(nb)


def test_the_contents_page_links_every_notebook_in_order(site):
    index = (site / "index.html").read_text(encoding="utf-8")
    links = re.findall(r'<a href="([^"]+\.html)">', index)
    assert links == [p.with_suffix(".html").name for p in NOTEBOOKS]


def test_pages_link_to_their_neighbours(site):
    page = (site / NOTEBOOKS[1].with_suffix(".html").name).read_text(encoding="utf-8")
    assert f'href="{NOTEBOOKS[0].with_suffix(".html").name}"' in page and 'href="index.html"' in page


def test_headings_are_read_from_markdown():
    nb = {"cells": [{"cell_type": "markdown", "source": ["# Title\n", "text\n", "## Part one"]},
                    {"cell_type": "code", "source": ["# not a heading"]}]}
    assert headings(nb) == [(1, "Title"), (2, "Part one")]


def test_make_site_executes_only_notebooks_whose_stored_outputs_are_missing_or_stale(tmp_path, monkeypatch):
    import labkit.course.site as site_module
    from labkit.course.outputs import clean, write_notebook

    def toy(source: str, stored: bool) -> dict:
        cell = {"cell_type": "code", "metadata": {}, "source": [source], "execution_count": 1 if stored else None,
                "outputs": [{"output_type": "stream", "name": "stdout", "text": ["1\n"]}] if stored else []}
        nb = {"cells": [{"cell_type": "markdown", "metadata": {}, "source": ["# Toy"]}, cell], "metadata": {},
              "nbformat": 4, "nbformat_minor": 5}
        return clean(nb) if stored else nb

    folder = tmp_path / "notebooks"
    folder.mkdir()
    stale = toy("print(1)", stored=True)
    stale["cells"][1]["source"] = ["print(2)"]  # edited after its run was stored
    for name, nb in {"00_fresh.ipynb": toy("print(1)", True), "01_stale.ipynb": stale,
                     "02_never_run.ipynb": toy("print(1)", False)}.items():
        write_notebook(folder / name, nb)
    executed = []
    monkeypatch.setattr(site_module, "notebooks_dir", lambda: folder)
    monkeypatch.setattr(site_module, "execute", lambda path: executed.append(path.name) or read_notebook(path))
    build(tmp_path / "site")
    assert executed == ["01_stale.ipynb", "02_never_run.ipynb"]
    assert sorted(p.name for p in (tmp_path / "site").glob("*.html")) == [
        "00_fresh.html", "01_stale.html", "02_never_run.html", "index.html"]
