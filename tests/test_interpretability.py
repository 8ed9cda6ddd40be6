"""Interpretability scores: the detection score against a hand computation, the default explainer on a
made-up latent, held-out contexts against a plain forward hook, and the chat adapter against a local
stand-in server."""

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

import tcwidgets as tcw
from tcwidgets.features import Example, FeatureStats, LatentStats, QuantileGroup
from tcwidgets.interpretability import HeldOutContext

LAYER = 3


def context(last, activation):
    ids = (1, 2, last)
    return HeldOutContext(0, 2, ids, tuple(f"t{i}" for i in ids), activation, 0 if activation else None)


def test_detection_score_is_balanced_accuracy_by_hand():
    contexts = [context(7, 1.0), context(7, 2.5), context(8, 0.3), context(9, 4.0), context(8, 1.1),  # fire
                context(7, 0.0), context(8, 0.0), context(9, 0.0), context(8, 0.0), context(9, 0.0)]  # do not
    explanation = tcw.Explanation("token 7", lambda cs: [c.tokens[-1] == 7 for c in cs])
    score = tcw.detection_score(5, explanation, contexts)
    # recall: 2 of the 5 firing contexts end in 7; specificity: 4 of the 5 quiet ones do not
    assert (score.recall, score.specificity) == (2 / 5, 4 / 5)
    assert score.score == pytest.approx((2 / 5 + 4 / 5) / 2)
    assert (score.n_activating, score.n_non_activating, score.latent) == (5, 5, 5)
    assert score.predictions == (True, True, False, False, False, True, False, False, False, False)
    assert math.isnan(tcw.detection_score(5, explanation, contexts[5:]).score)  # nothing that fires
    with pytest.raises(ValueError, match="one per context"):
        tcw.detection_score(5, tcw.Explanation("x", lambda cs: [True]), contexts)


def made_up_stats():
    """A latent that fires on token 3 (3 of 4 sampled firings, rare elsewhere) and once on token 5,
    which is half of the analysed text: the explanation must keep 3 and drop 5."""
    analysed = np.array([[0, 5, 3, 5, 5, 4, 5, 3, 5, 3, 5, 4, 5, 5, 3, 5]], dtype=np.int32)  # 16 tokens
    vocab = [f"tok{i}" for i in range(8)]
    stats = FeatureStats({"n_tokens": 16, "n_latents": 1}, {"tokens": analysed}, vocab)

    def example(position, value):
        return Example(0, position, value, analysed[0, :position + 1], np.zeros(position + 1), position)

    sampled = [example(2, 1.0), example(7, 2.0), example(9, 3.0), example(1, 0.5)]
    latent = LatentStats(
        index=0, count=5, n_tokens=16, mean_active=1.7, max=3.0, histogram_edges=np.zeros(2),
        histogram_counts=np.zeros(1), top=[sampled[2], sampled[1]],
        quantiles=[QuantileGroup(0, 0.5, 0.5, 1.0, sampled[:2]), QuantileGroup(0.5, 1, 2.0, 3.0, sampled[2:])],
        sample_size=4, promoted=[], suppressed=[], embedding=None)
    return stats, latent


def test_token_explainer_keeps_tokens_that_predict_firing():
    stats, latent = made_up_stats()
    explanation = tcw.TokenExplainer()(latent, stats)
    # examples: 6 (4 sampled + 2 top), centres 3,3,3,5 + 3,3. Token 3: share 5/6 of the examples,
    # 4 occurrences, 5/6 * 5 firings of it expected -> none elsewhere: kept. Token 5: share 1/6,
    # 9 occurrences, 9 - 5/6 not firing of 11 non-firing tokens = 0.74 > 1/6: dropped.
    assert explanation.text == 'fires on the tokens "tok3"'
    contexts = [context(3, 1.0), context(3, 0.0), context(5, 2.0), context(4, 0.0), context(5, 0.0)]
    assert explanation.predict(contexts) == [True, True, False, False, False]
    score = tcw.detection_score(0, explanation, contexts)
    assert score.score == pytest.approx((1 / 2 + 2 / 3) / 2)


@pytest.fixture(scope="module")
def scored(lm):
    """A small transcoder trained on a few thousand tokens, its stats, and scores on held-out text."""
    train = tcw.load_corpus("python-docs", lm, context=64, n_tokens=64 * 64)
    held_out = tcw.load_corpus("python-docs", lm, context=64, n_tokens=24 * 64, split="test")
    store = tcw.collect_activations(lm, LAYER, train, progress=False)
    tc = tcw.train_transcoder(store, LAYER, n_latents=256, k=8, progress=False)
    stats = tcw.analyze_features(lm, tc, train, top_k=8, quantiles=4, per_quantile=3, sample_size=24,
                                 progress=False)
    latents = np.flatnonzero(stats.count > 0)[:40]
    scores = tcw.interpretability_scores(stats, lm=lm, tokens=held_out, transcoder=tc, latents=latents,
                                         quantiles=4, per_quantile=3, progress=False)
    return tc, stats, held_out, scores


class Stop(Exception):
    pass


def mlp_inputs(lm, tokens):
    """The layer's MLP inputs, read by a plain forward hook that stops the model there."""
    seen = []

    def hook(module, inputs, output):
        seen.append(inputs[0])
        raise Stop

    handle = tcw.models.resolve(lm._module, lm.sites.mlp_path(LAYER)).register_forward_hook(hook)
    try:
        with torch.no_grad(), pytest.raises(Stop):
            lm._module(tokens)
    finally:
        handle.remove()
    return seen[0]


def test_held_out_contexts_match_a_forward_hook(lm, scored):
    tc, stats, held_out, scores = scored
    dense = tc.eval().encode(mlp_inputs(lm, held_out)).detach().numpy()  # [contexts, context, latents]
    dense[held_out.numpy() == lm.tokenizer.bos_token_id] = 0
    window = stats.meta["settings"]["window"][0] + 1
    for latent in scores:
        result = scores[latent]
        values = dense[..., latent]
        firing = np.sort(values[values > 0])
        assert result.n_activating == sum(min(3, len(part)) for part in np.array_split(firing, 4))
        assert result.n_non_activating == 12
        for held in result.contexts:
            assert held.activation == pytest.approx(values[held.context, held.position], rel=1e-4, abs=1e-5)
            assert held.tokens == tuple(held_out[held.context, max(0, held.position - window + 1):held.position + 1].tolist())
            assert held.strings == tuple(stats.vocab[t] for t in held.tokens)
            if held.quantile is not None:  # drawn from its activation quantile of the held-out firings
                part = np.array_split(firing, 4)[held.quantile]
                assert part[0] - 1e-5 <= held.activation <= part[-1] + 1e-5
        fires = np.array([h.fires for h in result.contexts])
        predicted = np.array(result.predictions)
        by_hand = (predicted[fires].mean() + (~predicted[~fires]).mean()) / 2
        assert result.score == pytest.approx(by_hand)


def test_scores_beat_chance_and_display(scored):
    tc, stats, held_out, scores = scored
    assert len(scores) == 40
    assert scores.mean > 0.6  # token-level explanations of a shallow layer's latents predict far better than chance
    latent = next(iter(scores))
    assert scores.get(latent) is scores[latent] and scores.get(10**6) is None
    with pytest.raises(KeyError, match="not scored"):
        scores[10**6]
    summary = json.loads(json.dumps(scores.to_dict()))
    assert summary["latents"][0]["explanation"] == scores[latent].explanation
    assert "<table>" in scores._repr_html_() and "mean detection score" in repr(scores)


def test_scores_refuse_another_transcoder(lm, scored):
    tc, stats, held_out, _ = scored
    other = tcw.Transcoder(tc.config)
    with pytest.raises(tcw.TranscoderMismatchError):
        tcw.interpretability_scores(stats, lm=lm, tokens=held_out, transcoder=other, progress=False)
    with pytest.raises(TypeError, match="Explanation"):
        tcw.interpretability_scores(stats, lm=lm, tokens=held_out[:2], transcoder=tc, latents=[0],
                                    explainer=lambda latent, stats: "just text", progress=False)


def test_the_dashboard_shows_each_scored_latents_score_and_refuses_scores_of_other_stats(lm, scored):
    tc, stats, held_out, scores = scored
    latent = next(iter(scores))
    dash = tcw.FeatureDashboard(stats, feature=latent, scores=scores)
    assert dash._latent["score"] == json.loads(json.dumps(scores[latent].to_dict()))
    assert dash._latent["score"]["score"] == pytest.approx(scores[latent].score)
    unscored = next(i for i in np.flatnonzero(stats.count > 0) if scores.get(int(i)) is None)
    dash.feature = int(unscored)
    assert dash._latent["score"] is None
    assert tcw.FeatureDashboard(stats, feature=latent)._latent["score"] is None
    other = tcw.interpretability_scores(stats, lm=lm, tokens=held_out[:4], transcoder=tc, latents=[latent],
                                        progress=False)
    other.transcoder = {**other.transcoder, "n_latents": 512}
    with pytest.raises(ValueError, match="scores are of another transcoder.*512 latents"):
        tcw.FeatureDashboard(stats, scores=other)
    with pytest.raises(TypeError, match="InterpretabilityScores"):
        tcw.FeatureDashboard(stats, scores={latent: 0.9})


class StandIn(BaseHTTPRequestHandler):
    """A deterministic OpenAI-compatible chat endpoint: explains every latent as 'the letter e'
    and judges a context to fire when its marked token contains an "e"."""

    requests: list = []
    reply: str | None = None  # when set, the content of every answer

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((self.path, dict(self.headers), body))
        system, user = (message["content"] for message in body["messages"])
        if "JSON list" in system:
            excerpts = [json.loads(line.split(". ", 1)[1]) for line in user.splitlines()]
            marked = [excerpt.rsplit("<<", 1)[1].rsplit(">>", 1)[0] for excerpt in excerpts]
            content = "Sure: " + json.dumps([int("e" in token) for token in marked])
        else:
            content = "the letter e"
        content = type(self).reply or content
        answer = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    StandIn.requests, StandIn.reply = [], None
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def test_openai_explainer_round_trips_with_a_local_server(lm, scored, server):
    tc, stats, held_out, _ = scored
    latents = [int(i) for i in np.flatnonzero(stats.count > 0)[:3]]
    explainer = tcw.OpenAIExplainer(server, "stand-in", api_key="secret", n_examples=4)
    scores = tcw.interpretability_scores(stats, lm=lm, tokens=held_out[:8], transcoder=tc, latents=latents,
                                         explainer=explainer, progress=False)
    assert len(StandIn.requests) == 2 * len(latents)  # one explanation and one detection request per latent
    for path, headers, body in StandIn.requests:
        assert path == "/v1/chat/completions"
        assert headers["Authorization"] == "Bearer secret" and body["model"] == "stand-in"
    first_examples = StandIn.requests[0][2]["messages"][1]["content"].splitlines()
    assert len(first_examples) == min(4, len(stats.latent(latents[0]).top)) and "<<" in first_examples[0]
    for latent in latents:
        result = scores[latent]
        assert result.explanation == "the letter e"
        assert result.predictions == tuple("e" in c.strings[-1] for c in result.contexts)
        fires = np.array([c.fires for c in result.contexts])
        predicted = np.array(result.predictions)
        assert result.score == pytest.approx((predicted[fires].mean() + (~predicted[~fires]).mean()) / 2)


def test_openai_explainer_errors(server):
    with pytest.raises(ValueError, match="http://"):
        tcw.OpenAIExplainer("127.0.0.1:8000", "m")
    explainer = tcw.OpenAIExplainer(server, "stand-in")
    StandIn.reply = "[1, 0]"  # two judgements for one context
    with pytest.raises(ValueError, match="JSON list of 1 0/1 values"):
        explainer.detect("x", [context(3, 1.0)])
    with pytest.raises(ConnectionError, match="is the server running"):
        tcw.OpenAIExplainer("http://127.0.0.1:9/v1", "m", timeout=5).chat([{"role": "user", "content": "hi"}])
