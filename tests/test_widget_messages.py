"""Malformed messages from the page (wrong types, missing keys, huge numbers, lists for objects) end
in the widget's error banner and a reply, never in an uncaught exception; the widget keeps working."""

import time

import pytest
import torch

import tcwidgets as tcw
from tcwidgets.features import analyze_features
from tcwidgets.transcoder import Transcoder, TranscoderConfig
from tcwidgets.widgets import AblationSliders, FeatureDashboard

MALFORMED = [None, [], "select", 12, {}, {"type": 5}, {"type": ["list"]}, {"type": "bogus"}]
DASHBOARD_MALFORMED = [
    {"type": "select"}, {"type": "select", "feature": "3"}, {"type": "select", "feature": [1]},
    {"type": "select", "feature": 1.5}, {"type": "select", "feature": 10**30}, {"type": "select", "feature": -1},
    {"type": "list", "request": "r", "offset": "a"}, {"type": "list", "request": "r", "offset": {"x": 1}},
    {"type": "list", "request": "r", "query": ["a"]}, {"type": "list", "request": "r", "descending": "yes"},
    {"type": "list", "request": "r", "sort": None}, {"type": "list", "request": "r", "query": "a" * 100_000},
    {"type": "list", "request": ["r"], "offset": None},
]
SLIDERS_MALFORMED = [
    {"type": "set", "request": "r", "values": []}, {"type": "set", "request": "r", "values": "x"},
    {"type": "set", "request": "r", "values": {"sliders": {"layer": 6}}},
    {"type": "set", "request": "r", "values": {"sliders": [[6, 1, "scale", 0.0]]}},
    {"type": "set", "request": "r", "values": {"sliders": [{"layer": 6, "latent": 1, "kind": "scale", "value": 1e300}]}},
    {"type": "set", "request": "r", "values": {"sliders": [{"layer": 6, "latent": 10**40, "kind": "scale", "value": 0}]}},
    {"type": "set", "request": "r", "values": {"position": 10**30}}, {"type": "set", "request": "r", "values": {"position": "x"}},
    {"type": "set", "request": "r", "values": {"pinned": {"a": 1}}}, {"type": "set", "request": "r", "values": {"pinned": [3]}},
    {"type": "set", "request": "r", "values": {"pinned": ["x" * 5000]}}, {"type": "set", "request": "r", "values": {"prompt": 7}},
    {"type": "set", "request": "r", "values": {"continuation": 10**9}}, {"type": "set", "request": "r", "values": {"_result": {}}},
    {"type": "add", "request": "r", "layer": [6], "latent": 1}, {"type": "add", "request": "r", "layer": 6, "latent": 10**30},
    {"type": "add", "request": "r", "layer": 6.5, "latent": 1}, {"type": "select", "layer": "6", "latent": None},
    {"type": "select", "layer": 6, "latent": 10**6},
]


def tiny_transcoder(lm, layer=6):
    torch.manual_seed(layer)
    tc = Transcoder(TranscoderConfig(d_in=lm.d_model, d_out=lm.d_model, n_latents=64, k=8, input_scale=8.0,
                                     site={"model": lm.name, "layer": layer}))
    with torch.no_grad():
        tc.b_enc.normal_(0, 0.5)
    return tc.eval().requires_grad_(False)


def replies(widget):
    """What the widget sends to the page (its comm is not connected here)."""
    sent = []
    widget.send = lambda content, buffers=None: sent.append(content)
    return sent


@pytest.fixture(scope="module")
def dashboard(lm):
    tokens = tcw.load_corpus("python-docs", lm, context=32, n_tokens=2 * 32, split="test")
    return FeatureDashboard(analyze_features(lm, tiny_transcoder(lm), tokens, top_k=2, progress=False))


@pytest.mark.parametrize("content", MALFORMED + DASHBOARD_MALFORMED, ids=repr)
def test_the_dashboard_answers_a_malformed_message_with_its_banner(dashboard, content):
    sent, before = replies(dashboard), dashboard.feature
    dashboard.error = ""
    dashboard._on_message(None, content, [])
    assert dashboard.error, "the banner names the problem"
    assert sent and sent[-1]["type"] == "error" and sent[-1]["message"] == dashboard.error
    assert dashboard.feature == before
    dashboard._on_message(None, {"type": "list", "request": "ok", "offset": 0}, [])  # still working
    assert sent[-1]["type"] == "list" and sent[-1]["request"] == "ok" and sent[-1]["rows"]
    dashboard._on_message(None, {"type": "select", "feature": 2.0}, [])
    assert dashboard.feature == 2 and dashboard.error == ""


@pytest.fixture(scope="module")
def sliders(lm):
    widget = AblationSliders(lm, {6: tiny_transcoder(lm)}, "The capital of France is")
    yield widget
    widget.close()


def settled(widget, timeout=120):
    deadline = time.monotonic() + timeout
    while widget._status:
        assert time.monotonic() < deadline, "the widget did not settle"
        time.sleep(0.02)


@pytest.mark.parametrize("content", MALFORMED + SLIDERS_MALFORMED, ids=repr)
def test_the_sliders_answer_a_malformed_message_with_their_banner(sliders, content):
    sent, before = replies(sliders), (list(sliders.sliders), sliders.position, sliders.prompt)
    sliders._on_message(None, content, [])
    assert sliders.error, "the banner names the problem"
    settled(sliders)
    answered = isinstance(content, dict) and content.get("type") in ("set", "add")
    assert answered or (sent and sent[-1]["type"] == "error" and sent[-1]["message"])
    assert (list(sliders.sliders), sliders.position, sliders.prompt) == before
    sliders._on_message(None, {"type": "set", "request": "ok", "values": {"scope": "token"}}, [])  # still working
    settled(sliders)
    assert sliders._result["request"] == "ok" and sliders._result["top"] and sliders.error == ""
