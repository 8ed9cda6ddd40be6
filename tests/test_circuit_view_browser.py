"""CircuitView in a real JupyterLab and Chromium: the notebook builds a graph on a tiny random GPT-2
(saved by the test with random transcoders) and the test drives the widget through the page.
Select with ``pytest -m browser``; screenshots go to test-artifacts/."""

import json

import pytest
import torch
import transformers

from tcwidgets.transcoder import Transcoder, TranscoderConfig

pytest_plugins = ["browser.harness"]
pytestmark = pytest.mark.browser

HOSTILE = '<img src=x onerror="window.__pwned=1">'
SETUP = f"""import tcwidgets as tcw
from tcwidgets.circuits import LogitTarget, attribute
from tcwidgets.transcoder import Transcoder
from tcwidgets.widgets.circuit_view import CircuitView
lm = tcw.load_model("tiny")
transcoders = {{layer: Transcoder.load(f"tc-{{layer}}") for layer in range(3)}}
graph = attribute(lm, transcoders, {('The year 1732 ' + HOSTILE + ' to 17')!r}, LogitTarget("3", minus="1"),
                  depth=2, top_k=6, threshold=0)
view = CircuitView(graph)
view"""


@pytest.fixture(scope="module")
def model_files(lm, lab_root):
    """A tiny random GPT-2 (with the default tokenizer) and random transcoders on its 3 layers."""
    torch.manual_seed(1)
    module = transformers.AutoModelForCausalLM.from_config(transformers.GPT2Config(
        vocab_size=49152, n_embd=64, n_layer=3, n_head=4, n_positions=64))
    module.save_pretrained(lab_root / "tiny")
    lm.tokenizer.save_pretrained(lab_root / "tiny")
    for layer in range(3):
        tc = Transcoder(TranscoderConfig(d_in=64, d_out=64, n_latents=128, k=8, input_scale=0.7, output_scale=1.6,
                                         site={"model": "tiny", "layer": layer}))
        with torch.no_grad():
            tc.W_dec.mul_(4.0)
        tc.save(lab_root / f"tc-{layer}")
    return lab_root


def widget(notebook):
    notebook.page.locator(".tcw-circuit[data-ready='1']").wait_for()
    return notebook.page.locator(".tcw-circuit")


def value(notebook, expression):
    """Print a Python expression in a new cell; return the printed text."""
    return notebook.run(f"print('VALUE', {expression})").split("VALUE", 1)[1].strip()


def test_graph_renders_and_threshold_prunes(open_notebook, model_files):
    notebook = open_notebook([SETUP])
    notebook.run_all()
    view = widget(notebook)
    total_nodes, total_edges = int(value(notebook, "len(graph.nodes)")), int(value(notebook, "len(graph.edges)"))
    assert view.locator("circle.tcw-cv-node").count() == total_nodes
    assert int(view.get_attribute("data-visible-edges")) == total_edges == int(view.get_attribute("data-total-edges"))
    tokens = view.locator(".tcw-cv-token")
    assert tokens.count() == int(value(notebook, "len(graph.tokens)"))
    shown = "".join(tokens.all_text_contents())
    assert "img" in shown and "error" in shown  # the hostile text is drawn as text
    assert notebook.page.evaluate("() => window.__pwned") is None
    assert view.locator("img").count() == 0
    notebook.screenshot("circuit-view-full", view)

    # half the target's strongest input, as a fraction of the strongest edge, on the slider's scale
    half = float(value(notebook, "0.5 * max(abs(e.weight) for e in graph.predecessors(graph.target_id)) / "
                                 "max(abs(e.weight) for e in graph.edges.values())"))
    position = int(1000 * half ** 0.5)
    threshold = (position / 1000) ** 2
    slider = view.locator("input.tcw-cv-threshold")
    slider.evaluate(f"(el) => {{ el.value = {position}; el.dispatchEvent(new Event('input', {{ bubbles: true }})); }}")
    notebook.page.wait_for_function(
        f"() => Math.abs(Number(document.querySelector('.tcw-circuit').dataset.threshold) - {threshold}) < 1e-12")
    visible = int(view.get_attribute("data-visible-edges"))
    assert 0 < visible < total_edges
    assert int(view.get_attribute("data-visible-nodes")) < total_nodes
    hidden = view.locator("circle.tcw-cv-node").evaluate_all("cs => cs.filter(c => c.style.display === 'none').length")
    assert hidden == total_nodes - int(view.get_attribute("data-visible-nodes"))
    assert float(value(notebook, "view.threshold")) == pytest.approx(threshold)  # the slider told Python
    notebook.screenshot("circuit-view-threshold", view)

    notebook.run("view.threshold = 0.0")
    notebook.page.wait_for_function(
        f"() => Number(document.querySelector('.tcw-circuit').dataset.visibleEdges) === {total_edges}")


def test_click_selects_hover_summarises_and_expand_grows(open_notebook, model_files):
    notebook = open_notebook([SETUP])
    notebook.run_all()
    view = widget(notebook)
    latent = value(notebook, "max((n for n in graph.nodes.values() if n.kind == 'latent' and not n.expanded), "
                             "key=lambda n: abs(n.attribution)).node_id")
    circle = view.locator(f"circle[data-id='{latent}']")
    circle.dispatch_event("click")
    notebook.page.wait_for_function(
        f"() => document.querySelector('.tcw-circuit').dataset.selected === {latent!r}")
    assert value(notebook, "view.selected") == latent
    layer, feature = latent.split("/")[1:3]
    assert value(notebook, "view.selected_latent") == f"({layer}, {feature})"
    assert "tcw-cv-selected" in circle.get_attribute("class")
    view.locator(".tcw-cv-details .tcw-cv-promoted").wait_for()  # the summary arrived

    circle.dispatch_event("mouseover")
    tooltip = view.locator(".tcw-cv-tooltip")
    tooltip.wait_for()
    assert "promotes" in tooltip.inner_text()
    circle.dispatch_event("mouseout")

    before = int(view.get_attribute("data-total-nodes"))
    view.locator("button.tcw-cv-expand").click()
    notebook.page.wait_for_function(
        f"() => Number(document.querySelector('.tcw-circuit').dataset.totalNodes) > {before}")
    assert value(notebook, f"graph.nodes[{latent!r}].expanded") == "True"
    assert int(view.get_attribute("data-total-nodes")) == int(value(notebook, "len(graph.nodes)"))
    notebook.screenshot("circuit-view-expanded", view)

    view.locator("button.tcw-cv-pin").click()
    selector = json.dumps(f".tcw-circuit circle[data-id='{latent}']")
    notebook.page.wait_for_function(f"() => document.querySelector({selector}).classList.contains('tcw-cv-pinned')")
    assert value(notebook, "view.pinned") == f"[{latent!r}]"


def test_nodes_spread_over_their_tokens_and_the_tooltip_stays_inside(open_notebook, model_files):
    """A pruned full graph (latents at every position): each node sits in its token's column; the
    scores and thresholds are shown; the hover summary stays inside the widget and the viewport,
    even for the rightmost and the lowest nodes."""
    notebook = open_notebook([SETUP.replace("view = CircuitView(graph)\nview", "pruned = graph.prune(0.8, 0.98)\n"
                                            "view = CircuitView(pruned)\nview")])
    notebook.run_all()
    view = widget(notebook)
    columns = view.locator(".tcw-cv-token").evaluate_all(  # each label's anchor (before its tilt), on the page
        "els => els.map(e => [e.parentElement.getBoundingClientRect().left + e.offsetLeft])")
    nodes = view.locator("circle.tcw-cv-node").evaluate_all(
        "cs => cs.map(c => { const b = c.getBoundingClientRect(); return [Number(c.dataset.position), "
        "b.left + b.width / 2, b.top + b.height / 2, c.style.display !== 'none', c.dataset.id]; })")
    expected = value(notebook, "sorted({n.position for n in pruned.nodes.values()})")
    assert str(sorted({p for p, *_ in nodes})) == expected
    nodes = [(p, x, y, node_id) for p, x, y, drawn, node_id in nodes if drawn]  # drawn (reaching the target)
    anchors = [c[0] for c in columns]
    assert anchors == sorted(anchors)
    width = view.bounding_box()["width"]
    assert anchors[-1] - anchors[0] > width / 2, "the token columns do not spread over the widget"
    # positions with nodes get columns of their own, in token order (how many positions have nodes is the
    # graph's business: in notebook 7's greater-than graph nearly all sit at the last two tokens)
    centres = [min(x for q, x, *_ in nodes if q == p) for p in sorted({p for p, *_ in nodes})]
    assert len(centres) > 1 and all(b - a > 5 for a, b in zip(centres, centres[1:])), centres
    for p, x, *_ in nodes:  # each drawn node lies between the labels of its token's neighbours
        assert (p == 0 or anchors[p - 1] < x) and (p == len(anchors) - 1 or x < anchors[p + 1])
    scores = view.locator(".tcw-cv-scores").inner_text()
    replacement = float(value(notebook, "round(pruned.scores().replacement, 4)"))
    assert "replacement score" in scores and "completeness score" in scores and "80% of the node influence" in scores
    assert f"{replacement:.3g}"[:4] in scores
    notebook.screenshot("circuit-view-pruned", view)

    from browser.harness import clipped  # (imported here: pytest loads the harness as a plugin first)

    size = notebook.page.viewport_size
    rightmost = max(range(len(nodes)), key=lambda i: nodes[i][1])
    lowest = max(range(len(nodes)), key=lambda i: nodes[i][2])
    latent = max((node for node in nodes if node[3].startswith("latent/")), key=lambda node: node[1])  # rightmost
    for name, node in (("right", nodes[rightmost]), ("low", nodes[lowest]), ("latent", latent)):
        view.locator(f"circle[data-id='{node[3]}']").hover()  # scrolled into view, the pointer on it
        tooltip = view.locator(f".tcw-cv-tooltip[data-id='{node[3]}']")
        tooltip.wait_for()
        if name == "latent":
            tooltip.locator(".tcw-cv-promoted .tcw-cv-chip").first.wait_for()  # the summary arrived
        notebook.page.wait_for_timeout(300)  # the tooltip is placed again with its summary
        box, tip = view.bounding_box(), tooltip.bounding_box()
        assert box["x"] - 1 <= tip["x"] and tip["x"] + tip["width"] <= box["x"] + box["width"] + 1
        assert 0 <= tip["y"] and tip["y"] + tip["height"] <= size["height"] + 1
        assert 0 <= tip["x"] and tip["x"] + tip["width"] <= size["width"] + 1
        cut = clipped(tooltip)  # nothing inside cut off: no overflow, every part within the box
        assert not cut["scrolls"] and not cut["outside"], f"the hover summary is cut off: {cut}"
        notebook.screenshot(f"circuit-view-tooltip-{name}")
        notebook.page.mouse.move(0, 0)


LABELS = """(view) => [...view.querySelectorAll('.tcw-cv-token')].map((label) => {
  label.scrollIntoView({ block: 'nearest', inline: 'nearest' });
  const b = label.getBoundingClientRect();
  const top = document.elementFromPoint(b.left + b.width / 2, b.top + b.height / 2);
  return { text: label.textContent, left: b.left, right: b.right, top: b.top, bottom: b.bottom,
           cut: label.scrollWidth > label.clientWidth + 1 || label.scrollHeight > label.clientHeight + 1,
           seen: top === label || label.contains(top), size: parseFloat(getComputedStyle(label).fontSize) };
})"""


@pytest.mark.parametrize("prompt", ["The war lasted from the year 1732 to the year 17",
                                    "The war lasted from the year 1732 to the year 17, and the peace that followed it"],
                         ids=["notebook-7-prompt", "longer-prompt"])
def test_every_token_is_labelled_legibly_without_overlap(open_notebook, model_files, prompt):
    """Notebook 7's prompt (18 tokens with BOS) and a longer one: every token's label is drawn whole
    (not cut by an ellipsis, not covered), at a legible size, and no two labels overlap."""
    notebook = open_notebook([SETUP.replace(repr("The year 1732 " + HOSTILE + " to 17"), repr(prompt)).replace(
        "view = CircuitView(graph)\nview", "view = CircuitView(graph.prune(0.8, 0.98))\nview")])
    notebook.run_all()
    view = widget(notebook)
    tokens = json.loads(value(notebook, "__import__('json').dumps(graph.token_strings)"))
    assert len(tokens) >= 18
    labels = view.evaluate(LABELS)
    assert [label["text"] for label in labels] == [token.replace(" ", "·") for token in tokens]
    for label in labels:
        assert label["right"] - label["left"] > 3 and label["bottom"] - label["top"] > 3, label
        assert not label["cut"], f"label cut off: {label}"
        assert label["seen"], f"label covered by something else: {label}"
        assert label["size"] >= 10, f"label too small to read: {label}"
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            apart = a["right"] <= b["left"] or b["right"] <= a["left"] or a["bottom"] <= b["top"] or b["bottom"] <= a["top"]
            assert apart, f"labels overlap: {a} and {b}"
    notebook.screenshot(f"circuit-view-token-labels-{len(tokens)}", view)
