"""analyze_features and FeatureStats against a direct computation; files, laziness, errors; and the
Python side of FeatureDashboard (its page is tested in test_dashboard_browser.py)."""

import json

import numpy as np
import pytest
import torch
import traitlets

import tcwidgets as tcw
from tcwidgets.features import (FeatureStats, FeatureStatsError, TranscoderMismatchError, analyze_features,
                                logit_effects, transcoder_fingerprint)
from tcwidgets.transcoder import Transcoder, TranscoderConfig
from tcwidgets.widgets import FeatureDashboard
from tcwidgets.widgets.dashboard import latent_payload

LAYER, N_LATENTS, BATCH = 6, 256, 2
SETTINGS = dict(top_k=8, quantiles=4, per_quantile=3, sample_size=24, window=(5, 3), n_bins=16, n_logits=7)


def make_transcoder(lm, kind="transcoder", activation="topk", seed=0, layer=LAYER):
    torch.manual_seed(seed)
    config = TranscoderConfig(d_in=lm.d_model, d_out=lm.d_model, n_latents=N_LATENTS, kind=kind,
                              activation=activation, k=8 if activation == "topk" else None, input_scale=8.0,
                              output_scale=2.0, site={"model": lm.name, "layer": layer})
    return Transcoder(config).eval()


@pytest.fixture(scope="module")
def tokens(lm):
    return tcw.load_corpus("python-docs", lm, context=64, n_tokens=6 * 64, split="test")


@pytest.fixture(scope="module", params=[("transcoder", "relu"), ("sae", "topk")],
                ids=lambda p: "-".join(p))
def case(request, lm, tokens):
    """A transcoder, its stats, and its latents computed directly with forward hooks."""
    kind, activation = request.param
    tc = make_transcoder(lm, kind, activation)
    stats = analyze_features(lm, tc, tokens, batch_size=BATCH, progress=False, **SETTINGS)
    mlp = tcw.models.resolve(lm._module, lm.sites.mlp_path(LAYER))
    seen = []
    hook = mlp.register_forward_hook(lambda module, inputs, output: seen.append((inputs[0], output)))
    try:
        with torch.no_grad():
            lm._module(tokens)
    finally:
        hook.remove()
    x, y = seen[0]
    with torch.no_grad():
        dense = tc.encode(y if kind == "sae" else x)  # [contexts, context, latents]
    dense[tokens == lm.tokenizer.bos_token_id] = 0
    return tc, stats, dense.numpy()


def firing(dense, latent):
    values = dense[..., latent]
    return values[values > 0]


def test_counts_means_max_density(case, tokens, lm):
    _, stats, dense = case
    n_tokens = int((tokens != lm.tokenizer.bos_token_id).sum())
    assert stats.n_tokens == n_tokens and stats.n_latents == N_LATENTS
    active = dense > 0
    np.testing.assert_array_equal(stats.count, active.sum((0, 1)))
    np.testing.assert_allclose(stats.density, active.sum((0, 1)) / n_tokens)
    np.testing.assert_allclose(stats.max, dense.max((0, 1)).clip(0), rtol=1e-6)
    expected_mean = dense.sum((0, 1), dtype=np.float64) / np.maximum(active.sum((0, 1)), 1)
    np.testing.assert_allclose(stats.mean_active, expected_mean, rtol=1e-5)
    assert (stats.count > 0).sum() > N_LATENTS // 4, "the test transcoder should have many live latents"


def test_top_examples_are_the_top(case, tokens):
    _, stats, dense = case
    left, right = SETTINGS["window"]
    for latent in range(N_LATENTS):
        result = stats.latent(latent)
        values = firing(dense, latent)
        expected = np.sort(values)[::-1][:SETTINGS["top_k"]]
        np.testing.assert_allclose([e.value for e in result.top], expected, rtol=1e-6)
        for example in result.top:
            c, p = example.context, example.position
            assert dense[c, p, latent] == pytest.approx(example.value, rel=1e-6)
            start, stop = max(p - left, 0), min(p + right + 1, tokens.shape[1])
            np.testing.assert_array_equal(example.tokens, tokens[c, start:stop].numpy())
            np.testing.assert_allclose(example.acts, dense[c, start:stop, latent], rtol=1e-6)
            assert example.tokens[example.center] == tokens[c, p]


def test_quantile_groups(case):
    _, stats, dense = case
    quantiles, size = SETTINGS["quantiles"], SETTINGS["sample_size"]
    sampled_latents = exact_latents = 0
    for latent in range(N_LATENTS):
        result = stats.latent(latent)
        values = np.sort(firing(dense, latent))
        assert result.sample_size == min(len(values), size)
        previous_max = -np.inf
        for group_number, group in enumerate(result.quantiles):
            assert (group.low, group.high) == (group_number / quantiles, (group_number + 1) / quantiles)
            assert len(group.examples) <= SETTINGS["per_quantile"]
            for example in group.examples:
                assert example.value > 0
                assert dense[example.context, example.position, latent] == pytest.approx(example.value, rel=1e-6)
                assert group.min <= example.value <= group.max
            if group.examples:
                assert group.min >= previous_max
                previous_max = group.max
        if 0 < len(values) <= size:  # the sample is every firing token: exact quantiles
            exact_latents += 1
            n = len(values)
            for g, group in enumerate(result.quantiles):
                low, high = g * n // quantiles, (g + 1) * n // quantiles
                assert len(group.examples) == min(high - low, SETTINGS["per_quantile"])
                if high > low:
                    assert (group.min, group.max) == pytest.approx((values[low], values[high - 1]), rel=1e-6)
        elif len(values) > size:
            sampled_latents += 1
            assert sum(len(g.examples) for g in result.quantiles) == quantiles * SETTINGS["per_quantile"]
    assert exact_latents + sampled_latents > 0


def test_histograms(case):
    _, stats, dense = case
    for latent in range(N_LATENTS):
        result = stats.latent(latent)
        values = firing(dense, latent)
        assert result.histogram_counts.sum() == len(values)
        if len(values) == 0:
            continue
        edges = result.histogram_edges
        counts, _ = np.histogram(values.astype(np.float64), bins=edges)
        np.testing.assert_array_equal(result.histogram_counts, counts)
        assert edges[-1] / 2 <= values.max() < edges[-1], "at least half of the bins are in use"


def test_logit_effects_match_float64(case, lm):
    tc, stats, _ = case
    module = lm._module
    directions = tc.W_dec.detach().double() / tc.config.output_scale * module.model.norm.weight.detach().double()
    effects = directions @ module.lm_head.weight.detach().double().T  # [latents, vocab]
    n = SETTINGS["n_logits"]
    for latent in range(0, N_LATENTS, 17):
        result = stats.latent(latent)
        for pairs, expected in ((result.promoted, np.sort(effects[latent].numpy())[::-1][:n]),
                                (result.suppressed, np.sort(effects[latent].numpy())[:n])):
            ids, values = zip(*pairs)
            np.testing.assert_allclose(values, expected, rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(effects[latent, list(ids)].numpy(), values, rtol=1e-4, atol=1e-6)
    some = logit_effects(lm, tc, n, latents=[3, 5])
    for row, latent in enumerate((3, 5)):
        ids, values = zip(*stats.latent(latent).promoted)
        assert some["promoted_ids"][row].tolist() == list(ids)
        np.testing.assert_allclose(some["promoted_values"][row], values, rtol=1e-5)


def test_embedding_tokens_match_float64(case, lm):
    tc, stats, _ = case
    if tc.config.kind == "sae":
        assert stats.latent(0).embedding is None  # an SAE reads the MLP output: no direct embedding path
        return
    module = lm._module
    norm = module.model.layers[LAYER].post_attention_layernorm
    embed = module.model.embed_tokens.weight.detach().double()
    rms = torch.sqrt(embed.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    normed = embed / rms * norm.weight.detach().double()
    scores = normed * tc.config.input_scale @ tc.W_enc.detach().double().T  # [vocab, latents]
    for latent in range(0, N_LATENTS, 17):
        ids, values = zip(*stats.latent(latent).embedding)
        expected = np.sort(scores[:, latent].numpy())[::-1][:SETTINGS["n_logits"]]
        np.testing.assert_allclose(values, expected, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(scores[list(ids), latent].numpy(), values, rtol=1e-4, atol=1e-5)


def test_batch_size_does_not_matter(case, lm, tokens):
    tc, stats, _ = case
    whole = analyze_features(lm, tc, tokens, batch_size=len(tokens), progress=False, **SETTINGS)
    np.testing.assert_array_equal(stats.count, whole.count)
    for latent in range(0, N_LATENTS, 5):
        a, b = stats.latent(latent), whole.latent(latent)
        assert [(e.context, e.position) for e in a.top] == [(e.context, e.position) for e in b.top]
        np.testing.assert_array_equal(a.histogram_counts, b.histogram_counts)


def test_activation_store_source_matches_tracing(case, lm, tokens):
    tc, stats, _ = case
    store = tcw.collect_activations(lm, [LAYER], tokens, progress=False)
    from_store = analyze_features(lm, tc, store, batch_size=BATCH, progress=False, **SETTINGS)
    np.testing.assert_array_equal(from_store.count, stats.count)
    for latent in range(0, N_LATENTS, 3):
        assert_same_latent(from_store.latent(latent), stats.latent(latent), rtol=1e-5)
    with pytest.raises(tcw.StoreError, match="Layer 5"):
        analyze_features(lm, make_transcoder(lm, layer=5), store, progress=False)


def assert_same_latent(a, b, rtol=0.0):
    for field in a.__dataclass_fields__:
        left, right = getattr(a, field), getattr(b, field)
        if field == "top":
            for x, y in zip(left, right, strict=True):
                assert (x.context, x.position, x.center) == (y.context, y.position, y.center)
                np.testing.assert_array_equal(x.tokens, y.tokens)
                np.testing.assert_allclose([x.value, *x.acts], [y.value, *y.acts], rtol=rtol)
        elif field == "quantiles":
            for x, y in zip(left, right, strict=True):
                assert [(e.context, e.position) for e in x.examples] == [(e.context, e.position) for e in y.examples]
                np.testing.assert_allclose([x.low, x.high, x.min, x.max], [y.low, y.high, y.min, y.max], rtol=rtol)
        elif field in ("mean_active", "max"):
            assert left == pytest.approx(right, rel=rtol), field
        elif isinstance(left, np.ndarray):
            np.testing.assert_allclose(left, right, rtol=rtol)
        else:
            assert left == right, field


def test_save_load_round_trip(case, tmp_path):
    tc, stats, _ = case
    loaded = FeatureStats.load(stats.save(tmp_path / "stats"))
    assert loaded.meta == json.loads(json.dumps(stats.meta))
    assert loaded.vocab == stats.vocab
    assert loaded.fingerprint == transcoder_fingerprint(tc)
    for latent in range(N_LATENTS):
        assert_same_latent(stats.latent(latent), loaded.latent(latent))
    assert loaded.search("the") == stats.search("the")
    np.testing.assert_array_equal(loaded.order("max"), stats.order("max"))
    assert sorted(p.name for p in (tmp_path / "stats").iterdir()) == ["stats.json", "stats.safetensors", "vocab.json"]


def test_loading_is_lazy(case, tmp_path, monkeypatch):
    _, stats, _ = case
    stats.save(tmp_path / "stats")
    reads = []
    original = FeatureStats._row
    monkeypatch.setattr(FeatureStats, "_row",
                        lambda self, name, index: reads.append(index) or original(self, name, index))
    loaded = FeatureStats.load(tmp_path / "stats")
    repr(loaded), loaded.n_latents
    assert reads == []
    assert all(isinstance(a, np.memmap) for a in (loaded._arrays["top_acts"], loaded._arrays["sample_acts"]))
    loaded.latent(5)
    assert reads and set(reads) == {5}


def test_bad_inputs(lm, tokens, tmp_path):
    tc = make_transcoder(lm)
    with pytest.raises(ValueError, match="non-empty"):
        analyze_features(lm, tc, torch.zeros(0, 64, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="BOS"):
        analyze_features(lm, tc, torch.full((2, 8), lm.tokenizer.bos_token_id), progress=False)
    with pytest.raises(ValueError, match="top_k"):
        analyze_features(lm, tc, tokens, top_k=0, progress=False)
    narrow = Transcoder(TranscoderConfig(d_in=64, d_out=64, n_latents=32, site={"model": "x", "layer": LAYER}))
    with pytest.raises(ValueError, match="dimensions"):
        analyze_features(lm, narrow, tokens, progress=False)
    no_site = Transcoder(TranscoderConfig(d_in=lm.d_model, d_out=lm.d_model, n_latents=32))
    with pytest.raises(ValueError, match="site"):
        analyze_features(lm, no_site, tokens, progress=False)
    with pytest.raises(FeatureStatsError, match="no stats.json"):
        FeatureStats.load(tmp_path / "nothing")


@pytest.fixture(scope="module")
def small(lm, tokens):
    tc = make_transcoder(lm)
    return tc, analyze_features(lm, tc, tokens[:2], batch_size=BATCH, progress=False, **SETTINGS)


def test_corrupted_and_newer_files(small, tmp_path):
    _, stats = small
    root = stats.save(tmp_path / "stats")
    arrays = root / "stats.safetensors"
    arrays.write_bytes(arrays.read_bytes()[:-100])
    with pytest.raises(FeatureStatsError, match="truncated or corrupted"):
        FeatureStats.load(root)
    stats.save(root)
    meta = json.loads((root / "stats.json").read_text())
    (root / "stats.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(FeatureStatsError, match="newer tcwidgets"):
        FeatureStats.load(root)


def test_latent_out_of_range(small):
    _, stats = small
    for bad in (-1, N_LATENTS, 1.5):
        with pytest.raises(IndexError, match="out of range"):
            stats.latent(bad)


def test_stats_refuse_another_transcoder(small, lm):
    tc, stats = small
    stats.check_transcoder(tc, model=lm.name)
    other = make_transcoder(lm, seed=1)
    with pytest.raises(TranscoderMismatchError, match="different transcoder"):
        stats.check_transcoder(other)
    with pytest.raises(TranscoderMismatchError, match="computed on"):
        stats.check_transcoder(tc, model="gpt2")
    with pytest.raises(TranscoderMismatchError):
        FeatureDashboard(stats, transcoder=other)
    assert FeatureDashboard(stats, transcoder=tc).stats is stats


# -- the dashboard's Python side ---------------------------------------------------------------------------

def test_dashboard_feature_and_payload(small):
    _, stats = small
    dash = FeatureDashboard(stats)
    assert dash.feature == int(np.flatnonzero(stats.count)[0]) and dash.n_latents == N_LATENTS
    seen = []
    dash.observe(lambda change: seen.append(change["new"]), "feature")
    dash.feature = 7
    assert seen == [7] and dash._latent["index"] == 7 and dash.error == ""
    payload = latent_payload(stats, 7)
    assert dash._latent == payload
    text = json.dumps(payload)
    assert len(text) < 200_000
    example = payload["top"][0] if payload["top"] else None
    if example:
        assert len(example["tokens"]) == len(example["acts"]) and all(isinstance(t, str) for t in example["tokens"])


def test_dashboard_errors_are_raised_and_shown(small):
    _, stats = small
    dash = FeatureDashboard(stats, feature=3)
    with pytest.raises(traitlets.TraitError, match="out of range"):
        dash.feature = N_LATENTS
    assert dash.feature == 3 and "out of range" in dash.error
    dash.feature = 4
    assert dash.error == ""
    dash._on_message(dash, {"type": "select", "feature": 10**6}, [])  # from the page: shown, not raised
    assert dash.feature == 4 and "out of range" in dash.error
    dash._on_message(dash, {"type": "select", "feature": 2}, [])
    assert dash.feature == 2 and dash.error == ""
    with pytest.raises(traitlets.TraitError, match="out of range"):
        FeatureDashboard(stats, feature=-1)


def test_dashboard_list_and_search_messages(small, monkeypatch):
    _, stats = small
    dash = FeatureDashboard(stats)
    sent = []
    monkeypatch.setattr(dash, "send", lambda content, buffers=None: sent.append(content))
    dash._on_message(dash, {"type": "list", "request": "a", "sort": "max", "descending": True, "offset": 0}, [])
    reply = sent[-1]
    assert reply["request"] == "a" and reply["total"] == N_LATENTS and len(reply["rows"]) == 50
    maxima = [row[2] for row in reply["rows"]]
    assert maxima == sorted(maxima, reverse=True)
    best = stats.latent(int(stats.order("max")[0])).top[0]
    token = best.tokens[best.center]
    query = stats.vocab[token].strip() or stats.vocab[token]
    dash._on_message(dash, {"type": "list", "request": "b", "query": query}, [])
    found = sent[-1]
    assert found["query"] == query.strip() and found["total"] == len(stats.search(query)) > 0
    assert all(row[3] > 0 for row in found["rows"])
