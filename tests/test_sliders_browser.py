"""AblationSliders in a real JupyterLab and Chromium: notebooks are run through the UI, sliders are
moved with the keyboard, and the numbers drawn are compared with `run_with_edits` run in a later
cell (``pytest -m browser``; screenshots go to test-artifacts/). Then its Python side driven by the
page's messages without a browser: newest state wins, cancel, bad input, remote, linking."""

import json
import re
import time

import pytest
import torch
import traitlets

import tcwidgets.widgets.sliders as sliders_module
from tcwidgets.features import analyze_features
from tcwidgets.interventions import Edit, run_with_edits
from tcwidgets.transcoder import Transcoder, TranscoderConfig
from tcwidgets.widgets.dashboard import FeatureDashboard
from tcwidgets.widgets.sliders import AblationSliders

pytest_plugins = ["browser.harness"]

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


def make_tc(lm, layer, n_latents=256):
    torch.manual_seed(layer)
    tc = Transcoder(TranscoderConfig(d_in=lm.d_model, d_out=lm.d_model, n_latents=n_latents, k=16,
                                     site={"model": lm.name, "layer": layer}))
    with torch.no_grad():
        tc.b_enc.normal_(0, 0.5)
    return tc.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def tcs(lm):
    return {3: make_tc(lm, 3), 6: make_tc(lm, 6)}


@pytest.fixture(scope="module")
def transcoders(tcs, lab_root):
    """The two small random-init transcoders (layers 3 and 6), saved where the notebooks run."""
    for layer, tc in tcs.items():
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
    """Each drawn percentage (2 decimals) is the computed one, rounded. The widget reruns the last token
    from the prompt's kept key/value cache, the API call here every position: float32 sums in another order
    move a percentage by up to about 0.01 (0.0067 seen), beyond the rounding's 0.005."""
    for token, shown in drawn.items():
        assert abs(shown[which] - computed[token]) <= 0.02, (token, shown, computed[token])


@pytest.mark.browser
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
    pins = root.locator(".tcw-pin").evaluate_all("""pins => pins.map(p => [
        p.querySelector('.tcw-pin-token').textContent, p.querySelector('.tcw-pin-before').textContent,
        p.querySelector('.tcw-pin-after').textContent])""")
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


@pytest.mark.browser
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
    settle(notebook)
    unsteered = bars(root)
    added.locator(".tcw-slider").focus()
    notebook.page.keyboard.press("End")
    deadline = time.monotonic() + 60  # the request leaves after a debounce: wait for its bars, then settle
    while bars(root) == unsteered and time.monotonic() < deadline:
        time.sleep(0.05)
    settle(notebook)
    value = float(added.locator(".tcw-value").text_content())
    after = bars(root)
    matches(after, api(notebook, f"[Edit(6, 17, steer={value})]", after, prompt=HOSTILE, position=1), 1)
    assert "SELECTED (6, 17)" in run(notebook, "print('SELECTED', w.selected)")


def luminance(css_color):
    red, green, blue = (int(v) for v in re.findall(r"\d+", css_color)[:3])
    return (0.2126 * red + 0.7152 * green + 0.0722 * blue) / 255


@pytest.mark.browser
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


# -- the Python side, driven by the page's messages (no browser) ----------------------------------------------

def send(widget, **content):
    widget._on_message(None, content, [])


def settled(widget, timeout=300):
    deadline = time.monotonic() + timeout
    time.sleep(0.05)
    while widget._status:
        assert time.monotonic() < deadline, "the widget did not settle"
        time.sleep(0.05)


def next_token_probs(result, ids):
    p = torch.softmax(result.logits[0, -1].double(), -1)
    return {i: float(p[i]) for i in ids}


@pytest.fixture
def runs(monkeypatch):
    """Count the widget's model runs (edited ones: with edits)."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(bool(args[3] if len(args) > 3 else kwargs.get("edits")))
        return run_with_edits(*args, **kwargs)
    monkeypatch.setattr(sliders_module, "run_with_edits", counted)
    return calls


def test_newest_state_wins_and_matches_the_api(lm, tcs, runs):
    w = AblationSliders(lm, tcs, PROMPT, pinned=[" Paris"])
    try:
        row = w._rows[0]
        runs.clear()
        for n, value in enumerate([0.9, 0.5, 2.0, -1.0, 3.5, 0.0]):  # a burst of slider moves
            send(w, type="set", request=f"v:{n}", values={"sliders": [
                {"layer": row["layer"], "latent": row["latent"], "kind": "scale", "value": value}]})
        settled(w)
        assert w._result["request"] == "v:5" and w.edits == [Edit(row["layer"], row["latent"], scale=0.0)]
        assert runs.count(True) < 6, "superseded requests must not each run the model"
        top = {t["id"]: t for t in w._result["top"]}
        expected = next_token_probs(run_with_edits(lm, tcs, PROMPT, w.edits, positions=w.edit_positions), top)
        assert all(abs(top[i]["after"] - p) < 1e-6 for i, p in expected.items())
        clean = next_token_probs(run_with_edits(lm, tcs, PROMPT), top)
        assert all(abs(top[i]["before"] - p) < 1e-6 for i, p in clean.items())

        send(w, type="set", request="v:6", values={"scope": "all"})
        settled(w)
        assert w.edit_positions is None
        expected = next_token_probs(run_with_edits(lm, tcs, PROMPT, w.edits), top)
        assert all(abs(t["after"] - expected[t["id"]]) < 1e-6 for t in w._result["top"] if t["id"] in expected)
        send(w, type="set", request="v:7", values={"position": 2})  # a position change reruns nothing new
        settled(w)
        assert w._rows and w._rows[0]["act"] == max(r["act"] for r in w._rows if r["active"])
    finally:
        w.close()


def test_continuation_and_cancel(lm, tcs):
    w = AblationSliders(lm, tcs, PROMPT, features=[Edit(6, 5, steer=40.0)], continuation=3)
    try:
        expected = run_with_edits(lm, tcs, PROMPT, [Edit(6, 5, steer=40.0)], positions=[-1], generate=3)
        clean = run_with_edits(lm, tcs, PROMPT, generate=3)
        assert w._result["continuation"] == {"before": lm.tokenizer.decode(clean.continuation[0]),
                                             "after": lm.tokenizer.decode(expected.continuation[0])}
        statuses = []
        w.observe(lambda change: statuses.append(change["new"]), "_status")
        send(w, type="set", request="c:1", values={"continuation": 40})
        deadline = time.monotonic() + 300
        while not any(s.startswith("generating") for s in statuses):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        send(w, type="cancel")
        assert w._status == ""
        settled(w)
        assert w._result["continuation"] is None, "a cancelled continuation is not shown"
        assert statuses[-1] == "" and not any(s == "generating 40/40" for s in statuses)
    finally:
        w.close()


def test_bad_input_is_shown_in_the_widget_which_keeps_working(lm, tcs):
    w = AblationSliders(lm, {**tcs, lm.n_layers: make_tc(lm, lm.n_layers)}, PROMPT, features=[(6, 999), (6, 4)])
    try:
        assert f"Transcoder for layer {lm.n_layers} left out" in w.error and f"{lm.n_layers} layers" in w.error
        assert "Feature (6, 999) left out: Latent 999 is out of range: the layer-6 transcoder has 256" in w.error
        assert [(s["layer"], s["latent"]) for s in w.sliders] == [(6, 4)] and w._result["top"]
        problems = w.error

        send(w, type="set", request="b:1", values={"prompt": "word " * (lm.max_context + 1)})
        settled(w)
        assert f"reads at most {lm.max_context}: shorten it" in w.error and w._context == {}
        assert w._result == {"request": "b:1"}  # answered: no bars of the old prompt, the page's request done
        send(w, type="set", request="b:2", values={"prompt": ""})
        settled(w)
        assert "The prompt is empty" in w.error
        send(w, type="set", request="b:3", values={"prompt": "Hello there"})
        settled(w)
        assert w.error == problems and w._context["tokens"][1:] == ["Hello", " there"]
        assert w._result["request"] == "b:3" and w._result["top"]

        send(w, type="add", request="b:4", layer=5, latent=1)
        assert "Layer 5 has no transcoder here (transcoders are given for layers: 3, 6)" in w.error
        send(w, type="add", request="b:5", layer=6, latent="x")
        assert "give its layer and its number" in w.error
        send(w, type="set", request="b:6", values={"position": 99, "continuation": 1000, "bogus": 1})
        assert "Position 99 is outside the prompt's 3 tokens" in w.error and "generate 0 to 64" in w.error
        assert "cannot set 'bogus'" in w.error
        with pytest.raises(traitlets.TraitError, match="Latent 256 is out of range"):
            w.selected = (6, 256)
        send(w, type="add", request="b:7", layer=6, latent=9)
        settled(w)
        assert w.error == problems and w.selected == (6, 9) and (6, 9) in {(r["layer"], r["latent"]) for r in w._rows}
    finally:
        w.close()


def test_remote_local_gives_the_same_bars(lm, tcs):
    edits = [Edit(6, 7, steer=30.0)]
    local = AblationSliders(lm, tcs, PROMPT, features=edits)
    remote = AblationSliders(lm, tcs, PROMPT, features=edits, remote="local")
    try:
        assert remote._context["remote"] and not local._context["remote"]
        for a, b in zip(local._result["top"], remote._result["top"], strict=True):
            assert a["id"] == b["id"] and abs(a["after"] - b["after"]) < 1e-5 and abs(a["before"] - b["before"]) < 1e-5
    finally:
        local.close()
        remote.close()


def test_a_feature_dashboard_follows_the_selected_latent(lm, tcs):
    tokens = torch.cat([run_with_edits(lm, tcs, PROMPT).tokens] * 2)
    dash = FeatureDashboard(analyze_features(lm, tcs[6], tokens, top_k=2, progress=False))
    w = AblationSliders(lm, tcs, PROMPT)
    try:  # the docstring's example
        w.observe(lambda change: change.new[0] == 6 and setattr(dash, "feature", change.new[1]), "selected")
        send(w, type="select", layer=6, latent=12)
        assert w.selected == (6, 12) and dash.feature == 12
        send(w, type="select", layer=3, latent=40)
        assert w.selected == (3, 40) and dash.feature == 12
    finally:
        w.close()
