"""Browser tests for widgets: a real JupyterLab server on 127.0.0.1, Chromium driven by Playwright.

Use it from a test module with ``pytest_plugins = ["browser.harness"]`` (the fixtures below become
available) or from a script through `JupyterLab`, `chromium` and `NotebookPage` directly (as
``bench/dashboard.py`` does). See ``tcwidgets/widgets/README.md``.

Everything stays on this machine: the server listens on 127.0.0.1 with a random token, JupyterLab's
news and update checks are off, Chromium runs headless with networking features off, and every
wait has a timeout. Screenshots go to ``test-artifacts/`` (a failing test gets one automatically).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("TCW_TEST_ARTIFACTS", ROOT / "test-artifacts"))
CHROMIUM = os.environ.get("TCW_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SERVER_TIMEOUT = 90  # seconds for JupyterLab to answer
CELL_TIMEOUT = 120  # seconds for one cell (or a whole run-all) to finish
UI_TIMEOUT = 30  # seconds for the page to react

# JupyterLab settings for tests: no news or update checks (no network), every cell in the DOM.
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                         "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class JupyterLab:
    """A JupyterLab server on 127.0.0.1 serving ``root``, with its own config, settings and runtime
    folders (so nothing from the user's setup leaks in). Use as a context manager.

    ``env`` adds variables for the server and its kernels.
    """

    def __init__(self, root: Path, *, env: dict[str, str] | None = None, theme: str | None = None) -> None:
        self.root = Path(root)
        self.port = _free_port()
        self.token = secrets.token_hex(16)
        self.home = Path(tempfile.mkdtemp(prefix="tcw-lab-"))
        self.env = {**os.environ, "JUPYTER_CONFIG_DIR": str(self.home / "config"),
                    "JUPYTER_RUNTIME_DIR": str(self.home / "runtime"), "IPYTHONDIR": str(self.home / "ipython"),
                    "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        settings = dict(LAB_SETTINGS)
        if theme:
            settings["@jupyterlab/apputils-extension/themes.jupyterlab-settings"] = {"theme": theme}
        for name, values in settings.items():
            path = self.home / "settings" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))
        self.log = self.home / "server.log"
        self.process: subprocess.Popen | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str, **query: str) -> str:
        """A page of this server, with the token."""
        return f"{self.base}/{path.lstrip('/')}?" + urllib.parse.urlencode({"token": self.token, **query})

    def start(self) -> JupyterLab:
        self.root.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
                   f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
                   f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root}",
                   f"--LabApp.user_settings_dir={self.home / 'settings'}",
                   f"--LabApp.workspaces_dir={self.home / 'workspaces'}", "--LabApp.news_url=None",
                   "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
                   "--LabApp.extension_manager=readonly", "--ServerApp.terminals_enabled=False",
                   "--allow-root"]
        with self.log.open("w") as log:
            self.process = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            cwd=self.root, start_new_session=True)
        deadline = time.monotonic() + SERVER_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with code {self.process.returncode}:\n{self.log.read_text()}")
            try:
                self.api("GET", "api/status")
                return self
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"JupyterLab did not answer on {self.base} within {SERVER_TIMEOUT}s:\n"
                           f"{self.log.read_text()}")

    def api(self, method: str, path: str, body: Any = None, timeout: float = 10) -> Any:
        """Call the server's REST API; returns the decoded JSON (or None)."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.base}/{path.lstrip('/')}", data=data, method=method,
                                         headers={"Authorization": f"token {self.token}",
                                                  "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read()
        return json.loads(text) if text else None

    def wait_for_kernel(self, path: str, timeout: float = CELL_TIMEOUT) -> None:
        """Wait until the notebook at ``path`` has a started, idle kernel that a page is connected to
        (the page's own status indicator reads "idle" before its kernel has even started)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for session in self.api("GET", "api/sessions"):
                kernel = session["kernel"]
                if session["path"] == path and kernel["execution_state"] == "idle" and kernel["connections"] > 0:
                    return
            time.sleep(0.3)
        raise TimeoutError(f"The kernel of {path} did not start within {timeout}s:\n{self.log.read_text()[-3000:]}")

    def close_session(self, path: str) -> None:
        """Shut down the kernel of the notebook at ``path`` (relative to the root)."""
        for session in self.api("GET", "api/sessions"):
            if session["path"] == path:
                self.api("DELETE", f"api/sessions/{session['id']}")

    def stop(self) -> None:
        """Shut the server (and its kernels) down; kill the process group if it does not exit."""
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                self.api("POST", "api/shutdown", timeout=5)
                self.process.wait(timeout=20)
            except (urllib.error.URLError, ConnectionError, subprocess.TimeoutExpired, TimeoutError):
                os.killpg(self.process.pid, signal.SIGTERM)
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(self.process.pid, signal.SIGKILL)
                    self.process.wait(timeout=10)
        self.process = None
        shutil.rmtree(self.home, ignore_errors=True)

    def __enter__(self) -> JupyterLab:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium (the system one; Playwright never downloads a browser)."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).is_file():
        raise RuntimeError(f"No Chromium at {CHROMIUM}: install it (apt-get install -y chromium) or set "
                           "TCW_CHROMIUM to its path.")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True,
                                             timeout=UI_TIMEOUT * 1000)
        try:
            yield browser
        finally:
            browser.close()


def write_notebook(path: Path, cells: Sequence[str]) -> Path:
    """Write a notebook of code cells (with the python3 kernelspec, so no kernel dialog)."""
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in cells])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, str(path))
    return path


_PROMPTS = """() => [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell')]
    .map(cell => cell.querySelector('.jp-InputPrompt').textContent.trim())"""


_CLIPPED = """(box) => { const r = box.getBoundingClientRect();
  const outside = [...box.querySelectorAll('*')].map((el) => [el.textContent.slice(0, 40), el.getBoundingClientRect()])
    .filter(([, b]) => b.width > 0 && (b.left < r.left - 0.5 || b.right > r.right + 0.5 || b.bottom > r.bottom + 0.5))
    .map(([text, b]) => [text, b.left, b.right, b.bottom]);
  const scrolls = box.scrollWidth > box.clientWidth || box.scrollHeight > box.clientHeight;
  return { scrolls, sizes: [box.scrollWidth, box.clientWidth, box.scrollHeight, box.clientHeight], outside }; }"""


def clipped(locator: Any) -> dict[str, Any]:
    """What of an element's content is cut off: ``scrolls`` (its content is larger than its box:
    scrollWidth/Height against clientWidth/Height, ``sizes``) and the parts drawn outside its box
    (``outside``: text, left, right, bottom). Nothing is clipped when ``scrolls`` is false and
    ``outside`` empty."""
    return locator.evaluate(_CLIPPED)


class NotebookPage:
    """A notebook opened in JupyterLab in a browser page and driven through the UI: menus,
    clicks and the keyboard, like a learner."""

    def __init__(self, lab: JupyterLab, page: Any, path: str) -> None:
        self.lab, self.page, self.path = lab, page, path

    def open(self) -> NotebookPage:
        """Load JupyterLab on the notebook, in a fresh workspace of its own (so no earlier tab is
        restored), and wait for its kernel to be idle."""
        workspace = re.sub(r"[^A-Za-z0-9_-]+", "-", self.path)
        self.page.goto(self.lab.url(f"lab/workspaces/{workspace}/tree/{self.path}", reset=""),
                       timeout=UI_TIMEOUT * 1000)
        self.panel.locator(".jp-Notebook").wait_for(timeout=UI_TIMEOUT * 1000)
        self.lab.wait_for_kernel(self.path)
        self.wait_idle()
        return self

    @property
    def panel(self) -> Any:
        return self.page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")

    def cell(self, index: int) -> Any:
        return self.panel.locator(".jp-Notebook .jp-Cell").nth(index)

    def prompts(self) -> list[str]:
        """The code cells' input prompts (``"[3]:"``, ``"[*]:"``, ``"[ ]:"``)."""
        return self.page.evaluate(_PROMPTS)

    def wait_idle(self, timeout: float = CELL_TIMEOUT) -> None:
        """Wait until the kernel is connected and idle, and no cell is queued or running."""
        self.page.wait_for_function(
            """() => { const s = document.querySelector(
                   '.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook-ExecutionIndicator');
                 const busy = [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-InputPrompt')]
                   .some(p => p.textContent.includes('*'));
                 return s && s.dataset.status === 'idle' && !busy; }""", timeout=timeout * 1000)

    def menu(self, *labels: str) -> None:
        """Click through the menu bar: ``menu("Settings", "Theme", "JupyterLab Dark")``."""
        self.page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(f"^{re.escape(labels[0])}$")).click()
        for label in labels[1:]:
            self.page.locator(".lm-Menu:visible .lm-Menu-itemLabel",
                              has_text=re.compile(f"^{re.escape(label)}$")).last.click()

    def run_all(self, timeout: float = CELL_TIMEOUT) -> None:
        """Run → Run All Cells, then wait until every cell ran (or one failed and the rest were skipped)."""
        self.cell(0).locator(".jp-InputPrompt").click()
        self.menu("Run", "Run All Cells")
        self.page.wait_for_function(
            f"""() => {{ const p = ({_PROMPTS})();
                 return p.every(t => /\\[\\d+\\]/.test(t)) ||
                   (!p.some(t => t.includes('*')) && document.querySelector(
                     '.jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output[data-mime-type*="error"]')); }}""",
            timeout=timeout * 1000)
        self.wait_idle(timeout)

    def run_cell(self, index: int, timeout: float = CELL_TIMEOUT) -> str:
        """Select cell ``index``, run it with Ctrl+Enter, wait for it; returns its output text."""
        before = self.prompts()[index]
        self.cell(index).locator(".jp-InputPrompt").click()
        self.page.keyboard.press("Control+Enter")
        self.page.wait_for_function(
            f"() => {{ const t = ({_PROMPTS})()[{index}];"
            f" return /\\[\\d+\\]/.test(t) && t !== {json.dumps(before)}; }}",
            timeout=timeout * 1000)
        self.wait_idle(timeout)
        return self.output(index)

    def run(self, code: str, timeout: float = CELL_TIMEOUT) -> str:
        """Add a cell at the end, type ``code`` into it, run it; returns its output text."""
        count = self.panel.locator(".jp-Notebook .jp-Cell").count()
        self.cell(count - 1).locator(".jp-InputPrompt").click()
        self.page.keyboard.press("Escape")
        self.page.keyboard.press("b")
        self.cell(count).wait_for(timeout=UI_TIMEOUT * 1000)
        self.cell(count).locator(".cm-content").click()
        self.page.keyboard.insert_text(code)
        return self.run_cell(count, timeout)

    def output(self, index: int) -> str:
        """The text of a cell's outputs."""
        return self.cell(index).locator(".jp-OutputArea").inner_text()

    def screenshot(self, name: str, locator: Any = None) -> Path:
        """Save a screenshot (of the page, or of ``locator``) as ``test-artifacts/<name>.png``."""
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.png"
        (locator or self.page).screenshot(path=str(path))
        return path

    def close(self) -> None:
        """Close the page and shut the notebook's kernel down."""
        self.page.close()
        self.lab.close_session(self.path)


# -- pytest plugin -------------------------------------------------------------------------------------------

def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "browser: drives a real JupyterLab in Chromium (select with -m browser)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


@pytest.fixture(scope="session")
def lab_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder JupyterLab serves: put notebooks and the files they read here."""
    return tmp_path_factory.mktemp("lab")


@pytest.fixture(scope="session")
def jupyterlab(lab_root: Path) -> Iterator[JupyterLab]:
    """One JupyterLab server for the session, shut down at the end."""
    with JupyterLab(lab_root) as lab:
        yield lab


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    with chromium() as instance:
        yield instance


@pytest.fixture
def open_notebook(jupyterlab: JupyterLab, browser: Any, request: pytest.FixtureRequest
                  ) -> Iterator[Callable[[Sequence[str]], NotebookPage]]:
    """``open_notebook(cells)`` writes a notebook named after the test, opens it in a new page and
    returns its `NotebookPage`. Pages and kernels are closed after the test; a failing test
    leaves a screenshot ``test-artifacts/FAILED-<test>.png``."""
    opened: list[NotebookPage] = []

    def _open(cells: Sequence[str], *, viewport: dict | None = None) -> NotebookPage:
        name = f"{re.sub(r'[^A-Za-z0-9_]+', '_', request.node.name)}-{len(opened)}.ipynb"
        write_notebook(jupyterlab.root / name, cells)
        page = browser.new_page(viewport=viewport or {"width": 1400, "height": 1000})
        page.set_default_timeout(UI_TIMEOUT * 1000)
        notebook = NotebookPage(jupyterlab, page, name)
        opened.append(notebook)
        return notebook.open()

    yield _open
    failed = getattr(request.node, "report_call", None) is not None and request.node.report_call.failed
    for notebook in opened:
        if failed:
            notebook.screenshot(f"FAILED-{request.node.name}")
        notebook.close()
