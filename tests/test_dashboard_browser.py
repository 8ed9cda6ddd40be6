"""FeatureDashboard in a real JupyterLab and Chromium: notebooks are run through the UI and the test
asserts on the rendered widget. Select with ``pytest -m browser``; screenshots go to test-artifacts/."""

import json
import re

import pytest
import torch

import tcwidgets as tcw
from tcwidgets.features import analyze_features
from tcwidgets.transcoder import Transcoder, TranscoderConfig

pytest_plugins = ["browser.harness"]
pytestmark = pytest.mark.browser

HOSTILE = '<img src=x onerror="window.__pwned=1">'
SETUP = """from tcwidgets.features import FeatureStats
from tcwidgets.widgets import FeatureDashboard
dash = FeatureDashboard(FeatureStats.load("stats"), feature={feature})
dash"""


SCORED = """import json
from tcwidgets.features import FeatureStats
from tcwidgets.interpretability import InterpretabilityScores, LatentScore
from tcwidgets.widgets import FeatureDashboard
saved = json.load(open("scores.json"))
scores = InterpretabilityScores({{row["latent"]: LatentScore(**row) for row in saved["latents"]}},
                                model=saved["model"], transcoder=saved["transcoder"], explainer=saved["explainer"])
dash = FeatureDashboard(FeatureStats.load("stats"), feature={feature}, scores=scores)
dash"""


@pytest.fixture(scope="module")
def transcoder(lm):
    torch.manual_seed(0)
    return Transcoder(TranscoderConfig(d_in=lm.d_model, d_out=lm.d_model, n_latents=128, k=8, input_scale=8.0,
                                       site={"model": lm.name, "layer": 6}))


@pytest.fixture(scope="module")
def stats(lm, lab_root, transcoder):
    """Stats of a small random-init transcoder over a few contexts, saved where the notebooks run,
    with one token's text replaced by HTML (as a hostile corpus or tokenizer could)."""
    tokens = tcw.load_corpus("python-docs", lm, context=48, n_tokens=4 * 48, split="test")
    stats = analyze_features(lm, transcoder, tokens, top_k=6, window=(8, 3), progress=False)
    top = stats.latent(hostile_latent(stats)).top[0]
    stats.vocab[int(top.tokens[top.center])] = HOSTILE
    stats.save(lab_root / "stats")
    return stats


def hostile_latent(stats):
    """The latent whose best example's token is made hostile: the densest."""
    return int(stats.order("density")[0])


def shown(token):
    """A token as the page shows it (invisible characters made visible, as dashboard.js does)."""
    return token.replace("\n", "↵").replace("\t", "⇥").replace("\r", "␍") or "∅"


def active_cell(notebook):
    return notebook.panel.locator(".jp-Notebook .jp-Cell").evaluate_all(
        "cells => cells.findIndex(c => c.classList.contains('jp-mod-active'))")


def dashboard(notebook, feature):
    """Wait until the dashboard shows latent ``feature``; returns the widget's locator."""
    notebook.page.locator(f".tcw-dashboard[data-latent='{feature}']").wait_for()
    return notebook.page.locator(".tcw-dashboard")


def test_examples_render_shaded(open_notebook, stats):
    feature = int(stats.order("density")[1])
    latent = stats.latent(feature)
    notebook = open_notebook([SETUP.format(feature=feature)])
    notebook.run_all()
    widget = dashboard(notebook, feature)

    examples = widget.locator(".tcw-top .tcw-example")
    assert examples.count() == len(latent.top) > 0
    first = latent.top[0]
    tokens = examples.first.locator(".tcw-tok")
    assert tokens.count() == len(first.tokens)
    center = examples.first.locator(".tcw-center")
    assert center.count() == 1 and center.text_content() == shown(stats.vocab[int(first.tokens[first.center])])
    assert f"{first.value:.3g}" in center.get_attribute("title")
    assert widget.locator(".tcw-top .tcw-center").count() == len(latent.top)  # one marked token per example
    shades = widget.locator(".tcw-top .tcw-tok.tcw-on").evaluate_all(
        "spans => spans.map(s => parseFloat(s.style.getPropertyValue('--a')))")
    assert shades and all(0 < a <= 1 for a in shades) and max(shades) == 1.0
    assert widget.locator(".tcw-hist rect").count() == int(latent.histogram_counts.nonzero()[0][-1]) + 1
    assert widget.locator(".tcw-promoted tr").count() == len(latent.promoted)
    assert widget.locator(".tcw-quantiles .tcw-example").count() == sum(len(g.examples) for g in latent.quantiles)
    assert widget.locator(".tcw-list li").count() == min(50, stats.n_latents)
    notebook.screenshot("dashboard-light", widget)


def test_interpretability_scores_show_beside_the_latent(open_notebook, stats, lm, transcoder, lab_root):
    held_out = tcw.load_corpus("python-docs", lm, context=48, n_tokens=8 * 48, split="test")
    scores = tcw.interpretability_scores(stats, lm=lm, tokens=held_out, transcoder=transcoder,
                                         latents=stats.order("density")[:4], progress=False)
    (lab_root / "scores.json").write_text(json.dumps(scores.to_dict()))
    scored, unscored = int(stats.order("density")[1]), int(stats.order("density")[5])
    notebook = open_notebook([SCORED.format(feature=scored)])
    notebook.run_all()
    widget = dashboard(notebook, scored)
    section = widget.locator(".tcw-score")
    assert section.count() == 1 and section.is_visible()
    score = scores[scored]
    assert section.locator(".tcw-score-value").text_content() == f"{score.score:.3g}".rstrip("0").rstrip(".")
    assert section.locator(".tcw-explanation").text_content() == score.explanation
    assert f"of {score.n_activating} firing" in section.text_content()
    # at the top of the latent's view, above its activations
    summary, box = widget.locator(".tcw-summary").bounding_box(), section.bounding_box()
    assert box["y"] + box["height"] <= summary["y"] and box["width"] > summary["width"]
    notebook.screenshot("dashboard-scores", widget)
    widget.locator(".tcw-number").fill(str(unscored))
    widget.locator(".tcw-number").press("Enter")
    dashboard(notebook, unscored)
    assert widget.locator(".tcw-score").count() == 0, "an unscored latent shows no score"


def test_next_and_keys_change_python_feature(open_notebook, stats):
    notebook = open_notebook([SETUP.format(feature=3)])
    notebook.run_all()
    widget = dashboard(notebook, 3)
    widget.locator(".tcw-next").click()
    dashboard(notebook, 4)
    assert "FEATURE 4" in notebook.run("print('FEATURE', dash.feature)")

    widget.locator(".tcw-summary").click()  # focus the widget, then navigate with the keyboard
    active = active_cell(notebook)
    for key, expected in (("j", 5), ("j", 6), ("k", 5), ("ArrowRight", 6), ("ArrowLeft", 5)):
        notebook.page.keyboard.press(key)
        dashboard(notebook, expected)
    assert active_cell(notebook) == active, "j/k must not also move JupyterLab's cell selection"
    widget.locator(".tcw-prev").click()
    dashboard(notebook, 4)
    assert "FEATURE 4" in notebook.run("print('FEATURE', dash.feature)")


def test_python_drives_the_page(open_notebook, stats):
    notebook = open_notebook([SETUP.format(feature=0)])
    notebook.run_all()
    widget = dashboard(notebook, 0)
    notebook.run("dash.feature = 17")
    dashboard(notebook, 17)
    assert widget.locator(".tcw-number").input_value() == "17"
    assert widget.locator(".tcw-list li.tcw-current").count() <= 1

    widget.locator(".tcw-sort").select_option("max")  # the sortable list, sorted in Python
    best = int(stats.order("max")[0])
    widget.locator(f".tcw-list li[data-latent='{best}']").wait_for()
    assert widget.locator(".tcw-list li").first.get_attribute("data-latent") == str(best)
    widget.locator(".tcw-list li").first.locator("button").click()
    dashboard(notebook, best)
    assert f"FEATURE {best}" in notebook.run("print('FEATURE', dash.feature)")


def test_search_finds_latents_by_token(open_notebook, stats):
    notebook = open_notebook([SETUP.format(feature=0)])
    notebook.run_all()
    widget = dashboard(notebook, 0)
    expected = [latent for latent, _ in stats.search("onerror")]
    assert hostile_latent(stats) in expected
    widget.locator(".tcw-search").fill("onerror")
    widget.locator(".tcw-list-title", has_text="onerror").wait_for()
    rows = widget.locator(".tcw-list li")
    assert [int(row) for row in rows.evaluate_all("items => items.map(i => i.dataset.latent)")] == expected[:50]
    rows.first.locator("button").click()
    dashboard(notebook, expected[0])


def test_hostile_token_renders_as_text(open_notebook, stats):
    feature = hostile_latent(stats)
    notebook = open_notebook([SETUP.format(feature=feature)])
    notebook.run_all()
    widget = dashboard(notebook, feature)
    texts = widget.locator(".tcw-tok").evaluate_all("spans => spans.map(s => s.textContent)")
    assert HOSTILE in texts
    assert widget.locator("img").count() == 0
    notebook.page.wait_for_timeout(500)  # an onerror handler would have run by now
    assert notebook.page.evaluate("window.__pwned") is None
    notebook.screenshot("dashboard-hostile-token", widget)


def test_errors_are_shown_in_the_widget(open_notebook, stats):
    notebook = open_notebook([SETUP.format(feature=2)])
    notebook.run_all()
    widget = dashboard(notebook, 2)
    banner = widget.locator(".tcw-error")
    assert banner.is_hidden()
    output = notebook.run(f"dash.feature = {stats.n_latents}")
    assert "TraitError" in output and "out of range" in output
    banner.wait_for(state="visible")
    assert "out of range" in banner.text_content() and f"0 to {stats.n_latents - 1}" in banner.text_content()

    number = widget.locator(".tcw-number")  # a number typed in the page is checked in Python too
    number.fill("99999")
    number.press("Enter")
    widget.locator(".tcw-error", has_text="Latent 99999 is out of range").wait_for()
    assert "FEATURE 2" in notebook.run("print('FEATURE', dash.feature)")
    number.fill("9")
    number.press("Enter")
    dashboard(notebook, 9)
    banner.wait_for(state="hidden")
    notebook.screenshot("dashboard-error", widget)


def luminance(css_color: str) -> float:
    red, green, blue = (int(v) for v in re.findall(r"\d+", css_color)[:3])
    return (0.2126 * red + 0.7152 * green + 0.0722 * blue) / 255


def test_follows_the_jupyterlab_theme(open_notebook, stats):
    notebook = open_notebook([SETUP.format(feature=1)])
    notebook.run_all()
    widget = dashboard(notebook, 1)
    style = "el => { const s = getComputedStyle(el); return [s.color, s.backgroundColor]; }"
    color, background = widget.evaluate(style)
    assert luminance(background) > 0.8 and luminance(color) < 0.4
    notebook.menu("Settings", "Theme", "JupyterLab Dark")
    notebook.page.locator("body[data-jp-theme-light='false']").wait_for(state="attached")
    notebook.page.wait_for_function(
        "el => getComputedStyle(el).backgroundColor !== " + json.dumps(background), arg=widget.element_handle())
    color, background = widget.evaluate(style)
    assert luminance(background) < 0.3 and luminance(color) > 0.6
    notebook.screenshot("dashboard-dark", widget)
    notebook.menu("Settings", "Theme", "JupyterLab Light")  # the setting persists for the session's server
    notebook.page.locator("body[data-jp-theme-light='true']").wait_for(state="attached")
