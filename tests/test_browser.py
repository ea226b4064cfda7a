"""The course as a learner sees it: JupyterLab in a real (headless) Chromium runs notebooks through its menu.

JupyterLab starts on 127.0.0.1 with a random token on a temporary copy of notebooks/; Playwright drives
Debian's chromium (Playwright cannot download its own browsers here). Needs `apt-get install chromium`;
without it these tests skip. On failure a screenshot is saved under SCREENSHOTS (its path is printed).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
CHROMIUM = Path(os.environ.get("LABKIT_CHROMIUM", "/usr/bin/chromium"))
SCREENSHOTS = Path(tempfile.gettempdir()) / "labkit-browser-screenshots"
# The setup notebook, and the cheapest notebook with a widget and a plot (the decision wizard, ~20 s of cells).
# LABKIT_BROWSER_NOTEBOOKS=00_setup.ipynb runs only the first.
RUN = os.environ.get("LABKIT_BROWSER_NOTEBOOKS", "00_setup.ipynb,01_decision_framework.ipynb").split(",")
WIDGET_NOTEBOOK = "01_decision_framework.ipynb"
RUN_TIMEOUT_S = 900  # per notebook; 01 took 359 s on 2 cores shared with other jobs (load ~15)
FLAGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
# JupyterLab settings for a test: every cell stays in the page (no virtual scrolling), no news pop-up.
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                         "checkForUpdates": False},
}
STDERR = "application/vnd.jupyter.stderr"
WIDGET_AS_TEXT = re.compile(r"(HBox|VBox|Box|interactive|\w+Slider|Checkbox|Dropdown)\(children=|"
                            r"Error displaying widget|Loading widget")
FIGURE_AS_TEXT = re.compile(r"<Figure size \d+x\d+ with \d+ Axes>")

playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the `test` extra)")
if not CHROMIUM.exists():
    pytest.skip(f"no chromium at {CHROMIUM}: install it with `sudo apt-get install -y chromium` "
                "(.ci/run does), or set LABKIT_CHROMIUM", allow_module_level=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(url: str, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    """Return once the Jupyter server answers `url`; fail if it exits or takes too long."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"jupyter lab exited with code {proc.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"jupyter lab did not answer {url} within {timeout_s} s")


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Iterator[str]:
    """A JupyterLab server on a copy of notebooks/ (autosave never touches the repo); yields its URL with token."""
    root = tmp_path_factory.mktemp("lab")
    work = shutil.copytree(NOTEBOOKS, root / "notebooks", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    for path in work.glob("*.ipynb"):  # the stored outputs off, so everything on the page comes from this run
        nb = json.loads(path.read_text(encoding="utf-8"))
        for cell in nb["cells"]:
            if cell["cell_type"] == "code":
                cell["outputs"], cell["execution_count"] = [], None
                # solution cells open, so their prompts can be read (collapsed, JupyterLab drops the prompt)
                cell["metadata"].get("jupyter", {}).pop("source_hidden", None)
        path.write_text(json.dumps(nb, indent=1, ensure_ascii=False), encoding="utf-8")
    for name, values in LAB_SETTINGS.items():
        (root / "settings" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "settings" / name).write_text(json.dumps(values))
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTERLAB_SETTINGS_DIR": str(root / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(root / "workspaces"), "JUPYTER_CONFIG_DIR": str(root / "config")}
    env.pop("TQDM_DISABLE", None)  # progress bars as a learner sees them (conftest turns them off for pytest)
    cmd = [str(Path(sys.executable).parent / "jupyter"), "lab", "--no-browser", "--ip=127.0.0.1",
           f"--port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}"]
    if os.getuid() == 0:
        cmd.append("--allow-root")
    log = open(root / "jupyter.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_server(f"http://127.0.0.1:{port}/api/status?token={token}", proc)
        # ?reset opens each notebook in a fresh workspace: the earlier notebook's tab must not take Run All.
        yield f"http://127.0.0.1:{port}/lab/tree/{{}}?reset&token={token}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def browser():
    """Headless Debian chromium, driven by Playwright."""
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=FLAGS)
        yield browser
        browser.close()


def screenshot(page, name: str) -> Path:
    """Save what the page shows now; print and return the file's path."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path))
    print(f"screenshot: {path}")
    return path


@contextmanager
def screenshot_on_failure(page, name: str) -> Iterator[None]:
    """Run the block; if it fails, save a screenshot named `name` first."""
    try:
        yield
    except BaseException:
        screenshot(page, name)
        raise


def prompts(page) -> list[str]:
    """The execution prompts of the notebook's code cells: '[3]:' ran, '[*]:' queued or running, '[ ]:' not run."""
    return page.eval_on_selector_all(".jp-CodeCell .jp-InputArea-prompt", "els => els.map(e => e.textContent)")


def run_all_cells(page, url: str, name: str) -> int:
    """Open a notebook, run it with Run > Run All Cells, wait until it stops; return how many cells ran (in order)."""
    start = time.monotonic()
    page.goto(url)
    page.wait_for_selector(".jp-Notebook .jp-CodeCell", timeout=60_000)
    opened = time.monotonic()
    # The status bar says "Python 3 (ipykernel) | Idle" once the kernel has started and connected.
    page.locator(".jp-StatusBar-Widget", has_text=re.compile(r"\| Idle")).first.wait_for(timeout=120_000)
    idle = time.monotonic()
    for attempt in range(3):  # a kernel that is still connecting can swallow the first Run All
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_role("menuitem", name=re.compile(r"^Run All Cells\b")).click()  # the name ends in its shortcut
        try:
            page.wait_for_function("() => [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')]"
                                   ".some(e => /\\[(\\*|\\d+)\\]/.test(e.textContent))", timeout=60_000)
            break
        except playwright.TimeoutError:
            if attempt == 2:
                raise
    # Done when every cell has a number, or nothing is queued any more (a cell failed and the rest were cancelled).
    page.wait_for_function(
        """() => {
            const p = [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')].map(e => e.textContent);
            return p.length > 0 && (p.every(t => /\\[\\d+\\]/.test(t)) ||
                (!p.some(t => t.includes('*')) && document.querySelector('.jp-OutputArea-output.jp-mod-error, '
                 + '[data-mime-type="application/vnd.jupyter.error"]')));
        }""",
        timeout=RUN_TIMEOUT_S * 1000, polling=500,
    )
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=60_000)
    print(f"{name}: page {opened - start:.0f} s, kernel ready {idle - opened:.0f} s, "
          f"Run All {time.monotonic() - idle:.0f} s")
    # A fresh kernel numbers the cells it runs 1, 2, ...: the highest number is how many ran, in order.
    return max((int(m.group(1)) for p in prompts(page) if (m := re.search(r"\[(\d+)\]", p))), default=0)


@pytest.fixture(scope="module", params=RUN)
def ran(request, lab, browser):
    """A page on which a notebook has been run through the UI, with its name and how many cells ran."""
    name = request.param
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    start = time.monotonic()
    with screenshot_on_failure(page, f"{Path(name).stem}-run"):
        cells = run_all_cells(page, lab.format(name), name)
    print(f"{name}: {cells} cells run in the browser in {time.monotonic() - start:.0f} s")
    yield name, page, cells
    page.close()


def outputs(page, selector: str = ".jp-OutputArea-output"):
    """The rendered output areas of every cell."""
    return page.locator(f".jp-Notebook {selector}")


def test_every_code_cell_runs_through_the_ui(ran):
    name, page, cells = ran
    code = [c for c in json.loads((NOTEBOOKS / name).read_text())["cells"] if c["cell_type"] == "code"]
    with screenshot_on_failure(page, f"{Path(name).stem}-cells"):
        assert cells == len(code), f"{name}: {cells} of {len(code)} code cells ran; prompts {prompts(page)}"


def test_no_cell_shows_an_error(ran):
    name, page, _ = ran
    errors = outputs(page, ".jp-mod-error, [data-mime-type='application/vnd.jupyter.error']")
    with screenshot_on_failure(page, f"{Path(name).stem}-error"):
        if errors.count():
            errors.first.scroll_into_view_if_needed()
        assert errors.count() == 0, f"{name}: error output: {errors.first.inner_text()[:500]}"


def test_no_cell_writes_to_stderr(ran):
    name, page, _ = ran
    stderr = outputs(page, f"[data-mime-type='{STDERR}']:not(.jp-mod-error)")
    with screenshot_on_failure(page, f"{Path(name).stem}-stderr"):
        if stderr.count():
            stderr.first.scroll_into_view_if_needed()
        assert stderr.count() == 0, f"{name}: stderr output: {stderr.first.inner_text()[:500]}"


def test_every_plot_is_an_image(ran):
    name, page, _ = ran
    texts = outputs(page).all_inner_texts()
    with screenshot_on_failure(page, f"{Path(name).stem}-plots"):
        assert outputs(page, "img").count() >= 1, f"{name}: no plot rendered as an image"
        assert not [t for t in texts if FIGURE_AS_TEXT.search(t)], f"{name}: a figure shown as text"


def test_every_widget_renders_as_a_widget(ran):
    name, page, _ = ran
    widgets = page.locator(".jp-Notebook .jupyter-widgets")
    with screenshot_on_failure(page, f"{Path(name).stem}-widgets"):
        if name == WIDGET_NOTEBOOK:  # widget views render after the kernel is done: give them a moment
            page.wait_for_function("() => document.querySelector('.jp-Notebook .widget-interact') || "
                                   "/\\w+\\(children=/.test(document.querySelector('.jp-Notebook').innerText)",
                                   timeout=30_000)
        as_text = outputs(page).filter(has_text=WIDGET_AS_TEXT)
        if as_text.count():
            as_text.first.scroll_into_view_if_needed()
        assert as_text.count() == 0, f"{name}: a widget shown as text: {as_text.first.inner_text()[:300]}"
        assert name != WIDGET_NOTEBOOK or widgets.count() > 0, f"{name}: no widget rendered"


def test_changing_a_widget_changes_what_the_notebook_shows(ran):
    name, page, _ = ran
    if name != WIDGET_NOTEBOOK:
        pytest.skip(f"{name} has no widget")
    wizard = page.locator(".jp-Notebook .widget-interact")  # the decision wizard: checkboxes over a recommendation
    with screenshot_on_failure(page, f"{Path(name).stem}-interaction"):
        assert wizard.count() == 1, f"{name}: expected the wizard widget, found {wizard.count()}"
        result = wizard.locator(".widget-output")
        wizard.scroll_into_view_if_needed()
        before = result.inner_text()
        wizard.locator("input[type=checkbox]").first.click()
        page.wait_for_function("([el, before]) => el.innerText !== before", arg=[result.element_handle(), before],
                               timeout=30_000)
        assert result.inner_text() != before
