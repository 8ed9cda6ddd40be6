"""The quickstart notebook as a learner runs it: copied by ``tcwidgets tutorials``, opened in a real
JupyterLab, "Run All Cells" from the menu (fast setting, exercises left unanswered), and the
rendered FeatureDashboard found in the page."""

import subprocess
import sys

import pytest

from browser.harness import JupyterLab, NotebookPage
from tcwidgets.models import cache_dir

pytest_plugins = ["browser.harness"]
pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_quickstart_runs_through_the_ui_and_shows_its_dashboard(tmp_path, lm, browser):
    """(The session's one Chromium, shared with the other browser tests.)"""
    work = tmp_path / "tutorials"
    done = subprocess.run([sys.executable, "-m", "tcwidgets.cli", "tutorials", str(work), "--copy-only"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    cache = tmp_path / "cache"  # nothing cached: the notebook trains what it shows
    cache.mkdir()
    (cache / "models").symlink_to(cache_dir() / "models", target_is_directory=True)
    env = {"TCWIDGETS_TUTORIAL_FAST": "1", "TCWIDGETS_CACHE": str(cache), "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
    with JupyterLab(work, env=env) as lab:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        notebook = NotebookPage(lab, page, "01-quickstart.ipynb").open()
        try:
            notebook.run_all(timeout=900)
            panel = notebook.panel
            errors = panel.locator('.jp-OutputArea-output[data-mime-type*="error"]')
            assert errors.count() == 0, errors.first.inner_text()
            prompts = notebook.prompts()
            assert all(prompt.startswith("[") and "*" not in prompt and prompt != "[ ]:" for prompt in prompts), prompts
            dashboard = panel.locator(".tcw-dashboard")
            dashboard.first.wait_for(timeout=30_000)
            assert dashboard.first.locator(".tcw-example").count() > 0  # top examples rendered as text
            assert panel.locator(".jp-OutputArea-output img").count() > 0  # the training curve plot
            assert "not attempted yet" in panel.inner_text()  # unanswered exercises are reported, not fatal
            notebook.screenshot("tutorial-quickstart")
        finally:
            notebook.close()
