"""What every notebook shares: the Colab cell, and one budget source (the runtime profile)."""

import json
import re
from pathlib import Path

import pytest

from labkit.course.colab import COLAB_CELL, colab_cell_source
from labkit.runtime import PROFILES

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def code_of(path: Path) -> str:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 7


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_first_code_cell_is_the_colab_cell(path):
    assert colab_cell_source(path) == COLAB_CELL, f"run `python -m labkit.course.colab` to rewrite {path.name}'s first cell"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_notebook_defines_its_own_budget(path):
    assert "BUDGET" not in code_of(path), f"{path.name}: read step counts and sizes from rt.settings"


def test_both_profiles_have_the_same_keys():
    assert set(PROFILES["cpu"]) == set(PROFILES["gpu"])


@pytest.mark.parametrize("key", sorted(set(PROFILES["cpu"]) - {"model"}))
def test_every_profile_key_is_read_by_a_notebook(key):
    labkit = Path(__file__).resolve().parent.parent / "labkit"
    sources = {p.name: code_of(p) for p in NOTEBOOKS} | {  # 05's main run and the named runs later notebooks load
        "labkit.sft.course_config": (labkit / "sft.py").read_text(), "labkit.runs": (labkit / "runs.py").read_text()}
    readers = [name for name, code in sources.items() if re.search(rf"""budget\[["']{key}["']\]""", code)]
    assert readers, f"PROFILES[...][{key!r}] is read by no notebook: use it or remove it"


def test_the_course_run_can_stop_early():
    from labkit.sft import course_config

    for profile in PROFILES.values():
        config = course_config(profile)
        assert config.patience and config.steps // config.eval_every > config.patience


def test_notebooks_that_build_on_earlier_runs_load_them_by_name():
    """labkit.runs defines each reused run once (keys pinned in tests/test_runs.py); 07 then finds 06's DPO run
    instead of training it again under another name, and no notebook keeps a hand copy that could drift."""
    users = [p.name for p in NOTEBOOKS if "runs.triage_sft(" in code_of(p)]
    assert users == ["06_dpo.ipynb", "07_evaluation.ipynb", "08_merge_deploy.ipynb", "10_rl_verifiable_rewards.ipynb"]
    assert "runs.dpo(" in code_of(NOTEBOOKS[7]) and "runs.reply_sft(" in code_of(NOTEBOOKS[7])
    assert "config = course_config(budget)" in code_of(NOTEBOOKS[5])  # 05 trains the run the others load
    copies = [(p.name, c) for p in NOTEBOOKS for c in ("course_config(budget)", " DPOConfig(", " ORPOConfig(",
              " KTOConfig(", 'batch_size=budget["dpo_batch_size"], lr=1e-3') if p != NOTEBOOKS[5] and c in code_of(p)]
    assert not copies, f"hand-copied run configurations (use labkit.runs): {copies}"
