"""The learner's page: a FeatureDashboard, an AblationSliders and a CircuitView in ONE notebook at a
1400-pixel viewport, laid out as designed (each widget's CSS stays inside its root class), the
circuit's hover summary whole and inside the viewport, in the light and dark themes; the dashboard in
the classic Notebook 7 interface (``/tree``) and in marimo.
Layout is asserted from bounding boxes; screenshots go to test-artifacts/ (look at them)."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import transformers

import tcwidgets as tcw
from tcwidgets.features import analyze_features
from tcwidgets.transcoder import Transcoder, TranscoderConfig

pytest_plugins = ["browser.harness"]
pytestmark = pytest.mark.browser

WHITESPACE_TOKEN = "\n" + " " * 46  # a newline and 46 spaces: shown compactly, never blank or wide
PROMPT = "The capital of France is"
SETUP = f"""import tcwidgets as tcw
from tcwidgets.circuits import LogitTarget, attribute
from tcwidgets.features import FeatureStats
from tcwidgets.transcoder import Transcoder
from tcwidgets.widgets import AblationSliders, CircuitView, FeatureDashboard
lm = tcw.load_model()
tcs = {{6: Transcoder.load("page-tc6")}}
stats = FeatureStats.load("page-stats")
dash = FeatureDashboard(stats, feature=FIRST)
dash"""
SLIDERS = f"""from tcwidgets.interventions import Edit
w = AblationSliders(lm, tcs, {PROMPT!r}, features=[Edit(6, 3, steer=-400.0)], pinned=[" Paris"])
w"""
CIRCUIT = """tiny = tcw.load_model("page-tiny")
tiny_tcs = {layer: Transcoder.load(f"page-tiny-tc-{layer}") for layer in range(3)}
graph = attribute(tiny, tiny_tcs, "The year 1732 to 17", LogitTarget("3", minus="1"), depth=2, top_k=6, threshold=0)
view = CircuitView(graph)
view"""

# bounding boxes of what the assertions are about, in page coordinates
BOXES = """() => {
  const box = (el) => { const r = el.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
  const dash = document.querySelector('.tcw-dashboard');
  const sliders = document.querySelector('.tcw-sliders');
  return {
    side: box(dash.querySelector('.tcw-side')), main: box(dash.querySelector('.tcw-main')),
    mainScrolls: getComputedStyle(dash.querySelector('.tcw-main')).overflowY,
    cells: [...dash.querySelectorAll('.tcw-tok-cell')].map((c) => [c.textContent, ...box(c)]),
    logits: box(dash.querySelector('.tcw-logits')),
    embedding: dash.querySelector('.tcw-embedding') && box(dash.querySelector('.tcw-embedding')),
    columns: [...dash.querySelectorAll('.tcw-columns span')].map((s) => s.textContent),
    slidersBox: box(sliders),
    labels: [...sliders.querySelectorAll('.tcw-bar-row .tcw-p')].map((p) => [p.textContent, ...box(p)]),
    tracks: [...sliders.querySelectorAll('.tcw-bar-row .tcw-track')].map(box),
  };
}"""


def overlap(a, b):
    return a[0] < b[2] - 0.5 and b[0] < a[2] - 0.5 and a[1] < b[3] - 0.5 and b[1] < a[3] - 0.5


@pytest.fixture(scope="module")
def page_files(lm, lab_root):
    """A small layer-6 transcoder and its stats (two promoted tokens made whitespace), and a tiny
    random GPT-2 with transcoders for the CircuitView, saved where the notebooks run."""
    torch.manual_seed(0)
    tc = Transcoder(TranscoderConfig(d_in=lm.d_model, d_out=lm.d_model, n_latents=128, k=8, input_scale=8.0,
                                     site={"model": lm.name, "layer": 6}))
    with torch.no_grad():
        tc.b_enc.normal_(0, 0.5)
    tc = tc.eval().requires_grad_(False)
    tc.save(lab_root / "page-tc6")
    tokens = tcw.load_corpus("python-docs", lm, context=48, n_tokens=4 * 48, split="test")
    stats = analyze_features(lm, tc, tokens, top_k=6, window=(8, 3), progress=False)
    first, second = (int(i) for i in stats.order("density")[:2])
    for latent in (first, second):
        promoted = stats.latent(latent).promoted
        stats.vocab[promoted[0][0]] = WHITESPACE_TOKEN
        stats.vocab[promoted[1][0]] = " "
    stats.save(lab_root / "page-stats")

    torch.manual_seed(1)
    module = transformers.AutoModelForCausalLM.from_config(transformers.GPT2Config(
        vocab_size=49152, n_embd=64, n_layer=3, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0))
    module.save_pretrained(lab_root / "page-tiny")
    lm.tokenizer.save_pretrained(lab_root / "page-tiny")
    for layer in range(3):
        Transcoder(TranscoderConfig(d_in=64, d_out=64, n_latents=128, k=8, site={"model": "page-tiny", "layer": layer})
                   ).save(lab_root / f"page-tiny-tc-{layer}")
    return {"first": first, "second": second}


def check_layout(notebook, theme):
    page = notebook.page
    page.locator(".tcw-sliders[aria-busy='false'] .tcw-bar-row").first.wait_for()
    page.locator(".tcw-circuit[data-ready='1']").wait_for()
    boxes = page.evaluate(BOXES)

    # the dashboard's detail pane is to the right of its list, not wrapped below it
    side, main = boxes["side"], boxes["main"]
    assert main[0] >= side[2] - 1 and main[1] < side[3], f"detail pane not beside the list: {side} {main}"
    assert main[2] - main[0] > 500, f"detail pane too narrow: {main}"
    assert boxes["mainScrolls"] not in ("auto", "scroll"), "the detail pane is an inner scroll box"
    assert boxes["columns"] == ["latent", "density", "max"]
    # whitespace tokens are visible and compact: no blank cell, no cell wider than its table's column
    texts = [cell[0] for cell in boxes["cells"]]
    assert all(text.strip() for text in texts), f"a blank token cell: {texts}"
    assert "↵·×46" in texts and "·" in texts
    assert all(cell[3] - cell[1] < 200 for cell in boxes["cells"])

    # the slider bars' labels: all visible inside the widget, none overlapping another or a bar
    labels, tracks, outer = boxes["labels"], boxes["tracks"], boxes["slidersBox"]
    assert len(labels) == 2 * len(page.locator(".tcw-sliders .tcw-bar-row").all()) > 0
    for text, *label in labels:
        assert text.endswith("%") and label[2] <= outer[2] + 0.5 and label[2] - label[0] > 10, (text, label, outer)
    for i, (_, *a) in enumerate(labels):
        for _, *b in labels[i + 1:]:
            assert not overlap(a, b), f"overlapping bar labels: {a} {b}"
        for track in tracks:
            assert not overlap(a, track), f"a bar label under a bar: {a} {track}"

    # the circuit's nodes sit in their tokens' columns: one column per position, left to right in token order
    nodes = page.locator(".tcw-circuit circle.tcw-cv-node").evaluate_all(
        "cs => cs.filter(c => c.style.display !== 'none').map(c => { const b = c.getBoundingClientRect();"
        " return [Number(c.dataset.position), Math.round(b.left + b.width / 2)]; })")
    columns = {}
    for position, x in nodes:
        columns.setdefault(position, []).append(x)
    assert len(columns) > 1, f"every node sits at one position: {columns}"
    spans = [(min(columns[p]), max(columns[p])) for p in sorted(columns)]  # each position's nodes, left to right
    assert all(a[1] < b[0] for a, b in zip(spans, spans[1:])), f"token columns overlap or are out of order: {spans}"

    # the circuit's hover summary of its rightmost latent: inside the viewport, nothing in it cut off
    from browser.harness import clipped  # (imported here: pytest loads the harness as a plugin first)

    latents = page.locator(".tcw-circuit circle.tcw-cv-node[data-id^='latent/']").evaluate_all(
        "cs => cs.filter(c => c.style.display !== 'none').map(c => [c.getBoundingClientRect().left, c.dataset.id])")
    node_id = max(latents)[1]
    page.locator(f".tcw-circuit circle[data-id='{node_id}']").hover()
    tooltip = page.locator(f".tcw-circuit .tcw-cv-tooltip[data-id='{node_id}']")
    tooltip.locator(".tcw-cv-promoted .tcw-cv-chip").first.wait_for()
    page.wait_for_timeout(300)  # placed again with its summary
    tip, size = tooltip.bounding_box(), page.viewport_size
    assert 0 <= tip["x"] and tip["x"] + tip["width"] <= size["width"] + 1, tip
    assert 0 <= tip["y"] and tip["y"] + tip["height"] <= size["height"] + 1, tip
    cut = clipped(tooltip)
    assert not cut["scrolls"] and not cut["outside"], f"the circuit's hover summary is cut off: {cut}"
    notebook.screenshot(f"learner-page-{theme}-circuit-tooltip")
    page.mouse.move(0, 0)

    for name, selector in (("dashboard", ".tcw-dashboard"), ("sliders", ".tcw-sliders"), ("circuit", ".tcw-circuit")):
        notebook.screenshot(f"learner-page-{theme}-{name}", page.locator(selector))
    return boxes


def test_three_widgets_share_one_page(open_notebook, page_files):
    notebook = open_notebook([SETUP.replace("FIRST", str(page_files["first"])), SLIDERS, CIRCUIT])
    notebook.run_all(timeout=300)
    boxes = check_layout(notebook, "light")
    dash = notebook.page.locator(".tcw-dashboard")
    dash.locator(f".tcw-list li[data-latent='{page_files['second']}'] button").click()
    notebook.page.locator(f".tcw-dashboard[data-latent='{page_files['second']}']").wait_for()
    other = notebook.page.evaluate(BOXES)
    assert other["embedding"][:2] == boxes["embedding"][:2], "the embedding section moved between latents"
    assert other["logits"][:3] == boxes["logits"][:3], "the logit tables changed size between latents"

    notebook.menu("Settings", "Theme", "JupyterLab Dark")
    notebook.page.wait_for_function("() => document.body.dataset.jpThemeLight === 'false'")
    check_layout(notebook, "dark")
    background = notebook.page.evaluate(
        "() => getComputedStyle(document.querySelector('.tcw-sliders')).backgroundColor")
    assert background != "rgb(255, 255, 255)"
    notebook.screenshot("learner-page-dark-viewport")
    notebook.menu("Settings", "Theme", "JupyterLab Light")  # the setting persists for the session's server
    notebook.page.wait_for_function("() => document.body.dataset.jpThemeLight === 'true'")


def test_dashboard_renders_in_notebook_7(jupyterlab, browser, page_files):
    """The classic interface: /tree, open the notebook (a new tab), Run All, the dashboard draws."""
    from browser.harness import write_notebook  # (imported here: pytest loads the harness as a plugin first)

    name = "notebook7-dashboard.ipynb"
    write_notebook(jupyterlab.root / name, [SETUP.replace("FIRST", str(page_files["first"]))])
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(jupyterlab.url("tree"))
        with page.context.expect_page() as opened:
            page.get_by_text(name, exact=True).dblclick()
        notebook = opened.value
        notebook.locator(".jp-Notebook").wait_for()
        assert "/notebooks/" in notebook.url and "/lab" not in notebook.url
        jupyterlab.wait_for_kernel(name)
        notebook.locator(".jp-Cell").first.locator(".jp-InputPrompt").click()
        notebook.locator(".lm-MenuBar-itemLabel", has_text=re.compile("^Run$")).click()
        notebook.locator(".lm-Menu:visible .lm-Menu-itemLabel", has_text=re.compile("^Run All Cells$")).click()
        widget = notebook.locator(f".tcw-dashboard[data-latent='{page_files['first']}']")
        widget.wait_for(timeout=180_000)
        side, main = (widget.locator(part).bounding_box() for part in (".tcw-side", ".tcw-main"))
        assert main["x"] >= side["x"] + side["width"] - 1
        notebook.screenshot(path=str(artifacts() / "notebook7-dashboard.png"))
        notebook.close()
    finally:
        page.close()
        jupyterlab.close_session(name)


def artifacts() -> Path:
    from browser.harness import ARTIFACTS

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


MARIMO_APP = """import marimo

app = marimo.App()


@app.cell
def _():
    import marimo as mo
    from tcwidgets.features import FeatureStats
    from tcwidgets.widgets import FeatureDashboard
    dash = mo.ui.anywidget(FeatureDashboard(FeatureStats.load({stats!r}), feature={feature}))
    dash
    return (dash,)


if __name__ == "__main__":
    app.run()
"""


def test_dashboard_renders_in_marimo(browser, lab_root, page_files, tmp_path):
    """anywidget's promise beyond Jupyter: marimo draws the dashboard, and a click reaches Python."""
    if shutil.which("marimo") is None and not (Path(sys.executable).parent / "marimo").exists():
        pytest.fail("marimo is not installed: bash install.sh --dev installs it")
    app = tmp_path / "dashboard_app.py"
    app.write_text(MARIMO_APP.format(stats=str(lab_root / "page-stats"), feature=page_files["first"]))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "marimo", "run", str(app), "--headless", "--host", "127.0.0.1", "--port", str(port),
         "--no-token"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, "MARIMO_SKIP_UPDATE_CHECK": "1", "HF_HUB_OFFLINE": "1"})
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, f"marimo exited: {server.stdout.read()}"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "marimo did not answer"
                time.sleep(0.3)
        page.goto(f"http://127.0.0.1:{port}/")
        widget = page.locator(f".tcw-dashboard[data-latent='{page_files['first']}']")
        widget.wait_for(timeout=120_000)
        assert widget.locator(".tcw-top .tcw-example").count() > 0
        widget.locator(".tcw-next").click()  # page -> Python -> page
        widget = page.locator(f".tcw-dashboard[data-latent='{page_files['first'] + 1}']")
        widget.wait_for(timeout=60_000)
        side, main = (widget.locator(part).bounding_box() for part in (".tcw-side", ".tcw-main"))
        assert main["x"] >= side["x"] + side["width"] - 1
        page.screenshot(path=str(artifacts() / "marimo-dashboard.png"))
    finally:
        page.close()
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)

