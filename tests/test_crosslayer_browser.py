"""Every widget takes a cross-layer transcoder, in a real JupyterLab and Chromium: a small CLT trained
here on four late layers of the default model (a tiny store, seconds), then the FeatureDashboard of
one layer's latents, AblationSliders and a CircuitView of an attribution graph through it, each built
in a notebook as a learner would and checked against an independent computation (plain forward
hooks and the CLT's formula in float64, or `run_with_edits` in a later cell). Select with
``pytest -m browser``; screenshots go to test-artifacts/."""

import json

import pytest
import torch

import tcwidgets as tcw
from tcwidgets.features import _norm_weight
from tcwidgets.models import resolve
from tcwidgets.widgets.circuit_view import N_LOGITS
from test_crosslayer import reference_latents
from test_sliders_browser import api, bars, matches, run, settle, widget

pytest_plugins = ["browser.harness"]
pytestmark = pytest.mark.browser

LAYERS = [26, 27, 28, 29]
LOAD = """import json
import tcwidgets as tcw
lm = tcw.load_model()
clt = tcw.load_transcoders("clt")
print("LOADED", type(clt).__name__, clt.layers)
"""
DASHBOARD = LOAD + """tokens = tcw.load_corpus("python-docs", lm, context=48, n_tokens=8 * 48, split="test")
stats = tcw.analyze_features(lm, clt.views()[26], tokens, top_k=6, window=(8, 3), progress=False)
feature = int(stats.order("density")[0])
print("TOP", feature, json.dumps([[e.context, e.position, e.value] for e in stats.latent(feature).top]))
dash = tcw.FeatureDashboard(stats, feature=feature)
dash"""
SLIDERS = LOAD + """import torch
from tcwidgets.interventions import Edit, run_with_edits
tcs = clt  # the name the sliders test's API cell reads
w = tcw.AblationSliders(lm, clt, prompt="The capital of France is", pinned=[" Paris"])
w"""
CIRCUIT = LOAD + """graph = tcw.attribute(lm, clt, "The war lasted from 1732 to 17", tcw.LogitTarget("4", minus="2"), depth=0)
pruned = graph.prune(0.8, 0.98)
view = tcw.CircuitView(pruned)
view"""


@pytest.fixture(scope="module")
def clt(lm, lab_root, tmp_path_factory):
    """A TopK CLT (256 latents and k=8 per layer) trained on 1,024 tokens of layers 26-29, saved where
    the notebooks run."""
    tokens = tcw.load_corpus("python-docs", lm, context=64, n_tokens=16 * 64)
    store = tcw.collect_activations(lm, LAYERS, tokens, out=tmp_path_factory.mktemp("clt-store"), progress=False)
    clt = tcw.train_clt(store, LAYERS, n_latents=256, k=8, batch_size=128, epochs=2, progress=False)
    clt.save(lab_root / "clt")
    return clt.eval().requires_grad_(False)


def loaded(notebook):
    """Run the notebook; check that it loaded the whole CLT (not per-layer transcoders)."""
    notebook.run_all()
    assert f"LOADED CrossLayerTranscoder {LAYERS}" in notebook.output(0)


def mlp_inputs(lm, tokens, layer):
    """Layer ``layer``'s MLP inputs [contexts, positions, d] from a plain forward hook on the HF module."""
    found = []
    mlp = resolve(lm._module, lm.sites.mlp_path(layer))
    handle = mlp.register_forward_hook(lambda module, args, output: found.append(args[0].detach()))
    try:
        with torch.no_grad():
            lm._module(tokens)
    finally:
        handle.remove()
    return found[0]


def promoted_ids(lm, clt, layer, latent, k):
    """The ``k`` tokens whose logits a latent raises most directly, in float64: its writes into its own and
    every later layer, summed in model units, through the final norm's weight and the unembedding."""
    i = clt.layers.index(layer)
    writes = sum(getattr(clt, f"W_dec_{i}")[latent, j - i].double() / clt.config.output_scales[j]
                 for j in range(i, clt.n_layers))
    unembed = resolve(lm._module, lm.sites.unembed).weight.double()
    logits = unembed @ (writes * _norm_weight(resolve(lm._module, lm.sites.final_norm)))
    return logits.topk(k).indices.tolist()


def test_the_dashboard_shows_a_cross_layer_transcoders_latents(open_notebook, clt, lm):
    notebook = open_notebook([DASHBOARD])
    loaded(notebook)
    feature, top = notebook.output(0).split("TOP ", 1)[1].splitlines()[0].split(" ", 1)
    feature, top = int(feature), json.loads(top)
    root = notebook.page.locator(f".tcw-dashboard[data-latent='{feature}']")
    root.wait_for()

    # the activations the page shows are the CLT's formula on the MLP inputs of a plain forward hook
    tokens = tcw.load_corpus("python-docs", lm, context=48, n_tokens=8 * 48, split="test")
    latents = reference_latents(clt, 26, mlp_inputs(lm, tokens, 26))[..., feature]
    shown = [float(v) for v in root.locator(".tcw-top .tcw-example > .tcw-value").all_text_contents()]
    assert len(shown) == len(top) > 0
    for (context, position, value), drawn in zip(top, shown):
        assert float(latents[context, position]) == pytest.approx(value, rel=1e-4, abs=1e-5)
        assert drawn == pytest.approx(value, rel=5e-3)
    assert top[0][2] == pytest.approx(float(latents[:, 1:].max()), rel=1e-4)  # the strongest (BOS left out)
    # its promoted tokens are those of its summed writes into layers 26-29
    drawn = [json.loads(t) for t in root.locator(".tcw-promoted .tcw-tok-cell").evaluate_all(
        "cells => cells.map(c => c.title)")]
    ids = promoted_ids(lm, clt, 26, feature, len(drawn))
    assert drawn == json.loads(run(notebook, f"print('VOCAB', json.dumps([stats.vocab[i] for i in {ids}]))"
                                   ).split("VOCAB ", 1)[1])
    notebook.screenshot("crosslayer-dashboard", root)


def test_sliders_edit_a_cross_layer_transcoder_as_run_with_edits_does(open_notebook, clt):
    notebook = open_notebook([SLIDERS])
    loaded(notebook)
    root = widget(notebook)
    rows = root.locator(".tcw-row")
    layers = [int(layer) for layer in rows.evaluate_all("rows => rows.map(r => r.dataset.layer)")]
    assert len(set(layers)) > 1 and set(layers) <= set(LAYERS), layers  # latents of several CLT layers
    before = bars(root)
    matches(before, api(notebook, "[]", before), 0)

    row = rows.nth(layers.index(min(layers)))  # the lowest layer's latent: its writes reach every later layer
    layer, latent = int(row.get_attribute("data-layer")), int(row.get_attribute("data-latent"))
    row.locator(".tcw-slider").focus()
    for _ in range(20):  # 1.00 -> 0.00: zero-ablate it at the last token
        notebook.page.keyboard.press("ArrowLeft")
    assert row.locator(".tcw-value").text_content() == "0"
    settle(notebook)
    after = bars(root)
    assert any(b != a for b, a in after.values()), "zeroing a latent of the CLT must move some bar"
    matches(after, api(notebook, f"[Edit({layer}, {latent}, scale=0.0)]", after), 1)
    matches(after, api(notebook, "[]", after), 0)
    notebook.screenshot("crosslayer-sliders", root)


def test_circuit_view_draws_a_graph_through_a_cross_layer_transcoder(open_notebook, clt, lm):
    notebook = open_notebook([CIRCUIT])
    loaded(notebook)
    notebook.page.locator(".tcw-circuit[data-ready='1']").wait_for()
    view = notebook.page.locator(".tcw-circuit")
    ids = view.locator("circle.tcw-cv-node").evaluate_all("cs => cs.map(c => c.dataset.id)")
    expected = json.loads(run(notebook, "print('IDS', json.dumps(sorted(pruned.nodes)))").split("IDS ", 1)[1])
    assert sorted(ids) == expected
    latents = [node for node in ids if node.startswith("latent/")]
    layers = {int(node.split("/")[1]) for node in latents}
    assert len(layers) > 1 and layers <= set(LAYERS), latents  # latent nodes, from several CLT layers
    scores = json.loads(run(notebook, "print('SCORES', json.dumps(pruned.scores()))").split("SCORES ", 1)[1])
    text = view.locator(".tcw-cv-scores").inner_text()
    assert "replacement score" in text and f"{scores[0]:.3g}"[:4] in text
    notebook.screenshot("crosslayer-circuit-view", view)

    node = min(latents, key=lambda n: int(n.split("/")[1]))  # a latent of the lowest layer shown
    view.locator(f"circle[data-id='{node}']").dispatch_event("click")
    chips = view.locator(".tcw-cv-details .tcw-cv-promoted .tcw-cv-chip")
    chips.first.wait_for()
    drawn = [json.loads(t) for t in chips.evaluate_all("cs => cs.map(c => c.title)")]
    layer, feature = (int(part) for part in node.split("/")[1:3])
    assert drawn == [lm.tokenizer.decode([i]) for i in promoted_ids(lm, clt, layer, feature, N_LOGITS)]
    notebook.screenshot("crosslayer-circuit-view-selected", view)
