"""Numbers in the course's prose: a figure a run produces is never typed into markdown (labkit.course.prose).

Every markdown cell of every notebook, and README.md, states only figures that are cited (with their source) or
defined (settings, formats, asserted bounds); a result is pointed at ("the table above") or rendered by a code cell.
"""

import pytest

from labkit.course.outputs import notebooks_dir, write_notebook
from labkit.course.prose import explain, figures, notebook_figures, readme_figures, summary

NOTEBOOKS = sorted(notebooks_dir().glob("[0-9]*.ipynb"))
README = notebooks_dir().parent / "README.md"


def verdicts(markdown: str) -> dict[str, str]:
    """Each figure of a markdown text and its verdict."""
    return {f.figure: f.verdict for f in figures(markdown, "test")}


def notebook(path, *markdown: str) -> None:
    """Write a notebook of markdown cells."""
    cells = [{"cell_type": "markdown", "metadata": {}, "source": [text]} for text in markdown]
    write_notebook(path, {"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5})


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_notebook_types_a_figure_that_is_neither_cited_nor_defined(path):
    stale = [f for f in notebook_figures(path) if f.verdict == "stale"]
    assert not stale, "\n".join(map(explain, stale))


def test_the_readme_types_no_figure_that_is_neither_cited_nor_defined():
    stale = [f for f in readme_figures(README) if f.verdict == "stale"]
    assert not stale, "\n".join(map(explain, stale))


def test_a_planted_stale_number_fails_the_notebook_test(tmp_path):
    path = tmp_path / "99_planted.ipynb"
    notebook(path, "## Speed\n\nWith labkit the same loop ran 3.2x faster than with the library's defaults.")
    [figure] = notebook_figures(path)
    assert (figure.where, figure.figure, figure.verdict) == ("99_planted.ipynb cell 0", "3.2x", "stale")
    with pytest.raises(AssertionError, match=r"99_planted.ipynb cell 0: '3.2x' in .* is neither cited nor defined"):
        test_no_notebook_types_a_figure_that_is_neither_cited_nor_defined(path)


def test_decimals_percentages_multipliers_money_and_units_are_figures_and_integers_are_not():
    found = verdicts("It took 1.4 s and 538 MB, scored 0.54 and 45 %, ran 1.6× and 3x slower, cost $2, "
                     "over 200 tickets in 2026, section 5.")
    assert set(found) == {"1.4 s", "538 MB", "0.54", "45 %", "1.6×", "3x", "$2"}


def test_a_source_named_before_the_figure_cites_it_and_one_named_after_does_not():
    assert verdicts("The articles quote 2–3 hours for QLoRA.") == {"2–3 hours": "cited"}
    assert verdicts("It ran 3.2x faster, unlike the articles' claim.") == {"3.2x": "stale"}


def test_a_marker_covers_its_block_and_needs_a_source():
    text = "<!-- cited: the QLoRA paper -->\nIt fits 48 GB.\n\nOurs took 17 ms."
    assert verdicts(text) == {"48 GB": "cited", "17 ms": "stale"}
    assert verdicts("<!-- cited: -->\nIt fits 48 GB.") == {"48 GB": "stale"}
    assert verdicts("<!-- defined: the format's layout -->\n| Q8_0 | 8.5 |") == {"8.5": "defined"}


def test_a_table_introduced_by_the_articles_is_cited():
    text = "The articles' rules of thumb:\n\n| knob | value |\n|---|---|\n| dropout | 0.05 |"
    assert verdicts(text) == {"0.05": "cited"}


def test_settings_thresholds_hardware_and_interval_levels_are_definitions():
    found = verdicts("Keep pairs with Jaccard >= 0.6 and β = 0.1, on 8 x 80 GB or a 48 GB GPU, with 95 % intervals.")
    assert found == {"0.6": "defined", "0.1": "defined", "80 GB": "defined", "48 GB": "defined", "95 %": "defined"}


def test_a_bound_a_check_asserts_may_be_stated():
    assert verdicts("It peaks lower (the check below holds it at 45 % or less).") == {"45 %": "asserted"}


def test_code_latex_links_model_sizes_and_names_with_digits_hold_no_figures():
    text = ("`lr=2.5e-4` and $s = 0.5$ on [a page](https://x.org/1.5GB/v1.2) for Qwen2.5 and Llama-3.1-8B, "
            "a 1.5B model of 28.3 M parameters, on Python 3.10+.")
    assert {k: v for k, v in verdicts(text).items() if v == "stale"} == {}


def test_the_summary_counts_figures_by_verdict():
    found = figures("The articles say 40 %. It took 3.5 s.", "test")
    assert summary(found) == "2 figures in markdown: 1 cited, 0 defined, 0 asserted, 1 stale"
