"""AblationSliders in a real JupyterLab and Chromium: notebooks are run through the UI, sliders are
moved with the keyboard, and the numbers drawn are compared with `run_with_edits` run in a later
cell. Select with ``pytest -m browser``; screenshots go to test-artifacts/."""

import json
import re

import pytest
import torch

from tcwidgets.transcoder import Transcoder, TranscoderConfig

pytest_plugins = ["browser.harness"]
pytestmark = pytest.mark.browser

PROMPT = "The capital of France is"
HOSTILE = 'x <img src=x onerror="window.__pwned=1"> y'
SETUP = """import json, torch
import tcwidgets as tcw
from tcwidgets.interventions import Edit, run_with_edits
from tcwidgets.transcoder import Transcoder
from tcwidgets.widgets.sliders import AblationSliders
lm = tcw.load_model()
tcs = {{3: Transcoder.load("tc3"), 6: Transcoder.load("tc6")}}
w = AblationSliders(lm, tcs, prompt={prompt!r}, pinned=[" Paris", " London"])
w"""
# the next-token probabilities after the prompt, as the widget formats them
PROBABILITIES = """r = run_with_edits(lm, tcs, {prompt!r}, {edits}, positions=[{position}])
p = torch.softmax(r.logits[0, -1].double(), -1)
print("P", json.dumps({{i: 100 * float(p[i]) for i in {ids}}}))"""
SETTLED = """() => { const r = document.querySelector('.tcw-sliders');
  return r && r.getAttribute('aria-busy') === 'false' && r.querySelectorAll('.tcw-bar-row').length > 0; }"""


@pytest.fixture(scope="module")
def transcoders(lm, lab_root):
    """Two small random-init transcoders (layers 3 and 6), saved where the notebooks run."""
    for layer in (3, 6):
        torch.manual_seed(layer)
        tc = Transcoder(TranscoderConfig(d_in=lm.d_model, d_out=lm.d_model, n_latents=256, k=16,
                                         site={"model": lm.name, "layer": layer}))
        with torch.no_grad():
            tc.b_enc.normal_(0, 0.5)
        tc.save(lab_root / f"tc{layer}")


def widget(notebook):
    root = notebook.page.locator(".tcw-sliders")
    root.wait_for()
    notebook.page.wait_for_function(SETTLED)
    return root


def settle(notebook):
    notebook.page.wait_for_function(SETTLED)


def bars(root):
    """``{token id: (before %, after %)}`` as drawn."""
    rows = root.locator(".tcw-bar-row").evaluate_all("""rows => rows.map(r => [r.dataset.id,
        r.querySelector('.tcw-p-before').textContent, r.querySelector('.tcw-p-after').textContent])""")
    return {int(i): (float(before.rstrip("%")), float(after.rstrip("%"))) for i, before, after in rows}


def run(notebook, code):
    """Run ``code`` in a new cell; the keyboard focus leaves the widget first (keys typed into the
    widget's inputs stay there)."""
    notebook.page.evaluate("() => document.activeElement && document.activeElement.blur()")
    return notebook.run(code)


def api(notebook, edits, ids, prompt=PROMPT, position=-1):
    """Percent probabilities of ``ids`` computed by `run_with_edits` in a new cell."""
    out = run(notebook, PROBABILITIES.format(prompt=prompt, edits=edits, ids=sorted(ids), position=position))
    return {int(i): p for i, p in json.loads(out.split("P ", 1)[1]).items()}


def matches(drawn, computed, which):
    """Each drawn percentage (2 decimals) is the computed one, rounded."""
    for token, shown in drawn.items():
        assert abs(shown[which] - computed[token]) <= 0.0051, (token, shown, computed[token])


def test_moving_a_slider_updates_the_bars_as_the_api_computes(open_notebook, transcoders):
    notebook = open_notebook([SETUP.format(prompt=PROMPT)])
    notebook.run_all()
    root = widget(notebook)
    notebook.screenshot("sliders-light", root)
    before = bars(root)
    assert len(before) == 10 and all(b == a for b, a in before.values())  # no edit yet
    matches(before, api(notebook, "[]", before), 0)

    row = root.locator(".tcw-row").first
    layer, latent = int(row.get_attribute("data-layer")), int(row.get_attribute("data-latent"))
    slider = row.locator(".tcw-slider")
    slider.focus()  # focusing a slider selects its latent (for a linked FeatureDashboard)
    for _ in range(20):  # 1.00 -> 0.00 in steps of 0.05: zero-ablate it at the last token
        notebook.page.keyboard.press("ArrowLeft")
    assert row.locator(".tcw-value").text_content() == "0"
    settle(notebook)
    after = bars(root)
    matches(after, api(notebook, f"[Edit({layer}, {latent}, scale=0.0)]", after), 1)
    matches(after, api(notebook, "[]", after), 0)
    assert any(b != a for b, a in after.values()), "zeroing the most active latent must move some bar"
    out = run(notebook, "print('STATE', w.selected, w.edits, w.edit_positions, w.position)")
    n_tokens = root.locator(".tcw-tok").count()
    assert f"STATE ({layer}, {latent}) [Edit(layer={layer}, latent={latent}, scale=0.0)] [{n_tokens - 1}] " \
           f"{n_tokens - 1}" in out

    row.locator(".tcw-kind").select_option("steer")  # steer by the slider's maximum
    slider.focus()
    notebook.page.keyboard.press("End")
    settle(notebook)
    value = float(row.locator(".tcw-value").text_content())
    assert value > 0
    steered = bars(root)
    matches(steered, api(notebook, f"[Edit({layer}, {latent}, steer={value})]", steered), 1)
    pins = root.locator(".tcw-pin").evaluate_all("""pins => pins.map(p => [p.querySelector('.tcw-pin-token').textContent,
        p.querySelector('.tcw-pin-before').textContent, p.querySelector('.tcw-pin-after').textContent])""")
    assert [p[0] for p in pins] == [" Paris", " London"]
    out = run(notebook, f"""lp = lambda r: torch.log_softmax(r.logits[0, -1].double(), -1)
a = lp(run_with_edits(lm, tcs, {PROMPT!r}, [Edit({layer}, {latent}, steer={value})], positions=[-1]))
b = lp(run_with_edits(lm, tcs, {PROMPT!r}))
ids = [lm.tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in (" Paris", " London")]
print("PINS", json.dumps([[f"{{b[i]:.3f}}", f"{{a[i]:.3f}}"] for i in ids]))""")
    assert json.loads(out.split("PINS ", 1)[1]) == [p[1:] for p in pins]
    notebook.screenshot("sliders-steered", root)

    root.locator(".tcw-reset").first.click()
    settle(notebook)
    assert all(b == a for b, a in bars(root).values())


def test_errors_are_shown_in_the_widget_which_keeps_working(open_notebook, transcoders):
    notebook = open_notebook([SETUP.format(prompt=PROMPT)])
    notebook.run_all()
    root = widget(notebook)
    banner = root.locator(".tcw-error")
    prompt = root.locator(".tcw-prompt")

    prompt.fill("")
    prompt.press("Enter")
    banner.filter(has_text="The prompt is empty").wait_for()
    assert root.locator(".tcw-tok").count() == 0
    notebook.screenshot("sliders-error", root)

    prompt.fill(HOSTILE)  # fixed, with HTML in it: tokens are drawn as text
    prompt.press("Enter")
    banner.wait_for(state="hidden")
    settle(notebook)
    texts = root.locator(".tcw-tok").evaluate_all("spans => spans.map(s => s.textContent)")
    assert "".join(texts[1:]) == HOSTILE
    assert root.locator("img").count() == 0 and notebook.page.evaluate("window.__pwned") is None

    root.locator(".tcw-add-layer").select_option("6")
    root.locator(".tcw-add-latent").fill("4096")
    root.locator(".tcw-add-button").click()
    banner.filter(has_text="Latent 4096 is out of range: the layer-6 transcoder has 256 latents").wait_for()
    root.locator(".tcw-add-latent").fill("17")
    root.locator(".tcw-add-latent").press("Enter")
    added = root.locator(".tcw-row[data-layer='6'][data-latent='17']")
    added.wait_for()
    assert banner.is_hidden()

    run(notebook, "w.position = 999")  # bad input from Python: a clear error, in the widget too
    banner.filter(has_text="Position 999 is outside the prompt's").wait_for()

    tokens = root.locator(".tcw-tok")
    last = tokens.count() - 1
    tokens.nth(last).focus()  # the keyboard moves the position
    notebook.page.keyboard.press("Home")
    root.locator(".tcw-tok[data-position='0'][aria-pressed='true']").wait_for()
    notebook.page.keyboard.press("ArrowRight")
    root.locator(".tcw-tok[data-position='1'][aria-pressed='true']").wait_for()
    assert banner.is_hidden()
    added.locator(".tcw-kind").select_option("steer")
    added.locator(".tcw-slider").focus()
    notebook.page.keyboard.press("End")
    settle(notebook)
    value = float(added.locator(".tcw-value").text_content())
    after = bars(root)
    matches(after, api(notebook, f"[Edit(6, 17, steer={value})]", after, prompt=HOSTILE, position=1), 1)
    assert "SELECTED (6, 17)" in run(notebook, "print('SELECTED', w.selected)")


def luminance(css_color):
    red, green, blue = (int(v) for v in re.findall(r"\d+", css_color)[:3])
    return (0.2126 * red + 0.7152 * green + 0.0722 * blue) / 255


def test_follows_the_jupyterlab_theme(open_notebook, transcoders):
    notebook = open_notebook([SETUP.format(prompt=PROMPT)])
    notebook.run_all()
    root = widget(notebook)
    style = "el => { const s = getComputedStyle(el); return [s.color, s.backgroundColor]; }"
    color, background = root.evaluate(style)
    assert luminance(background) > 0.8 and luminance(color) < 0.4
    notebook.menu("Settings", "Theme", "JupyterLab Dark")
    notebook.page.locator("body[data-jp-theme-light='false']").wait_for(state="attached")
    notebook.page.wait_for_function(
        "el => getComputedStyle(el).backgroundColor !== " + json.dumps(background), arg=root.element_handle())
    color, background = root.evaluate(style)
    assert luminance(background) < 0.3 and luminance(color) > 0.6
    notebook.screenshot("sliders-dark", root)
    notebook.menu("Settings", "Theme", "JupyterLab Light")  # the setting persists for the session's server
    notebook.page.locator("body[data-jp-theme-light='true']").wait_for(state="attached")
